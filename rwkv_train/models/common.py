"""Pieces every RWKV generation shares: token shift, init helpers, the L2Wrap loss term."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def token_shift(x: Tensor, prev: Tensor | None) -> Tensor:
    """The previous token's input at every position: `prev` (or zeros) at t=0.  x: (B, T, C)."""
    first = torch.zeros_like(x[:, :1]) if prev is None else prev.unsqueeze(1).to(x.dtype)
    return torch.cat([first, x[:, :-1]], dim=1)


def layer_ramps(layer_id: int, n_layer: int) -> tuple[float, float]:
    """(ratio_0_to_1, ratio_1_to_almost0): the per-layer ramps the reference init is written in."""
    ratio_0_to_1 = layer_id / (n_layer - 1) if n_layer > 1 else 0.0
    ratio_1_to_almost0 = 1.0 - layer_id / n_layer
    return ratio_0_to_1, ratio_1_to_almost0


def channel_ramp(n: int) -> Tensor:
    """i / n for i in 0..n-1, shaped (1, 1, n) like the mixing coefficients."""
    return (torch.arange(n, dtype=torch.float32) / n).view(1, 1, n)


@torch.no_grad()
def orthogonal_(w: Tensor, scale: float) -> Tensor:
    """Orthogonal init of a 2-D matrix, gain `scale` times sqrt(rows/cols) when it is taller than wide."""
    rows, cols = w.shape
    gain = (rows / cols) ** 0.5 if rows > cols else 1.0
    return torch.nn.init.orthogonal_(w, gain=gain * scale)


class _L2Wrap(torch.autograd.Function):
    """Identity on the loss; in backward, adds factor * max_logit at each row's argmax to the logits' gradient.

    It keeps logits from drifting upward. The added gradient is scaled by the incoming gradient so that it
    stays right under loss scaling (fp16) and gradient accumulation, where grad_output != 1.
    """

    @staticmethod
    def forward(ctx, loss: Tensor, logits: Tensor) -> Tensor:
        ctx.save_for_backward(logits)
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (logits,) = ctx.saved_tensors
        factor = 1e-4 / (logits.shape[0] * logits.shape[1])
        maxx, ids = torch.max(logits, dim=-1, keepdim=True)
        glogits = torch.zeros_like(logits).scatter_(-1, ids, maxx * factor)
        return grad_output, glogits * grad_output


def cross_entropy_l2wrap(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy with RWKV's L2Wrap gradient term.  logits: (B, T, V), targets: (B, T)."""
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return _L2Wrap.apply(loss, logits)
