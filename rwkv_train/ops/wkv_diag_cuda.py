"""The RWKV-5 / RWKV-6 CUDA kernel (`cuda/wkv_diag.cu`) as torch custom ops, with autograd.

`wkv6_cuda(r, lw, k, v, u, state)` and `wkv5_cuda(...)` have the contract of
`rwkv_train.ops.wkv_diag.wkv_diag_recurrent`: r, k, v [B, T, H, N], u [H, N], state [B, H, N, N]
float32 in [key, value] layout (None: zeros); lw is the log-decay, [B, T, H, N] for RWKV-6 and one
[H, N] vector for every step for RWKV-5 (the kernel reads it with stride 0, nothing is expanded).
y comes back bf16, the final state float32. r, k, v travel as bf16; lw and u as float32. Gradients
reach every input and the initial state, and the final state's gradient is taken.

The ops (`rwkv_train::wkv_diag_forward`, `rwkv_train::wkv_diag_backward`) have fake
implementations, so `torch.compile` traces around them. The kernel is built on the first call.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rwkv_train.ops import kernels

__all__ = ["wkv5_cuda", "wkv6_cuda"]


@torch.library.custom_op("rwkv_train::wkv_diag_forward", mutates_args=())
def wkv_diag_forward(r: Tensor, lw: Tensor, k: Tensor, v: Tensor, u: Tensor, s0: Tensor) -> tuple[Tensor, Tensor]:
    """Returns (y bf16, final state)."""
    module = kernels.load("v6", r.shape[-1])
    y = kernels.new_output(r.shape, torch.bfloat16, r.device)
    s_final = kernels.new_output(s0.shape, torch.float32, r.device)
    module.forward(r, lw, k, v, u, s0, y, s_final)
    return y, s_final


@wkv_diag_forward.register_fake
def _(r, lw, k, v, u, s0):
    return torch.empty_like(r), torch.empty_like(s0)


@torch.library.custom_op("rwkv_train::wkv_diag_backward", mutates_args=())
def wkv_diag_backward(
    r: Tensor, lw: Tensor, k: Tensor, v: Tensor, u: Tensor, s0: Tensor, s_final: Tensor, dy: Tensor, ds_final: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns the gradients of (r, lw, k, v, u, s0); lw's and u's summed to their shapes."""
    module = kernels.load("v6", r.shape[-1])
    grads = new_gradients(r, s0.shape)
    rdrs = torch.empty(r.shape, dtype=torch.float32, device=r.device)  # scratch, fully written by the first pass
    module.backward(r, lw, k, v, u, s0, s_final, dy, ds_final, *grads, rdrs)
    return summed_gradients(lw, *grads)


def new_gradients(r: Tensor, state_shape: torch.Size) -> tuple[Tensor, ...]:
    """A diagonal-decay backward's outputs (dr, dlw per step, dk, dv, du per batch and head [B, H, N], ds0):
    bf16 like r, the rest float32."""
    B, _, H, N = r.shape
    dr, dk, dv = (kernels.new_output(r.shape, torch.bfloat16, r.device) for _ in range(3))
    dlw_steps = kernels.new_output(r.shape, torch.float32, r.device)
    du_part = kernels.new_output((B, H, N), torch.float32, r.device)
    return dr, dlw_steps, dk, dv, du_part, kernels.new_output(state_shape, torch.float32, r.device)


def summed_gradients(lw: Tensor, dr, dlw_steps, dk, dv, du_part, ds0) -> tuple[Tensor, ...]:
    """new_gradients' tensors as the op returns them: lw's and u's gradients summed to their shapes."""
    dlw = dlw_steps if lw.dim() == 4 else dlw_steps.sum(dim=(0, 1))
    return dr, dlw, dk, dv, du_part.sum(0), ds0


def fake_gradients(r: Tensor, lw: Tensor, u: Tensor, state: Tensor) -> tuple[Tensor, ...]:
    """summed_gradients' shapes and dtypes, for the ops' fake implementations."""
    return tuple(torch.empty_like(x) for x in (r, lw, r, r, u, state))


@wkv_diag_backward.register_fake
def _(r, lw, k, v, u, s0, s_final, dy, ds_final):
    return fake_gradients(r, lw, u, s0)


def _setup_context(ctx, inputs, output) -> None:
    r, lw, k, v, u, s0 = inputs
    _, s_final = output
    ctx.save_for_backward(r, lw, k, v, u, s0, s_final)


def _backward(ctx, dy: Tensor | None, ds_final: Tensor | None):
    r, lw, k, v, u, s0, s_final = ctx.saved_tensors
    dy = torch.zeros_like(r) if dy is None else dy.to(torch.bfloat16).contiguous()
    ds_final = torch.zeros_like(s0) if ds_final is None else ds_final.float().contiguous()
    return wkv_diag_backward(r, lw, k, v, u, s0, s_final, dy, ds_final)


wkv_diag_forward.register_autograd(_backward, setup_context=_setup_context)


def _run(
    r: Tensor, lw: Tensor, k: Tensor, v: Tensor, u: Tensor, state: Tensor | None, chunked: bool, split: int = 0
) -> tuple[Tensor, Tensor]:
    B, _, H, N = r.shape
    r, k, v = (x.to(torch.bfloat16).contiguous() for x in (r, k, v))
    lw, u = lw.to(torch.float32).contiguous(), u.to(torch.float32).contiguous()
    state = torch.zeros(B, H, N, N, dtype=torch.float32, device=r.device) if state is None else state
    state = state.to(torch.float32).contiguous()
    if chunked:
        from rwkv_train.ops.wkv_diag_chunked_cuda import wkv_diag_chunked_forward

        y, s_final, _ = wkv_diag_chunked_forward(r, lw, k, v, u, state, split)
        return y, s_final
    return wkv_diag_forward(r, lw, k, v, u, state)


def wkv6_cuda(
    r: Tensor, lw: Tensor, k: Tensor, v: Tensor, u: Tensor, state: Tensor | None = None, chunked: bool = False,
    split: int = 0,
) -> tuple[Tensor, Tensor]:
    """WKV-6 on a CUDA kernel: lw [B, T, H, N]. Returns (y bf16, final state float32). chunked: the
    tensor-core kernel (`rwkv_train.ops.wkv_diag_chunked_cuda`: head sizes 32 and 64, lw >= -8 per
    step; `split` its blocks per head, 1, 2 or 4 at head size 64, 0 to let it choose), else the
    sequential one."""
    if lw.shape != r.shape:
        raise ValueError(f"wkv6_cuda: lw has shape {tuple(lw.shape)}, expected {tuple(r.shape)} like r")
    return _run(r, lw, k, v, u, state, chunked, split)


def wkv5_cuda(
    r: Tensor, lw: Tensor, k: Tensor, v: Tensor, u: Tensor, state: Tensor | None = None, chunked: bool = False,
    split: int = 0,
) -> tuple[Tensor, Tensor]:
    """WKV-5 on a CUDA kernel: one lw [H, N] for every step. Returns (y bf16, final state float32).
    chunked as for wkv6_cuda."""
    if lw.shape != u.shape:
        raise ValueError(f"wkv5_cuda: lw has shape {tuple(lw.shape)}, expected {tuple(u.shape)} = [H, N] like u")
    return _run(r, lw, k, v, u, state, chunked, split)
