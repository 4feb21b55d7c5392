"""The RWKV-7 CUDA kernel (`cuda/wkv7.cu`) as torch custom ops, with autograd.

`wkv7_cuda(r, lw, k, v, a, b, state)` has the contract of `rwkv_train.ops.wkv7.wkv7_recurrent`:
inputs [B, T, H, N], state [B, H, N, N] float32 in [value, key] layout (None: zeros); it returns y
[B, T, H, N] in bf16 and the final state in float32. r, k, v, a, b travel as bf16 and lw (the
log-decay) as float32: a bf16 decay would compound its rounding over the sequence. The state and
every accumulation are float32. Gradients reach every input and the initial state, and the final
state's gradient is taken, so chunked BPTT is exact.

The ops (`rwkv_train::wkv7_forward`, `rwkv_train::wkv7_backward`) are registered with fake
(shape-only) implementations, so `torch.compile` traces around them without a graph break.
The kernel is built on the first call (see `rwkv_train.ops.kernels`), never at import.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rwkv_train.ops import kernels

__all__ = ["wkv7_cuda"]


@torch.library.custom_op("rwkv_train::wkv7_forward", mutates_args=())
def wkv7_forward(r: Tensor, lw: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, s0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (y bf16, final state, sa = S_{t-1} a_t float32: kept for the backward)."""
    module = kernels.load("v7", r.shape[-1])
    y = kernels.new_output(r.shape, torch.bfloat16, r.device)
    sa = kernels.new_output(r.shape, torch.float32, r.device)
    s_final = kernels.new_output(s0.shape, torch.float32, r.device)
    module.forward(r, lw, k, v, a, b, s0, y, sa, s_final)
    return y, s_final, sa


@wkv7_forward.register_fake
def _(r, lw, k, v, a, b, s0):
    return torch.empty_like(r), torch.empty_like(s0), torch.empty_like(lw)


def new_gradients(r: Tensor, state_shape: torch.Size) -> tuple[Tensor, ...]:
    """A WKV-7 backward's outputs (dr, dlw, dk, dv, da, db, ds0): bf16 like r, float32 dlw and ds0."""
    dr, dk, dv, da, db = (kernels.new_output(r.shape, torch.bfloat16, r.device) for _ in range(5))
    dlw = kernels.new_output(r.shape, torch.float32, r.device)
    return dr, dlw, dk, dv, da, db, kernels.new_output(state_shape, torch.float32, r.device)


def fake_gradients(r: Tensor, lw: Tensor, state: Tensor) -> tuple[Tensor, ...]:
    """new_gradients' shapes and dtypes, for the ops' fake implementations."""
    return tuple(torch.empty_like(x) for x in (r, lw, r, r, r, r, state))


@torch.library.custom_op("rwkv_train::wkv7_backward", mutates_args=())
def wkv7_backward(
    r: Tensor, lw: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, s0: Tensor, s_final: Tensor, sa: Tensor,
    dy: Tensor, ds_final: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns the gradients of (r, lw, k, v, a, b, s0)."""
    module = kernels.load("v7", r.shape[-1])
    dr, dlw, dk, dv, da, db, ds0 = new_gradients(r, s0.shape)
    dsa = torch.empty(r.shape, dtype=torch.float32, device=r.device)  # scratch, fully written by the first pass
    x = torch.empty(r.shape, dtype=torch.float32, device=r.device)
    module.backward(r, lw, k, v, a, b, s0, s_final, sa, dy, ds_final, dr, dlw, dk, dv, da, db, ds0, dsa, x)
    return dr, dlw, dk, dv, da, db, ds0


@wkv7_backward.register_fake
def _(r, lw, k, v, a, b, s0, s_final, sa, dy, ds_final):
    return fake_gradients(r, lw, s0)


def _setup_context(ctx, inputs, output) -> None:
    r, lw, k, v, a, b, s0 = inputs
    _, s_final, sa = output
    ctx.set_materialize_grads(False)  # else the unused sa output gets a zero gradient ([B, T, H, N] float32)
    ctx.save_for_backward(r, lw, k, v, a, b, s0, s_final, sa)


def _backward(ctx, dy: Tensor | None, ds_final: Tensor | None, _dsa: Tensor | None):
    r, lw, k, v, a, b, s0, s_final, sa = ctx.saved_tensors
    dy = torch.zeros_like(r) if dy is None else dy.to(torch.bfloat16).contiguous()
    ds_final = torch.zeros_like(s0) if ds_final is None else ds_final.float().contiguous()
    return wkv7_backward(r, lw, k, v, a, b, s0, s_final, sa, dy, ds_final)


wkv7_forward.register_autograd(_backward, setup_context=_setup_context)


def kernel_inputs(
    r: Tensor, lw: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor | None
) -> tuple[Tensor, ...]:
    """(r, lw, k, v, a, b, state) as both WKV-7 kernels read them: contiguous bf16, float32 lw and state (zeros for None)."""
    B, _, H, N = r.shape
    if state is None:
        state = torch.zeros(B, H, N, N, dtype=torch.float32, device=r.device)
    r, k, v, a, b = (x.to(torch.bfloat16).contiguous() for x in (r, k, v, a, b))
    return r, lw.to(torch.float32).contiguous(), k, v, a, b, state.to(torch.float32).contiguous()


def wkv7_cuda(
    r: Tensor, lw: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """WKV-7 on the CUDA kernel. Inputs [B, T, H, N], state [B, H, N, N] or None; returns (y bf16, final state)."""
    y, s_final, _ = wkv7_forward(*kernel_inputs(r, lw, k, v, a, b, state))
    return y, s_final
