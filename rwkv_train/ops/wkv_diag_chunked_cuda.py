"""The chunked RWKV-5 / RWKV-6 CUDA kernel (`cuda/wkv_diag_chunked.cu`) as torch custom ops, with autograd.

`rwkv_train.ops.wkv_diag_cuda.wkv6_cuda(..., chunked=True)` (and wkv5_cuda) run it, with the contract
of the sequential kernel there: r, k, v [B, T, H, N], u [H, N], state
[B, H, N, N] float32 in [key, value] layout (None: zeros); lw is the log-decay, [B, T, H, N] for
RWKV-6 and one [H, N] for every step for RWKV-5 (read with stride 0, nothing expanded). y comes back
in bf16 and the final state in float32; every input and the initial state get a gradient, and the
final state's gradient is taken. The kernel works 16 steps at a time with every product on tensor
cores (bf16 operands, float32 accumulation); head sizes 32 and 64. Per-step log-decays below
LOG_DECAY_MIN = -8 (a decay under e^-8 = 3.4e-4 per step) are taken as -8, with zero gradient there:
what that leaves of the older state is below bf16's resolution beside the newer terms.

The forward also returns the state at the start of every chunk in bf16 ([B, H, ceil(T/16), N, N]),
which the backward reads instead of recomputing the forward. The extension is built (or loaded from
the cache) at the first call.

Where one block per (batch, head) would leave multiprocessors idle (B = 1 at long T), each head's
value columns are split over `split` blocks (2 or 4; a thread block cluster in the backward, so
compute capability 9.0 or later), chosen as for the chunked RWKV-7 kernel (`value_split`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rwkv_train.ops import kernels
from rwkv_train.ops.wkv7_chunked_cuda import blocks_per_head
from rwkv_train.ops.wkv_diag_cuda import fake_gradients, new_gradients, summed_gradients

__all__ = ["CHUNK_LEN", "LOG_DECAY_MIN", "wkv_diag_chunked_forward"]

CHUNK_LEN = 16  # L in cuda/wkv_chunk_tiles.cuh (the kernel checks the saved states' shape)
LOG_DECAY_MIN = -8.0  # LW_MIN in cuda/wkv_diag_chunked.cu
GENERATION = "v6-chunked"  # kernels.SOURCES' name for it; RWKV-5 runs the same build


def _n_chunks(T: int) -> int:  # T may be a symbolic size under torch.compile
    return (T + CHUNK_LEN - 1) // CHUNK_LEN


@torch.library.custom_op("rwkv_train::wkv_diag_chunked_forward", mutates_args=())
def wkv_diag_chunked_forward(
    r: Tensor, lw: Tensor, k: Tensor, v: Tensor, u: Tensor, s0: Tensor, split: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (y bf16, final state float32, chunk start states bf16: kept for the backward). split: blocks
    per head, 0 for value_split's choice."""
    B, T, H, N = r.shape
    module = kernels.load(GENERATION, N)
    y = kernels.new_output(r.shape, torch.bfloat16, r.device)
    s_final = kernels.new_output(s0.shape, torch.float32, r.device)
    states = kernels.new_output((B, H, _n_chunks(T), N, N), torch.bfloat16, r.device)
    split = blocks_per_head(module, r, split)
    module.forward(*map(kernels.aligned, (r, lw, k, v)), u, kernels.aligned(s0), y, s_final, states, split)
    return y, s_final, states


@wkv_diag_chunked_forward.register_fake
def _(r, lw, k, v, u, s0, split):
    B, T, H, N = r.shape
    return torch.empty_like(r), torch.empty_like(s0), r.new_empty((B, H, _n_chunks(T), N, N))


@torch.library.custom_op("rwkv_train::wkv_diag_chunked_backward", mutates_args=())
def wkv_diag_chunked_backward(
    r: Tensor, lw: Tensor, k: Tensor, v: Tensor, u: Tensor, states: Tensor, dy: Tensor, ds_final: Tensor, split: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns the gradients of (r, lw, k, v, u, s0); lw's and u's summed to their shapes."""
    module = kernels.load(GENERATION, r.shape[-1])
    grads = new_gradients(r, ds_final.shape)
    read = map(kernels.aligned, (r, lw, k, v))
    module.backward(*read, u, *map(kernels.aligned, (states, dy, ds_final)), *grads, blocks_per_head(module, r, split))
    return summed_gradients(lw, *grads)


@wkv_diag_chunked_backward.register_fake
def _(r, lw, k, v, u, states, dy, ds_final, split):
    return fake_gradients(r, lw, u, ds_final)


def _setup_context(ctx, inputs, output) -> None:
    ctx.set_materialize_grads(False)  # else the unused states output gets a zero gradient (as large as y)
    ctx.split = inputs[6]
    ctx.save_for_backward(*inputs[:5], output[2])


def _backward(ctx, dy: Tensor | None, ds_final: Tensor | None, _dstates: Tensor | None):
    r, lw, k, v, u, states = ctx.saved_tensors
    B, _, H, N = r.shape
    dy = torch.zeros_like(r) if dy is None else dy.to(torch.bfloat16).contiguous()
    ds_final = r.new_zeros((B, H, N, N), dtype=torch.float32) if ds_final is None else ds_final.float().contiguous()
    return *wkv_diag_chunked_backward(r, lw, k, v, u, states, dy, ds_final, ctx.split), None


wkv_diag_chunked_forward.register_autograd(_backward, setup_context=_setup_context)
