"""The chunked RWKV-7 CUDA kernel (`cuda/wkv7_chunked.cu`) as torch custom ops, with autograd.

`wkv7_chunked_cuda(r, lw, k, v, a, b, state)` has the contract of `rwkv_train.ops.wkv7_cuda.wkv7_cuda`
(the sequential kernel): inputs [B, T, H, N], state [B, H, N, N] float32 in [value, key] layout (None:
zeros); y comes back in bf16 and the final state in float32; every input and the initial state get a
gradient, and the final state's gradient is taken. It works 16 steps at a time with the products on
tensor cores (bf16 operands, float32 accumulation) and the recurrences in float32; head sizes 32 and
64. Per-step log-decays below LOG_DECAY_MIN = -5 (a decay under e^-5 = 0.0067 per step) are taken
as -5, with zero gradient there; RWKV-7 makes lw in (-0.61, 0), so the model is never clamped.

The forward also returns what the backward reads instead of recomputing the forward: the state at
the start of every chunk ([B, H, ceil(T/16), N, N] bf16, T N^2 / 8 bytes per head) and
sa = S_{t-1} a_t ([B, T, H, N] bf16, T N 2 bytes per head), as its products took them: at N = 64
2.5 times the float32 `sa` the sequential kernel keeps. The extension is built (or loaded from the
cache) at the first call.

One block of the kernel walks one (batch, head) through T, so B * H blocks; where that leaves
multiprocessors idle (B = 1 at long T: 64 heads on 132 of an H100), each head's value rows are split
over `split` blocks (2 or 4; a thread block cluster in the backward, so compute capability 9.0 or
later). `split=0` (the default) picks it with `value_split`; the result does not depend on it beyond
float32 summation order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rwkv_train.ops import kernels
from rwkv_train.ops.wkv7_cuda import fake_gradients, kernel_inputs, new_gradients

__all__ = ["CHUNK_LEN", "LOG_DECAY_MIN", "blocks_per_head", "value_split", "wkv7_chunked_cuda"]

CHUNK_LEN = 16  # L in cuda/wkv7_chunked.cu (the kernel checks the saved states' shape)
LOG_DECAY_MIN = -5.0  # LW_MIN there


def _n_chunks(T: int) -> int:  # T may be a symbolic size under torch.compile
    return (T + CHUNK_LEN - 1) // CHUNK_LEN


def value_split(batch_heads: int, splits: Sequence[int], multiprocessors: int) -> int:
    """Blocks per head: the fewest of `splits` (ascending, starting at 1) that give every multiprocessor
    a block (batch_heads * split >= multiprocessors), else the most. Splitting duplicates each head's
    key-side work (the factors, M) in every block, so it only pays where blocks would be missing."""
    for split in splits:
        if batch_heads * split >= multiprocessors:
            return split
    return splits[-1]


def blocks_per_head(module, r: Tensor, asked: int) -> int:
    """The split to run with: `asked`, or for 0 value_split on r's device (1 before compute capability 9.0,
    which has no thread block clusters, and off CUDA)."""
    if asked:
        return asked
    if r.device.type != "cuda" or torch.cuda.get_device_capability(r.device)[0] < 9:
        return 1
    B, _, H, _ = r.shape
    return value_split(B * H, list(module.splits), torch.cuda.get_device_properties(r.device).multi_processor_count)


@torch.library.custom_op("rwkv_train::wkv7_chunked_forward", mutates_args=())
def wkv7_chunked_forward(
    r: Tensor, lw: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, s0: Tensor, split: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (y bf16, final state float32, and kept for the backward: chunk start states bf16, sa bf16).
    split: blocks per head, 0 for value_split's choice."""
    B, T, H, N = r.shape
    module = kernels.load("v7-chunked", N)
    y = kernels.new_output(r.shape, torch.bfloat16, r.device)
    s_final = kernels.new_output(s0.shape, torch.float32, r.device)
    states = kernels.new_output((B, H, _n_chunks(T), N, N), torch.bfloat16, r.device)
    sa = kernels.new_output(r.shape, torch.bfloat16, r.device)
    split = blocks_per_head(module, r, split)
    module.forward(*map(kernels.aligned, (r, lw, k, v, a, b, s0)), y, s_final, states, sa, split)
    return y, s_final, states, sa


@wkv7_chunked_forward.register_fake
def _(r, lw, k, v, a, b, s0, split):
    B, T, H, N = r.shape
    return torch.empty_like(r), torch.empty_like(s0), r.new_empty((B, H, _n_chunks(T), N, N)), torch.empty_like(r)


@torch.library.custom_op("rwkv_train::wkv7_chunked_backward", mutates_args=())
def wkv7_chunked_backward(
    r: Tensor, lw: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, states: Tensor, sa: Tensor, dy: Tensor,
    ds_final: Tensor, split: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns the gradients of (r, lw, k, v, a, b, s0)."""
    module = kernels.load("v7-chunked", r.shape[-1])
    dr, dlw, dk, dv, da, db, ds0 = new_gradients(r, ds_final.shape)
    split = blocks_per_head(module, r, split)
    read = map(kernels.aligned, (r, lw, k, v, a, b, states, sa, dy, ds_final))
    module.backward(*read, dr, dlw, dk, dv, da, db, ds0, split)
    return dr, dlw, dk, dv, da, db, ds0


@wkv7_chunked_backward.register_fake
def _(r, lw, k, v, a, b, states, sa, dy, ds_final, split):
    return fake_gradients(r, lw, ds_final)


def _setup_context(ctx, inputs, output) -> None:
    r, lw, k, v, a, b, _, ctx.split = inputs
    ctx.set_materialize_grads(False)  # else the unused saved outputs get zero gradients (1 GB at B*T*C = 2^27)
    ctx.save_for_backward(r, lw, k, v, a, b, *output[2:])


def _backward(ctx, dy: Tensor | None, ds_final: Tensor | None, _dstates: Tensor | None, _dsa: Tensor | None):
    r, lw, k, v, a, b, states, sa = ctx.saved_tensors
    B, _, H, N = r.shape
    dy = torch.zeros_like(r) if dy is None else dy.to(torch.bfloat16).contiguous()
    ds_final = r.new_zeros((B, H, N, N), dtype=torch.float32) if ds_final is None else ds_final.float().contiguous()
    return *wkv7_chunked_backward(r, lw, k, v, a, b, states, sa, dy, ds_final, ctx.split), None


wkv7_chunked_forward.register_autograd(_backward, setup_context=_setup_context)


def wkv7_chunked_cuda(
    r: Tensor, lw: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor | None = None, split: int = 0
) -> tuple[Tensor, Tensor]:
    """WKV-7 on the chunked kernel. Inputs [B, T, H, N], state [B, H, N, N] or None; returns (y bf16, final state).
    split: blocks per head (1, 2, or 4 at head size 64), 0 to let value_split choose."""
    y, s_final, *_ = wkv7_chunked_forward(*kernel_inputs(r, lw, k, v, a, b, state), split)
    return y, s_final
