"""The v4 CUDA op's Python side on any machine: the custom ops and the gradient assembly around them.

The kernel returns the final exponent pp and the token that set it, and its backward leaves pp's
gradient through w and pp0 to the wrapper (`rwkv_train.ops.wkv4_cuda._backward`). Here the compiled
module is replaced by a float64 stand-in that follows the kernel's contract (cuda/wkv4.cu: its
outputs, checkpoints every 16 tokens, per-batch-row dw and du, g_p added to dk at that token), so the
wrapper's outputs and every gradient are checked against autograd of `wkv4_recurrent` without CUDA.
The kernel itself is checked against the same reference on the GPU (tests/test_kernels_cuda.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from rwkv_train.ops import kernels
from rwkv_train.ops.wkv4 import wkv4_recurrent
from rwkv_train.ops.wkv4_cuda import CHECKPOINT_EVERY, wkv4_cuda
from tests.conftest import zero_filled_shapes

B, C = 2, 6


def _read_out(A, Bs, P, u, k, v):
    o = torch.maximum(P, u + k)
    e1, e2 = torch.exp(P - o), torch.exp(u + k - o)
    inv_den = 1 / (e1 * Bs + e2)
    return e1, e2, inv_den, (e1 * A + e2 * v) * inv_den


def _take_in(P, w, k):
    kept = P + w
    top = torch.maximum(kept, k)
    return torch.exp(kept - top), torch.exp(k - top), top, k > kept


class KernelStandIn:
    """cuda/wkv4.cu's `forward` and `backward` in float64, token by token, writing into the given outputs."""

    def forward(self, w, u, k, v, aa0, bb0, pp0, y, aa, bb, pp, arg, checkpoints):
        w, u, k, v = w.double(), u.double(), k.double(), v.double()
        A, Bs, P = aa0.double(), bb0.double(), pp0.double()
        top = torch.full(A.shape, -1, dtype=torch.int32)
        for t in range(k.shape[1]):
            if t % CHECKPOINT_EVERY == 0:
                checkpoints[:, t // CHECKPOINT_EVERY] = torch.stack([A, Bs, P], 1).float()
            y[:, t] = _read_out(A, Bs, P, u, k[:, t], v[:, t])[3].to(y.dtype)
            f1, f2, P_next, sets = _take_in(P, w, k[:, t])
            top = torch.where(sets, t, top)
            A, Bs, P = f1 * A + f2 * v[:, t], f1 * Bs + f2, P_next
        aa.copy_(A), bb.copy_(Bs), pp.copy_(P), arg.copy_(top)

    def backward(self, w, u, k, v, checkpoints, arg, g_p, gy, g_aa, g_bb, gw, gu, gk, gv, g_aa0, g_bb0):
        w, u, k, v, gy = w.double(), u.double(), k.double(), v.double(), gy.double()
        T = k.shape[1]
        GA, GB = g_aa.double(), g_bb.double()
        dw, du = torch.zeros_like(GA), torch.zeros_like(GA)
        for j in reversed(range(math.ceil(T / CHECKPOINT_EVERY))):
            A, Bs, P = checkpoints[:, j].double().unbind(1)
            states = {}
            for t in range(j * CHECKPOINT_EVERY, min(T, (j + 1) * CHECKPOINT_EVERY)):
                states[t] = (A, Bs, P)
                f1, f2, P, _ = _take_in(P, w, k[:, t])
                A, Bs = f1 * A + f2 * v[:, t], f1 * Bs + f2
            for t in sorted(states, reverse=True):
                A, Bs, P = states[t]
                e1, e2, inv_den, yt = _read_out(A, Bs, P, u, k[:, t], v[:, t])
                f1, f2, _, _ = _take_in(P, w, k[:, t])
                gd = gy[:, t] * inv_den
                g_bonus = gd * e2 * (v[:, t] - yt)
                gv[:, t] = (f2 * GA + gd * e2).to(gv.dtype)
                gk[:, t] = (f2 * (GA * v[:, t] + GB) + g_bonus + torch.where(arg == t, g_p.double(), 0.0)).to(gk.dtype)
                du += g_bonus
                dw += f1 * (GA * A + GB * Bs)
                GA, GB = f1 * GA + gd * e1, f1 * GB - gd * yt * e1
        gw.copy_(dw), gu.copy_(du), g_aa0.copy_(GA), g_bb0.copy_(GB)


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(kernels, "load", lambda generation, head_size=None: KernelStandIn())


def _inputs(T: int, pp0_on_top: bool, seed: int) -> list[torch.Tensor]:
    """w, u, k, v, aa0, bb0, pp0; k and v bf16-exact. pp0_on_top: pp0 beats every token for some channels."""
    g = torch.Generator().manual_seed(seed)
    w = -torch.exp(torch.rand(C, generator=g, dtype=torch.float64) * 4 - 5)  # slow decays: pp0 + T w stays large
    u = math.log(0.3) + 0.5 * torch.randn(C, generator=g, dtype=torch.float64)
    k = (2 * torch.randn(B, T, C, generator=g, dtype=torch.float64)).clamp(-5, 5).bfloat16().double()
    v = torch.randn(B, T, C, generator=g, dtype=torch.float64).bfloat16().double()
    bb0 = 1 + torch.rand(B, C, generator=g, dtype=torch.float64)
    aa0 = bb0 * 0.5 * torch.randn(B, C, generator=g, dtype=torch.float64)
    pp0 = torch.randn(B, C, generator=g, dtype=torch.float64)
    if pp0_on_top:
        pp0[:, ::2] += 20.0  # every other channel: no token reaches pp0 + T w
    return [w, u, k, v, aa0, bb0, pp0]


def _outputs_and_grads(fn, inputs, cotangent_seed: int):
    leaves = [x.clone().requires_grad_() for x in inputs]
    y, (aa, bb, pp) = fn(*leaves[:4], tuple(leaves[4:]))
    outputs = [y, aa, bb, pp]
    g = torch.Generator().manual_seed(cotangent_seed)
    cotangents = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outputs]
    grads = torch.autograd.grad(outputs, leaves, cotangents)
    return [o.detach().double() for o in outputs], [gr.double() for gr in grads]


