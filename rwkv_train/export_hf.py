"""Export an RWKV-4 checkpoint as a Hugging Face `transformers` RwkvForCausalLM directory.

The directory holds `config.json` (model_type "rwkv") and `model.safetensors`, and loads with
`transformers.RwkvForCausalLM.from_pretrained(DIR)`. transformers implements RWKV-4 only, so other
generations are refused. Writing needs only the `safetensors` package, not transformers itself.

Key renaming (the official layout on the left):
    emb.weight                    -> rwkv.embeddings.weight
    blocks.0.ln0.*                -> rwkv.blocks.0.pre_ln.*
    blocks.{i}.att.*              -> rwkv.blocks.{i}.attention.*
    blocks.{i}.ffn.*              -> rwkv.blocks.{i}.feed_forward.*
    *.time_mix_{k,v,r}            -> *.time_mix_{key,value,receptance}
    ln_out.*, blocks.{i}.ln{1,2}  -> rwkv.ln_out.*, rwkv.blocks.{i}.ln{1,2}
    head.weight                   -> head.weight
Values and shapes are unchanged (transformers also stores time_decay raw and applies -exp itself).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import yaml
from torch import Tensor

from rwkv_train.checkpoint import detect_version, load_weights, replace_atomically
from rwkv_train.errors import CheckpointError, UserError

DEFAULT_CONTEXT_LENGTH = 1024
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_TIME_MIX_NAMES = {"k": "key", "v": "value", "r": "receptance"}


def hf_key(name: str) -> str:
    """The transformers RwkvForCausalLM name of an official RWKV-4 state-dict key."""
    if name == "head.weight":
        return name
    name = re.sub(r"^emb\.", "embeddings.", name)
    name = re.sub(r"^blocks\.0\.ln0\.", "blocks.0.pre_ln.", name)
    name = re.sub(r"^blocks\.(\d+)\.att\.", r"blocks.\1.attention.", name)
    name = re.sub(r"^blocks\.(\d+)\.ffn\.", r"blocks.\1.feed_forward.", name)
    name = re.sub(r"\.time_mix_([kvr])$", lambda m: ".time_mix_" + _TIME_MIX_NAMES[m.group(1)], name)
    return "rwkv." + name


def check_exportable(state: dict[str, Tensor], source: str) -> None:
    """Raise CheckpointError unless `state` is a plain RWKV-4 model transformers can represent."""
    from rwkv_train.models.v4 import RWKV4, RWKV4Dims  # the registry imports models lazily too

    version = detect_version(state)
    if version != "v4":
        raise CheckpointError(
            f"{source} is an RWKV-{version} checkpoint; transformers' RwkvForCausalLM implements RWKV-4 only: "
            "export a checkpoint trained with model.version=v4"
        )
    try:
        dims = RWKV4Dims.from_state_dict(state)
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{source} lacks the RWKV-4 key {err}: it is not a complete RWKV-4 checkpoint") from None
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in RWKV4(dims).state_dict().items()}
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k} (no place for it in RwkvForCausalLM)" for k in state if k not in expected]
    problems += [
        f"{k}: shape {tuple(state[k].shape)}, expected {expected[k]}"
        for k in expected
        if k in state and tuple(state[k].shape) != expected[k]
    ]
    if problems:
        shown = "\n  - ".join(problems[:12]) + (f"\n  - ... and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise CheckpointError(
            f"{source} is not a plain RWKV-4 model ({len(problems)} problem(s)):\n  - {shown}\n"
            "Only checkpoints without extras (pos_emb, tiny attention, head_qk) can be exported."
        )


def hf_config(state: dict[str, Tensor], context_length: int, dtype: torch.dtype) -> dict:
    """The config.json of a transformers RwkvForCausalLM matching an RWKV-4 state dict."""
    from rwkv_train.models.v4 import RWKV4Dims

    d = RWKV4Dims.from_state_dict(state)
    return {
        "architectures": ["RwkvForCausalLM"],
        "model_type": "rwkv",
        "vocab_size": d.vocab_size,
        "hidden_size": d.n_embd,
        "num_hidden_layers": d.n_layer,
        "attention_hidden_size": d.dim_att,
        "intermediate_size": d.dim_ffn,
        "layer_norm_epsilon": 1e-5,  # nn.LayerNorm's default, which the reference and this project use
        "context_length": context_length,
        "rescale_every": 0,  # the weights are stored unscaled; no halving of activations at inference
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "use_cache": True,
        "dtype": _DTYPE_NAMES[dtype],
        "torch_dtype": _DTYPE_NAMES[dtype],  # the name transformers 4.x reads
    }


def hf_state_dict(state: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """Renamed, contiguous tensors in `dtype`; time_decay and time_first stay float32 (transformers keeps them so)."""
    out = {}
    for name, tensor in state.items():
        keep_fp32 = name.endswith((".time_decay", ".time_first"))
        out[hf_key(name)] = tensor.detach().to("cpu", torch.float32 if keep_fp32 else dtype).contiguous()
    return out


def context_length_of_run(checkpoint: Path) -> int | None:
    """data.ctx_len from the config.yaml a training run leaves beside its checkpoints, if there is one."""
    saved = checkpoint.parent / "config.yaml"
    if not saved.is_file():
        return None
    try:
        ctx_len = (yaml.safe_load(saved.read_text()) or {}).get("data", {}).get("ctx_len")
    except (yaml.YAMLError, AttributeError):
        return None
    return ctx_len if isinstance(ctx_len, int) and ctx_len > 0 else None


def export_hf(
    checkpoint: str | Path,
    output: str | Path,
    context_length: int | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Write `output`/config.json and `output`/model.safetensors for an RWKV-4 `checkpoint`; returns the config.

    context_length: the model's nominal context (transformers only uses it to size its CUDA kernel);
    default: data.ctx_len of the run's config.yaml beside the checkpoint, else 1024.
    dtype: fp32, bf16 or fp16 for the weights; default: the checkpoint's own dtype.
    """
    checkpoint, output = Path(checkpoint), Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise UserError(f"{output} already exists and is not empty: choose another --output or pass --overwrite")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")

    state = load_weights(checkpoint)
    check_exportable(state, str(checkpoint))
    if dtype is None:
        stored = state["emb.weight"].dtype
        torch_dtype = stored if stored in _DTYPE_NAMES else torch.float32
    else:
        torch_dtype = DTYPES[dtype]
    if context_length is None:
        context_length = context_length_of_run(checkpoint) or DEFAULT_CONTEXT_LENGTH
    if context_length < 1:
        raise UserError(f"context length {context_length}: expected a positive integer")

    try:
        from safetensors.torch import save_file
    except ImportError:
        raise UserError("exporting needs the safetensors package: pip install safetensors (transformers brings it)") from None
    config = hf_config(state, context_length, torch_dtype)
    tensors = hf_state_dict(state, torch_dtype)
    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        for path in (tmp, tmp / WEIGHTS_NAME, tmp / CONFIG_NAME):  # safetensors writes its file owner-only
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        replace_atomically(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return config
