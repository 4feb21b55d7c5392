"""Learning-rate schedule: linear warmup, then cosine or exponential decay from lr_init to lr_final."""

from __future__ import annotations

import math

from rwkv_train.config import OptimConfig


def lr_at(step: int, total_steps: int, optim: OptimConfig) -> float:
    """Learning rate for optimiser step `step` (0-based) of a run of `total_steps` steps.

    As in the reference trainer, the decay's progress runs from the end of warmup to the last step, and
    during warmup the decayed value is scaled from 1% up to 100%.
    """
    warm = optim.warmup_steps
    span = max(1, total_steps - 1 - warm)
    progress = min(1.0, max(0.0, (step - warm) / span))
    if optim.schedule == "cosine":
        lr = optim.lr_final + (optim.lr_init - optim.lr_final) * 0.5 * (1 + math.cos(math.pi * progress))
    elif optim.schedule == "exponential":
        lr = optim.lr_init * (optim.lr_final / optim.lr_init) ** progress
    else:
        lr = optim.lr_init
    if step < warm:
        lr *= 0.01 + 0.99 * step / warm
    return lr
