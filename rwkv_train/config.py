"""Run configuration: YAML -> typed dataclasses -> validated once.

A config file has five sections (`model`, `data`, `train`, `optim`, `logging`). Any field can be
overridden on the command line with a dotted `section.key=value` word; values are parsed as YAML,
so `train.max_steps=50`, `optim.betas=[0.9,0.99]` and `logging.wandb=off` all work.

Every problem in a config (unknown keys, wrong types, values out of range) is collected and
reported at once in a single `ConfigError`, each line naming the key, the value and what is expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from rwkv_train.errors import ConfigError

Precision = Literal["fp32", "tf32", "fp16", "bf16"]
Strategy = Literal["auto", "ddp", "deepspeed"]
Offload = Literal["none", "optimizer", "all"]
Schedule = Literal["cosine", "exponential", "constant"]
WandbMode = Literal["off", "online", "offline"]


@dataclass
class ModelConfig:
    version: Literal["v4", "v5", "v6", "v7"] = "v7"
    """RWKV generation: v4, v5 (Eagle, x052), v6 (Finch, x060) or v7 (Goose, x070)."""
    n_layer: int = 12
    """Number of blocks."""
    n_embd: int = 768
    """Model width C. Must be a multiple of head_size and of 32."""
    head_size: int = 64
    """Channels per WKV head (v5 to v7); the number of heads is n_embd // head_size. v4 has no heads."""
    vocab_size: int = 65536
    """Embedding and head rows. 65536 for the RWKV World tokenizer."""
    dim_ffn: Optional[int] = None
    """Channel-mix hidden width. Default (null): 4 * n_embd for v4 and v7, int(3.5 * n_embd) // 32 * 32 for v5, v6."""
    load: Optional[str] = None
    """Path of a weights-only `.pth` (official layout) to start from instead of a fresh init."""
    kernel: Literal["auto", "cuda", "torch"] = "auto"
    """WKV backend: `cuda` (the bf16 kernels in cuda/, built on first use), `torch` (the pure-PyTorch
    reference) or `auto` (cuda on a CUDA device where the kernel builds, torch otherwise)."""
    wkv7_chunked: Literal["auto", True, False] = "auto"
    """RWKV-7 only, with a CUDA kernel: `true` runs the chunked tensor-core one (cuda/wkv7_chunked.cu; head
    sizes 32 and 64), `false` the sequential one (cuda/wkv7.cu), `auto` the chunked one where it has the
    head size (it is the faster), else the sequential one. Per layer kept for the backward, the chunked
    one holds head_size / 8 bytes per token and channel (every 16th state, bf16), the sequential one 4."""
    wkv_diag_chunked: Literal["auto", True, False] = False
    """RWKV-5 and RWKV-6 only, with a CUDA kernel: `true` runs the chunked tensor-core one
    (cuda/wkv_diag_chunked.cu; head sizes 32 and 64; per-step decays below e^-8 taken as e^-8), `false`
    the sequential one (cuda/wkv_diag.cu, float32 throughout), `auto` the chunked one where it has the
    head size. The chunked one keeps the same head_size / 8 bytes per token and channel as RWKV-7's."""

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    @property
    def ffn_width(self) -> int:
        if self.dim_ffn is not None:
            return self.dim_ffn
        return 4 * self.n_embd if self.version in ("v4", "v7") else int(3.5 * self.n_embd) // 32 * 32

    def problems(self) -> list[str]:
        out = []
        for name in ("n_layer", "n_embd", "head_size", "vocab_size"):
            if getattr(self, name) < 1:
                out.append(f"model.{name}={getattr(self, name)}: expected a positive integer")
        if self.version != "v4" and self.head_size >= 1 and self.n_embd % self.head_size:
            out.append(
                f"model.n_embd={self.n_embd} is not divisible by model.head_size={self.head_size}: "
                "choose n_embd as a multiple of head_size (e.g. 64)"
            )
        if self.n_embd % 32:
            out.append(f"model.n_embd={self.n_embd}: expected a multiple of 32 (the reference sizes assume it)")
        if self.dim_ffn is not None and (self.dim_ffn < 1 or self.dim_ffn % 32):
            out.append(f"model.dim_ffn={self.dim_ffn}: expected null or a positive multiple of 32")
        return out


