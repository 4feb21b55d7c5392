"""Model registry: one module per RWKV generation, chosen by `model.version`."""

from __future__ import annotations

import torch
from torch import nn

from rwkv_train.checkpoint import detect_version, load_into, load_weights
from rwkv_train.config import ModelConfig
from rwkv_train.errors import CheckpointError
from rwkv_train.models.v7 import RWKV7, RWKV7Dims

REGISTRY = {"v7": (RWKV7, RWKV7Dims)}


def build_model(model_cfg: ModelConfig, device: str | torch.device = "cpu", init: bool = True) -> nn.Module:
    """Build the configured model on `device`; `init` runs the reference initialisation.

    Parameters are created on the meta device first, so a large model costs no time in default inits
    it would overwrite anyway.
    """
    cls, dims_cls = REGISTRY[model_cfg.version]
    with torch.device("meta"):
        model = cls(dims_cls.from_config(model_cfg))
    if torch.device(device).type == "meta":
        return model
    model = model.to_empty(device=device)
    if init:
        model.reset_parameters()
    return model


def count_params(model_cfg: ModelConfig) -> int:
    """Parameter count of the configured model, computed without allocating it."""
    return sum(p.numel() for p in build_model(model_cfg, device="meta").parameters())


def model_from_weights(path: str) -> nn.Module:
    """Build a model shaped like the weights-only checkpoint at `path` and load it (float32, eval mode)."""
    state = load_weights(path)
    version = detect_version(state)
    if version not in REGISTRY:
        raise CheckpointError(f"{path} is an RWKV-{version} checkpoint; this build trains {', '.join(REGISTRY)} only")
    cls, dims_cls = REGISTRY[version]
    with torch.device("meta"):
        model = cls(dims_cls.from_state_dict(state))
    model = model.to_empty(device="cpu")
    load_into(model, state, path)
    return model.float().eval()
