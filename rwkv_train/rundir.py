"""The output directory of a run: refuse to clobber one, find what to resume, check its config matches."""

from __future__ import annotations

from pathlib import Path

import yaml

from rwkv_train.checkpoint import find_resume
from rwkv_train.config import Config
from rwkv_train.errors import CheckpointError, ConfigError

# Keys that define what a run computes: resuming with any of them changed would not continue the same run.
RUN_DEFINING = {
    "model": ("version", "n_layer", "n_embd", "head_size", "vocab_size", "dim_ffn"),
    "data": ("train", "ctx_len"),
    "train": ("micro_bsz", "seed", "precision"),
    "optim": ("lr_init", "lr_final", "warmup_steps", "schedule", "betas", "eps", "weight_decay", "grad_clip"),
}


def config_differences(saved: dict, new: dict) -> list[str]:
    out = []
    for section, keys in RUN_DEFINING.items():
        for key in keys:
            old_value = saved.get(section, {}).get(key)
            new_value = new.get(section, {}).get(key)
            if isinstance(old_value, tuple | list):
                old_value, new_value = list(old_value), list(new_value)
            if old_value != new_value:
                out.append(f"{section}.{key}: run has {old_value!r}, now {new_value!r}")
    return out


def resolve_resume(cfg: Config) -> Path | None:
    """The checkpoint this run continues from, or None for a fresh run. Raises on a clash with out_dir."""
    out_dir = Path(cfg.train.out_dir)
    mode = cfg.train.resume
    saved_cfg = out_dir / "config.yaml"
    if mode is None:
        marks = (saved_cfg, out_dir / "metrics.csv", out_dir / "resume.ckpt", *out_dir.glob("rwkv-*.pth"))
        leftovers = [p.name for p in marks if p.exists()]
        if leftovers:
            raise ConfigError(
                f"train.out_dir {out_dir} already holds a run ({', '.join(sorted(leftovers)[:3])}): pass "
                "train.resume=auto to continue it, or choose another train.out_dir (nothing was overwritten)"
            )
        return None
    if mode == "auto":
        ckpt = find_resume(out_dir)
        if ckpt is None:
            return None  # nothing to continue yet: start fresh in this directory
    else:
        ckpt = Path(mode)
        if not ckpt.exists():
            raise CheckpointError(f"train.resume={mode}: no such checkpoint; use auto or a path to a resume.ckpt")
    if saved_cfg.is_file():
        diffs = config_differences(yaml.safe_load(saved_cfg.read_text()) or {}, cfg.to_dict())
        if diffs:
            raise ConfigError(
                f"cannot resume the run in {out_dir}: its config differs in run-defining keys:\n  - "
                + "\n  - ".join(diffs)
                + "\nRestore those values, or start a new run with another train.out_dir"
            )
    return ckpt
