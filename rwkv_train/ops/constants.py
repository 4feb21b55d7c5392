"""Small constant tensors (causal masks) that the PyTorch WKV paths build once per size and device."""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch
from torch import Tensor


def cached(cache: dict, key: Hashable, build: Callable[[], Tensor]) -> Tensor:
    """cache[key], built on first use. While compiling it is built afresh and not stored: the compiled
    graph makes its own constant, and reading the cache there would become a guard that fails once the
    first eager call has filled it."""
    if torch.compiler.is_compiling():
        return build()
    if key not in cache:
        cache[key] = build()
    return cache[key]