@dataclass
class Corpus:
    path: str
    """binidx prefix (PREFIX.bin / PREFIX.idx), from data_prep/make_binidx.py."""
    weight: float = 1.0
    """Share of training samples drawn from this corpus, relative to the other corpora's weights."""


@dataclass
class DataConfig:
    train: list[Corpus] = field(default_factory=list)
    """Training corpus: a binidx prefix, or a list of {path, weight} to mix several by weight."""
    val: Optional[str] = None
    """binidx prefix of a validation corpus, or null for none."""
    ctx_len: int = 512
    """Tokens per training window (each sample reads ctx_len + 1 tokens)."""
    val_every: int = 0
    """Evaluate the validation corpus every this many optimiser steps (0: only at the end)."""
    val_tokens: int = 65536
    """At most this many validation tokens per evaluation (consecutive windows from the start)."""

    def problems(self) -> list[str]:
        out = []
        if not self.train:
            out.append("data.train is empty: set it to the prefix of a corpus made by data_prep/make_binidx.py")
        for c in self.train:
            if not c.weight > 0:
                out.append(f"data.train weight {c.weight} for {c.path}: expected a positive number")
        if self.ctx_len < 1:
            out.append(f"data.ctx_len={self.ctx_len}: expected a positive integer")
        if self.val_every < 0:
            out.append(f"data.val_every={self.val_every}: expected 0 (end only) or a positive step count")
        if self.val_tokens < 1:
            out.append(f"data.val_tokens={self.val_tokens}: expected a positive integer")
        return out