@pytest.mark.parametrize("T", [7, 40])
@pytest.mark.parametrize("pp0_on_top", [False, True], ids=["token-sets-pp", "pp0-sets-pp"])
def test_wrapper_matches_reference_outputs_and_gradients(stand_in, T, pp0_on_top):
    inputs = _inputs(T, pp0_on_top, seed=T + 10 * pp0_on_top)
    outs, grads = _outputs_and_grads(wkv4_cuda, inputs, cotangent_seed=1)
    ref_outs, ref_grads = _outputs_and_grads(wkv4_recurrent, inputs, cotangent_seed=1)

    if pp0_on_top:  # the case is what it says: pp0 + T w is the final exponent for those channels
        torch.testing.assert_close(outs[3][:, ::2], inputs[6][:, ::2] + T * inputs[0][::2], rtol=1e-6, atol=1e-5)
    names = ["y", "aa", "bb", "pp", "dw", "du", "dk", "dv", "daa0", "dbb0", "dpp0"]
    for name, out, ref in zip(names, outs + grads, ref_outs + ref_grads):
        err = ((out - ref).norm() / ref.norm()).item()
        assert err < 1e-2, f"{name}: relative error {err:.2e} against autograd of wkv4_recurrent"


def test_y_alone_and_no_zero_filled_gradient_for_the_checkpoints(stand_in):
    """A loss of y alone: the unused final state's gradients arrive as None and the wrapper makes them,
    and autograd zero-fills nothing for the checkpoints, which are saved for the backward only."""
    T = 40
    inputs = _inputs(T, pp0_on_top=False, seed=3)
    cotangent = torch.randn(B, T, C, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    grads = []
    for fn in (wkv4_cuda, wkv4_recurrent):
        leaves = [x.clone().requires_grad_() for x in inputs]
        y, _ = fn(*leaves[:4], tuple(leaves[4:]))
        filled = zero_filled_shapes(lambda: torch.autograd.backward(y, cotangent.to(y.dtype)))
        grads.append([x.grad.double() for x in leaves])
        if fn is wkv4_cuda:
            assert [B, math.ceil(T / CHECKPOINT_EVERY), 3, C] not in filled, filled
    for name, got, want in zip(["dw", "du", "dk", "dv", "daa0", "dbb0", "dpp0"], *grads):
        err = ((got - want).norm() / want.norm()).item()
        assert err < 1e-2, f"{name}: relative error {err:.2e}"
