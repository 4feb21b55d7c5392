"""Model registry: one module per RWKV generation, chosen by `model.version`."""

from __future__ import annotations

import importlib

import torch
from torch import nn

from rwkv_train.checkpoint import detect_version, load_into, load_weights
from rwkv_train.config import ModelConfig

# version -> (module, model class, dims class); imported on first use
REGISTRY = {
    "v4": ("rwkv_train.models.v4", "RWKV4", "RWKV4Dims"),
    "v5": ("rwkv_train.models.v5", "RWKV5", "RWKV5Dims"),
    "v6": ("rwkv_train.models.v6", "RWKV6", "RWKV6Dims"),
    "v7": ("rwkv_train.models.v7", "RWKV7", "RWKV7Dims"),
}


def model_classes(version: str) -> tuple[type[nn.Module], type]:
    """(model class, dims class) of an RWKV generation."""
    module_name, model_name, dims_name = REGISTRY[version]
    module = importlib.import_module(module_name)
    return getattr(module, model_name), getattr(module, dims_name)


def build_model(model_cfg: ModelConfig, device: str | torch.device = "cpu", init: bool = True) -> nn.Module:
    """Build the configured model on `device`; `init` runs the reference initialisation.

    Parameters are created on the meta device first, so a large model costs no time in default inits
    it would overwrite anyway.
    """
    cls, dims_cls = model_classes(model_cfg.version)
    with torch.device("meta"):
        model = cls(dims_cls.from_config(model_cfg))
    if torch.device(device).type == "meta":
        return model
    model = model.to_empty(device=device)
    if init:
        model.reset_parameters()
    model.set_kernel(model_cfg.kernel, model_cfg.wkv7_chunked, model_cfg.wkv_diag_chunked)
    return model


def count_params(model_cfg: ModelConfig) -> int:
    """Parameter count of the configured model, computed without allocating it."""
    return sum(p.numel() for p in build_model(model_cfg, device="meta").parameters())


def model_from_weights(path: str) -> nn.Module:
    """Build a model shaped like the weights-only checkpoint at `path` and load it (float32, eval mode)."""
    state = load_weights(path)
    cls, dims_cls = model_classes(detect_version(state))
    with torch.device("meta"):
        model = cls(dims_cls.from_state_dict(state))
    model = model.to_empty(device="cpu")
    load_into(model, state, path)
    return model.float().eval()