@dataclass
class TrainConfig:
    micro_bsz: int = 8
    """Windows per device per forward pass."""
    accumulate: Optional[int] = None
    """Gradient-accumulation steps. Give this or global_bsz, not both (default: 1)."""
    global_bsz: Optional[int] = None
    """Windows per optimiser step over all devices; must be micro_bsz * world size * accumulate."""
    max_steps: Optional[int] = None
    """Optimiser steps to train. Give this or max_tokens."""
    max_tokens: Optional[int] = None
    """Training tokens; converted to steps (rounded up) with the tokens per step."""
    precision: Precision = "bf16"
    """fp32, tf32 (fp32 weights, TF32 matmuls on GPU), fp16 (mixed, loss-scaled) or bf16."""
    accelerator: str = "auto"
    """Lightning accelerator: auto, cpu, gpu."""
    devices: int = 1
    """Devices per node."""
    num_nodes: int = 1
    """Nodes."""
    strategy: Strategy = "auto"
    """auto (single device), ddp, or deepspeed (ZeRO, see zero_stage and offload)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage (1, 2 or 3) when strategy is deepspeed."""
    offload: Offload = "none"
    """DeepSpeed offload: none, optimizer (ZeRO-2/3), or all (optimizer and parameters, ZeRO-3)."""
    grad_cp: Literal[False, True, "selective", "selective-wkv"] = False
    """Gradient checkpointing per block. true: the block's forward is recomputed in the backward (least
    memory, about 30% more compute); selective: the outputs of the projections (the products over at
    least C / 2 terms) are kept and the rest (elementwise work, norms, the WKV, the low-rank LoRA
    up-projections) is recomputed (memory between the two, no second pass of the large products);
    selective-wkv: as selective, and the CUDA WKV kernel's outputs are kept too, so its forward runs
    once (RWKV-7's chunked kernel: y and a bf16 state per 16 tokens, about 5 C values per token more at
    head size 64; with the PyTorch backend the same as selective)."""
    compile: bool = False
    """torch.compile each block (grad_cp included): fused elementwise work, faster steps on a GPU; the
    first step compiles for a minute or more."""
    seed: int = 42
    """Seeds weights init and the window order."""
    out_dir: str = "out/run"
    """Directory for checkpoints, metrics.csv, config.yaml and the loss plot."""
    save_every: int = 0
    """Save rwkv-<step>.pth and a resume checkpoint every this many steps (0: only at the end)."""
    resume: Optional[str] = None
    """null (fresh run; refuses an out_dir that holds one), auto (continue the run in out_dir), or a resume-checkpoint path."""

    def problems(self) -> list[str]:
        out = []
        for name in ("micro_bsz", "devices", "num_nodes"):
            if getattr(self, name) < 1:
                out.append(f"train.{name}={getattr(self, name)}: expected a positive integer")
        for name in ("accumulate", "global_bsz", "max_steps", "max_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                out.append(f"train.{name}={value}: expected a positive integer or null")
        if self.accumulate is not None and self.global_bsz is not None:
            out.append("train.accumulate and train.global_bsz are both set: give one of them (the other is derived)")
        if (self.max_steps is None) == (self.max_tokens is None):
            out.append("give exactly one of train.max_steps and train.max_tokens (e.g. train.max_steps=1000)")
        if self.zero_stage not in (1, 2, 3):
            out.append(f"train.zero_stage={self.zero_stage}: expected 1, 2 or 3")
        if self.offload == "all" and self.zero_stage != 3:
            out.append("train.offload=all needs train.zero_stage=3 (parameter offload is a ZeRO-3 feature)")
        if self.offload != "none" and self.strategy != "deepspeed":
            out.append(f"train.offload={self.offload} needs train.strategy=deepspeed")
        if self.save_every < 0:
            out.append(f"train.save_every={self.save_every}: expected 0 (end only) or a positive step count")
        return out


@dataclass
class OptimConfig:
    lr_init: float = 6e-4
    """Learning rate after warmup."""
    lr_final: float = 6e-5
    """Learning rate at the last step."""
    warmup_steps: int = 10
    """Steps of linear warmup, from 1% of lr_init up to lr_init."""
    schedule: Schedule = "cosine"
    """Decay from lr_init to lr_final after warmup: cosine, exponential, or constant (stays at lr_init)."""
    betas: tuple[float, float] = (0.9, 0.99)
    """Adam betas."""
    eps: float = 1e-18
    """Adam epsilon (RWKV uses a very small one)."""
    weight_decay: float = 0.001
    """Decoupled weight decay, applied only to 2-D weight matrices."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""

    def problems(self) -> list[str]:
        out = []
        if not self.lr_init > 0:
            out.append(f"optim.lr_init={self.lr_init}: expected a positive learning rate")
        if not 0 < self.lr_final <= self.lr_init:
            out.append(f"optim.lr_final={self.lr_final}: expected 0 < lr_final <= lr_init ({self.lr_init})")
        if self.warmup_steps < 0:
            out.append(f"optim.warmup_steps={self.warmup_steps}: expected 0 or more")
        if not all(0 <= b < 1 for b in self.betas):
            out.append(f"optim.betas={list(self.betas)}: expected two numbers in [0, 1)")
        if not self.eps > 0:
            out.append(f"optim.eps={self.eps}: expected a positive number")
        if self.weight_decay < 0:
            out.append(f"optim.weight_decay={self.weight_decay}: expected 0 or more")
        if self.grad_clip < 0:
            out.append(f"optim.grad_clip={self.grad_clip}: expected 0 (off) or a positive norm")
        return out


@dataclass
class LoggingConfig:
    wandb: WandbMode = "off"
    """Weights & Biases: off, online, or offline (writes under out_dir/wandb, no network needed)."""
    project: str = "rwkv"
    """wandb project name."""
    run_name: Optional[str] = None
    """wandb run name (default: the out_dir's name)."""
    log_every: int = 10
    """Write a metrics.csv row every this many optimiser steps."""

    def problems(self) -> list[str]:
        return [] if self.log_every >= 1 else [f"logging.log_every={self.log_every}: expected a positive integer"]


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def problems(self) -> list[str]:
        return [p for section in _sections(self).values() for p in section.problems()]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["optim"]["betas"] = list(self.optim.betas)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


def _sections(cfg: Config) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def all_keys() -> list[str]:
    """Every valid dotted key, e.g. `train.max_steps`."""
    cfg = Config()
    return [f"{s}.{f.name}" for s, sec in _sections(cfg).items() for f in dataclasses.fields(sec)]


# --- parsing -----------------------------------------------------------------------------------


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a).lower() if isinstance(a, bool) else str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _describe(inner[0]) + " or null"
    if origin is tuple:
        return f"a list of {len(typing.get_args(tp))} numbers"
    if origin is list:
        return "a corpus prefix, or a list of {path: PREFIX, weight: NUMBER}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any) -> Any:
    """Return `value` as type `tp`, or raise ValueError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(value, inner[0])
    if origin is Literal:
        choices = typing.get_args(tp)
        # YAML reads `off` as False; the wandb modes spell it as a word.
        if value is False and "off" in choices:
            value = "off"
        if not any(type(value) is type(c) and value == c for c in choices):  # 1 is not true
            raise ValueError
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError
        return tuple(_coerce(v, a) for v, a in zip(value, args))
    if origin is list:
        (item,) = typing.get_args(tp)
        return [_coerce(v, item) for v in (value if isinstance(value, list) else [value])]
    if tp is Corpus:
        if isinstance(value, str) and value:
            return Corpus(path=value)
        if not isinstance(value, dict) or set(value) - {"path", "weight"} or not value.get("path"):
            raise ValueError
        return Corpus(path=_coerce(value["path"], str), weight=_coerce(value.get("weight", 1.0), float))
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)  # 1e6 in YAML is a float
            raise ValueError
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ValueError
        return value
    raise TypeError(f"unsupported config type {tp}")


def _suggest(key: str, valid: list[str]) -> str:
    """' (did you mean X?)' for the nearest valid key, matching the whole dotted key or just its tail."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if not close:  # right field, wrong or missing section: `max_steps=5` or `optim.max_steps=5`
        tails = {k.rsplit(".", 1)[-1]: k for k in valid}
        near = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(tails), n=1, cutoff=0.7)
        close = [tails[near[0]]] if near else []
    return f" (did you mean {close[0]}?)" if close else ""


