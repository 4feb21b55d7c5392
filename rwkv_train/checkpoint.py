"""Checkpoints: official weights-only `.pth` files, and the resume checkpoint of a run.

- `rwkv-<step>.pth` / `rwkv-final.pth`: a flat state dict with the official key names (`emb.weight`,
  `blocks.0.att.r_k`, ...), the layout the official `rwkv` runtime and the reference trainer read.
- `resume.ckpt`: everything a run needs to continue exactly (fp32 weights, optimiser, LR schedule,
  step, loop and data position, RNG), written through Lightning; a DeepSpeed run writes a directory.

Every file is written under a temporary name and renamed into place, so a kill during a save leaves
the previous file intact. Everything loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import nn

from rwkv_train.errors import CheckpointError

RESUME_NAME = "resume.ckpt"

# An attention parameter only one generation has (v5's time_mix_g: v6 has time_maa_g instead).
_VERSION_MARKERS = (("v7", "att.r_k"), ("v6", "att.time_maa_x"), ("v5", "att.time_mix_g"), ("v4", "att.time_first"))

# Keys the reference trainer creates for layer 0 but never uses (layer 0 has no value residual).
_UNUSED_V7_KEYS = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")


def detect_version(state: dict[str, torch.Tensor]) -> str:
    """'v4' | 'v5' | 'v6' | 'v7' from the state dict's keys; CheckpointError for none or a mix."""
    found: dict[str, str] = {}
    for key in state:
        for version, marker in _VERSION_MARKERS:
            if key.endswith("." + marker) and version not in found:
                found[version] = key
    if len(found) == 1:
        return next(iter(found))
    if not found:
        sample = ", ".join(sorted(state)[:6])
        raise CheckpointError(
            f"cannot tell the RWKV generation of this checkpoint (keys start: {sample}): "
            "expected an RWKV v4/v5/v6/v7 state dict with keys like blocks.0.att.*"
        )
    mix = " and ".join(f"RWKV-{v} ({k})" for v, k in sorted(found.items()))
    raise CheckpointError(f"this checkpoint mixes keys of {mix}: it is not one model; check how it was made")


def weights_state_dict(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The model's weights as a flat CPU state dict with official key names, cast to `dtype`."""
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}


def atomic_torch_save(obj, path: str | Path) -> None:
    """torch.save to `path` via a temporary file in the same directory and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a weights-only `.pth` (never runs code from the file)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: check model.load / --checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # pickle errors, truncated files, non-tensor payloads
        raise CheckpointError(
            f"{path} is not a weights-only RWKV checkpoint ({type(err).__name__}: {str(err).splitlines()[0]}); "
            "pass an rwkv-*.pth file"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a flat state dict of tensors: pass an rwkv-*.pth file")
    return state


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy an official state dict into `model`, or raise one CheckpointError naming every difference."""
    version = detect_version(state)
    if version != model.version:
        raise CheckpointError(
            f"{source} is an RWKV-{version} checkpoint but model.version is {model.version}: "
            f"set model.version={version} or load an RWKV-{model.version} checkpoint"
        )
    state = {k: v for k, v in state.items() if k not in _UNUSED_V7_KEYS}
    own = model.state_dict()
    problems = _dimension_differences(model, state)
    problems += [  # then every key whose shape differs
        f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    problems += [f"missing {k}" for k in own if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in own]
    if problems:
        shown = "\n  - ".join(problems[:12]) + (f"\n  - ... and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise CheckpointError(
            f"{source} does not fit the configured model ({len(problems)} difference(s)):\n  - {shown}\n"
            "Set model.n_layer / n_embd / head_size / vocab_size / dim_ffn to the checkpoint's sizes."
        )
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state[k])


def _dimension_differences(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """'n_embd: checkpoint 128, model 64' for each model dimension the checkpoint's shapes disagree with."""
    try:
        theirs = type(model.dims).from_state_dict(state)
    except (KeyError, IndexError, ValueError):
        return []  # too incomplete to read dimensions from; the key listing says what is missing
    ours = model.dims
    return [
        f"{name}: checkpoint {getattr(theirs, name)}, model {getattr(ours, name)}"
        for name in ours.__dataclass_fields__
        if getattr(theirs, name) != getattr(ours, name)
    ]


def replace_atomically(tmp: Path, final: Path) -> None:
    """Move a finished file or directory `tmp` onto `final`, never leaving `final` half-written."""
    if tmp.is_dir():
        old = final.with_name(final.name + ".old")
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def find_resume(out_dir: Path) -> Path | None:
    """The run's resume checkpoint, if one was completed (a `.old` one survives a kill mid-swap)."""
    for name in (RESUME_NAME, RESUME_NAME + ".old"):
        if (out_dir / name).exists():
            return out_dir / name
    return None
