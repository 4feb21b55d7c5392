"""RWKV-4 WKV on the GPU: the kernel in `cuda/wkv4.cu` as torch custom ops.

`wkv4_cuda` has the contract of `rwkv_train.ops.wkv4.wkv4_chunked`: same outputs and gradients
(w, u, k, v and the whole initial state; the final state's exponent pp is differentiable), for any
B, T >= 1 and C. k and v go to the kernel in bf16 and y comes back in bf16; everything else, the
arithmetic included, is float32.

Two ops, `rwkv_train::wkv4_forward` and `rwkv_train::wkv4_backward`, each with a fake (shape-only)
implementation, so torch.compile keeps them as opaque calls. The forward also returns the state
before every chunk of CHECKPOINT_EVERY tokens, and which token set the final exponent pp; the
backward recomputes each chunk from its checkpoint instead of keeping the state at every token. The
extension is built (or loaded from the cache) at the first call, never at import.

The final pp is max(pp0 + T w, max_t k_t + (T-1-t) w). Its gradient goes to the token that set it (the
first one on a tie) and to w, or to pp0 and w when no token beats pp0 + T w.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rwkv_train.ops import kernels
from rwkv_train.ops.wkv4 import Wkv4State, _check_inputs, zero_wkv4_state

__all__ = ["CHECKPOINT_EVERY", "wkv4_cuda"]

# Tokens between the forward's saved states: kChunk in cuda/wkv4.cu (the kernel checks the buffer shape).
CHECKPOINT_EVERY = 16


def _n_checkpoints(T: int) -> int:  # T may be a symbolic size under torch.compile
    return (T + CHECKPOINT_EVERY - 1) // CHECKPOINT_EVERY


@torch.library.custom_op("rwkv_train::wkv4_forward", mutates_args=())
def _wkv4_forward(
    w: Tensor, u: Tensor, k: Tensor, v: Tensor, aa0: Tensor, bb0: Tensor, pp0: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """y [B, T, C] bf16; the final (aa, bb, pp) [B, C]; the token that set pp [B, C] int32 (-1: pp0);
    the checkpoints [B, ceil(T/16), 3, C]."""
    B, T, C = k.shape
    y = kernels.new_output((B, T, C), torch.bfloat16, k.device)
    aa, bb, pp = (kernels.new_output((B, C), torch.float32, k.device) for _ in range(3))
    arg = torch.empty((B, C), dtype=torch.int32, device=k.device)
    checkpoints = kernels.new_output((B, _n_checkpoints(T), 3, C), torch.float32, k.device)
    kernels.load("v4").forward(w, u, k, v, aa0, bb0, pp0, y, aa, bb, pp, arg, checkpoints)
    return y, aa, bb, pp, arg, checkpoints


@_wkv4_forward.register_fake
def _(w, u, k, v, aa0, bb0, pp0):
    B, T, C = k.shape
    y, checkpoints = k.new_empty((B, T, C)), aa0.new_empty((B, _n_checkpoints(T), 3, C))
    per_row = [aa0.new_empty((B, C)) for _ in range(3)]
    return y, *per_row, aa0.new_empty((B, C), dtype=torch.int32), checkpoints


@torch.library.custom_op("rwkv_train::wkv4_backward", mutates_args=())
def _wkv4_backward(
    w: Tensor, u: Tensor, k: Tensor, v: Tensor, checkpoints: Tensor, arg: Tensor, g_p: Tensor, gy: Tensor,
    g_aa: Tensor, g_bb: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of w and u per batch row [B, C], of k and v [B, T, C] bf16, of the initial (aa, bb) [B, C].

    g_p [B, C] is the gradient that reaches the final exponent pp; it joins dk at token `arg`. Its parts
    through w and pp0 are not included.
    """
    B, T, C = k.shape
    gw, gu = (kernels.new_output((B, C), torch.float32, k.device) for _ in range(2))
    gk, gv = (kernels.new_output((B, T, C), torch.bfloat16, k.device) for _ in range(2))
    g_aa0, g_bb0 = (kernels.new_output((B, C), torch.float32, k.device) for _ in range(2))
    kernels.load("v4").backward(w, u, k, v, checkpoints, arg, g_p, gy, g_aa, g_bb, gw, gu, gk, gv, g_aa0, g_bb0)
    return gw, gu, gk, gv, g_aa0, g_bb0