def from_dict(raw: dict[str, Any], origin: str = "config") -> Config:
    """Build and validate a Config from nested dicts; raise one ConfigError listing every problem."""
    problems: list[str] = []
    cfg = Config()
    valid = all_keys()
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: expected a mapping of sections (model, data, train, optim, logging)")
    sections = _sections(cfg)
    for sec_name, values in raw.items():
        if sec_name not in sections:
            problems.append(f"unknown section '{sec_name}'{_suggest(str(sec_name), list(sections))}")
            continue
        if values is None:
            continue
        if not isinstance(values, dict):
            problems.append(f"section '{sec_name}' must be a mapping of keys to values")
            continue
        section = sections[sec_name]
        hints = typing.get_type_hints(type(section))
        for key, value in values.items():
            dotted = f"{sec_name}.{key}"
            if key not in hints:
                problems.append(f"unknown key '{dotted}'{_suggest(dotted, valid)}")
                continue
            try:
                setattr(section, key, _coerce(value, hints[key]))
            except ValueError:
                problems.append(f"{dotted}={value!r}: expected {_describe(hints[key])}")
    if not problems:
        problems = cfg.problems()
    if problems:
        raise ConfigError(f"{origin} has {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    return cfg


def parse_overrides(words: list[str]) -> dict[str, Any]:
    """Turn `a.b=value` words into nested dicts; values are parsed as YAML."""
    nested: dict[str, Any] = {}
    problems = []
    for word in words:
        key, sep, text = word.partition("=")
        if not sep or "." not in key or not key.strip():
            problems.append(f"override '{word}': expected section.key=value, e.g. train.max_steps=50")
            continue
        section, _, name = key.strip().partition(".")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        nested.setdefault(section, {})[name] = value
    if problems:
        raise ConfigError("command line has problem(s):\n  - " + "\n  - ".join(problems))
    return nested


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for section, values in extra.items():
        if isinstance(out.get(section), dict) and isinstance(values, dict):
            out[section].update(values)
        else:
            out[section] = values
    return out


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply dotted overrides, validate, and return the Config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: pass an existing file, e.g. --config configs/demo.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    return from_dict(_merge(raw, parse_overrides(overrides or [])), origin=str(path))
