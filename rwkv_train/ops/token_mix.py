"""Token mixing, x + (shift(x) - x) * mu for several mixing coefficients mu, with a hand-written backward.

Every RWKV-7 block starts its attention with six of these interpolations between each token and the one
before it (r, w, k, v, a, g) and its feed-forward with one. Their forward is one fused pass, but the
gradient autograd derives for them is not: it sums the six mu_i g_i into one buffer (the gradient of
shift(x) - x), then shifts that buffer back by a token, so compiled code writes and reads it again, and
forms the six coefficients' gradients sum_t g_i (shift(x) - x) in kernels of their own. Written out:

    d mu_i = sum over batch and time of g_i * (shift(x) - x)
    dx[t]  = sum_i g_i[t] (1 - mu_i[t]) + sum_i g_i[t + 1] mu_i[t + 1]    (the second sum is 0 at the last step)
    dx_prev = sum_i g_i[0] mu_i[0]                                        (when a previous token was passed)

(mu_i[t] is the coefficient at step t; RWKV-7's are (1, 1, C), and d mu_i sums over the dimensions
mu_i is broadcast along. Coefficients that vary by token, as RWKV-6's data-dependent ones, are handled,
but there the hand-written backward saves nothing: inductor's count for five of them is 49 C-values
against autograd's 41, and for one or two constant ones both are the same.)

Compiled, dx is then one pass that reads each g_i at t and t + 1 and writes dx (the next token's row is
a cache hit), beside one reduction for the coefficients: `scripts/block_traffic.py` counts 9 C-values
per token fewer in a 1.5B block's backward. Eager and compiled code run the same formula, so their
gradients agree to float32 rounding; every sum runs in float32.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def token_shift(x: Tensor, prev: Optional[Tensor]) -> Tensor:
    """The previous token's input at every position: `prev` (or zeros) at t=0.  x: (B, T, C)."""
    if prev is None:  # a pad, not a cat with zeros: compiled, it fuses into the consumers as an index shift
        return F.pad(x[:, :-1], (0, 0, 1, 0))
    return torch.cat([prev.unsqueeze(1).to(x.dtype), x[:, :-1]], dim=1)


def _next_token(z: Tensor) -> Tensor:
    """z[:, t + 1] at every t, zero at the last step (the adjoint of token_shift)."""
    return F.pad(z[:, 1:], (0, 0, 0, 1))


def _backward(
    grads: tuple[Tensor, ...],
    x: Tensor,
    prev: Optional[Tensor],
    mus: tuple[Tensor, ...],
    needed: Optional[tuple[bool, ...]] = None,
) -> tuple[Tensor, Optional[Tensor], list[Optional[Tensor]]]:
    """(dx, dprev, [d mu_i]) for the outputs' gradients `grads`, in the dtypes of x, prev and each mu.

    `needed`: which of (prev, mu_1, ...) want a gradient (default all); the others get None.
    """
    needed = needed or (True,) * (1 + len(mus))
    f32 = torch.promote_types(x.dtype, torch.float32)
    mixes = [mu.to(f32) for mu in mus]
    gs = [g.to(f32) for g in grads]
    # each g_i mu_i shifted on its own, not their sum: compiled, the sum would be a buffer of its own
    dx = sum(g * (1 - mu) + _next_token(g * mu) for g, mu in zip(gs, mixes))
    dprev = None
    if prev is not None and needed[0]:
        dprev = sum(g[:, 0] * mu.broadcast_to(g.shape)[:, 0] for g, mu in zip(gs, mixes)).to(prev.dtype)
    # shift(x) - x in x's dtype, the value the forward multiplied (and autograd would have saved); formed
    # in float32 instead, compiled code kept a float32 copy of it between the two sums
    xx = (token_shift(x, prev) - x).to(f32)
    dmus = [(g * xx).sum_to_size(mu.shape).to(mu.dtype) if want else None for g, mu, want in zip(gs, mus, needed[1:])]
    return dx.to(x.dtype), dprev, dmus


class _TokenMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, prev: Optional[Tensor], *mus: Tensor) -> tuple[Tensor, ...]:
        xx = token_shift(x, prev) - x
        ctx.save_for_backward(x, prev, *mus)
        return tuple(x + xx * mu for mu in mus)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        x, prev, *mus = ctx.saved_tensors
        dx, dprev, dmus = _backward(grads, x, prev, tuple(mus), tuple(ctx.needs_input_grad[1:]))
        return dx, dprev, *dmus


def token_mix(x: Tensor, prev: Optional[Tensor], *mus: Tensor) -> tuple[Tensor, ...]:
    """x + (token_shift(x, prev) - x) * mu for each mu (each broadcastable to x, e.g. (1, 1, C)), as a tuple.

    The forward is exactly that expression; the backward is the one in this module's docstring.
    """
    if not mus:
        raise ValueError("token_mix needs at least one mixing coefficient")
    return _TokenMix.apply(x, prev, *mus)