@_wkv4_backward.register_fake
def _(w, u, k, v, checkpoints, arg, g_p, gy, g_aa, g_bb):
    def per_row() -> Tensor:  # [B, C] float32, like g_p
        return g_p.new_empty(g_p.shape)

    return per_row(), per_row(), k.new_empty(k.shape), v.new_empty(v.shape), per_row(), per_row()


def _setup_context(ctx, inputs, output) -> None:
    w, u, k, v, aa0, bb0, _ = inputs
    _, aa, bb, _, arg, checkpoints = output
    ctx.save_for_backward(w, u, k, v, aa0, bb0, aa, bb, arg, checkpoints)
    ctx.mark_non_differentiable(arg, checkpoints)
    ctx.set_materialize_grads(False)  # else autograd zero-fills the checkpoints' gradient ([B, T/16, 3, C]) each step


def _backward(ctx, gy: Tensor, g_aa: Tensor, g_bb: Tensor, g_pp: Tensor, _g_arg: Tensor, _g_checkpoints: Tensor):
    w, u, k, v, aa0, bb0, aa, bb, arg, checkpoints = ctx.saved_tensors
    # unused outputs' gradients come as None; an expanded (stride-0) gradient needs a real copy
    gy = torch.zeros_like(k) if gy is None else gy.to(torch.bfloat16).contiguous()
    g_aa = torch.zeros_like(aa) if g_aa is None else g_aa.float().contiguous()
    g_bb = torch.zeros_like(bb) if g_bb is None else g_bb.float().contiguous()
    g_pp = torch.zeros_like(aa) if g_pp is None else g_pp.float()
    # (aa, bb, pp) stands for (aa, bb) e^pp: pp is a scale on the sums, and a function of w, k and pp0
    # through the token `arg` that set it.
    g_p = (g_pp - g_aa * aa - g_bb * bb).contiguous()
    gw, gu, gk, gv, g_aa0, g_bb0 = _wkv4_backward(w, u, k, v, checkpoints, arg, g_p, gy, g_aa, g_bb)
    from_pp0 = arg < 0
    steps = torch.where(from_pp0, k.shape[1], k.shape[1] - 1 - arg)  # pp = (pp0 or k_arg) + steps * w
    g_pp0 = g_aa0 * aa0 + g_bb0 * bb0 + torch.where(from_pp0, g_p, 0.0)
    return gw.sum(0) + (g_p * steps).sum(0), gu.sum(0), gk, gv, g_aa0, g_bb0, g_pp0


_wkv4_forward.register_autograd(_backward, setup_context=_setup_context)


def wkv4_cuda(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: Wkv4State | None = None) -> tuple[Tensor, Wkv4State]:
    """WKV-4 by the CUDA kernel, a drop-in for `wkv4_chunked`. w = -exp(time_decay), u: [C]; k, v: [B, T, C].

    state: (aa, bb, pp) [B, C] each, or None for the zero state. Returns y [B, T, C] in bf16 and the
    final (aa, bb, pp) in float32. Differentiable w.r.t. every input (once).
    """
    _check_inputs(w, u, k, v, state)
    B, T, C = k.shape
    aa0, bb0, pp0 = zero_wkv4_state(B, C, k.device) if state is None else (x.float().contiguous() for x in state)
    if T == 0:
        return k.new_zeros((B, 0, C), dtype=torch.bfloat16), (aa0, bb0, pp0)
    w, u = w.float().contiguous(), u.float().contiguous()
    k, v = k.to(torch.bfloat16).contiguous(), v.to(torch.bfloat16).contiguous()
    y, aa, bb, pp, _, _ = _wkv4_forward(w, u, k, v, aa0, bb0, pp0)
    return y, (aa, bb, pp)
