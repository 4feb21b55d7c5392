"""The chunked RWKV-5/6 op's Python side, on the CPU: custom ops, autograd, model plumbing.

`kernels.load("v6-chunked", N)` is pointed at the CPU emulation of cuda/wkv_diag_chunked.cu (the real
kernel code, tests/cuda_on_cpu.py), so the op wrapper (`rwkv_train.ops.wkv_diag_chunked_cuda`, reached
through `wkv5_cuda` / `wkv6_cuda` with chunked=True), its saved chunk states and gradients, and whole
RWKV-5 and RWKV-6 models with `wkv_diag_chunked: true` are checked against float64 references without
a GPU.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from rwkv_train.config import ModelConfig
from rwkv_train.models import build_model
from rwkv_train.ops import kernels
from rwkv_train.ops.wkv_diag import wkv_diag_recurrent
from rwkv_train.ops.wkv_diag_chunked_cuda import CHUNK_LEN, LOG_DECAY_MIN
from rwkv_train.ops.wkv_diag_cuda import wkv5_cuda, wkv6_cuda
from tests import cuda_on_cpu
from tests.conftest import model_gradient_errors, rel_error, zero_filled_shapes
from tests.test_wkv_diag_chunked_emulated import TOL, model_like_inputs

pytestmark = pytest.mark.skipif(cuda_on_cpu.compiler_problem() is not None, reason=str(cuda_on_cpu.compiler_problem()))


@pytest.fixture
def emulated(monkeypatch):
    """kernels.load("v6-chunked", N) returns the CPU emulation; records which kernels were asked for."""
    return cuda_on_cpu.emulate(monkeypatch, "v6-chunked", cuda_on_cpu.WkvDiagChunkedModule)


def test_python_constants_match_the_kernel(emulated):
    module = kernels.load("v6-chunked", 64)
    assert (module.chunk_len, module.log_decay_min) == (CHUNK_LEN, LOG_DECAY_MIN)


@pytest.mark.parametrize("split", [0, 2], ids=["own-choice", "split2"])
@pytest.mark.parametrize("version", ["v5", "v6"])
@pytest.mark.parametrize("uses", ["y and state", "y only", "state only"])
def test_op_gradients_match_float64_autograd(emulated, uses, version, split):
    """Through the custom ops and their autograd: a loss of y, of the final state, or of both; RWKV-5's lw
    [H, N] gets the per-step gradients summed, u its sum over the batch; with the op's choice of blocks
    per head (one, off CUDA) and with each head's value columns split over two."""
    B, T, H, N = 2, 37, 2, 32
    inputs = model_like_inputs(B, T, H, N, seed=21, v5=version == "v5")
    s0 = 0.5 * torch.randn(B, H, N, N, generator=torch.Generator().manual_seed(22))
    g = torch.Generator().manual_seed(23)
    wy, ws = torch.randn(B, T, H, N, generator=g), torch.randn(B, H, N, N, generator=g)

    def loss(y, s):
        return (y.double() * wy).sum() * (uses != "state only") + (s.double() * ws).sum() * (uses != "y only")

    leaves = [x.float().clone().requires_grad_() for x in (*inputs, s0)]  # the wrapper casts to the kernel's dtypes
    op = wkv5_cuda if version == "v5" else wkv6_cuda
    with kernels.poisoned_outputs():
        y, s = op(*leaves, chunked=True, split=split)
        loss(y, s).backward()
    ref = [x.detach().double().requires_grad_() for x in (*inputs, s0)]
    r, lw, k, v, u, s_ref0 = ref
    y_ref, s_ref = wkv_diag_recurrent(r, lw.expand(B, T, H, N) if version == "v5" else lw, k, v, u, s_ref0)
    loss(y_ref, s_ref).backward()

    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert rel_error(y, y_ref) < TOL and rel_error(s, s_ref) < TOL
    for name, got, want in zip(["r", "lw", "k", "v", "u", "state"], leaves, ref):
        assert got.grad.shape == want.grad.shape
        err = rel_error(got.grad, want.grad)
        assert err < TOL, f"d{name}: relative error {err:.2e}"
    assert set(emulated) == {("v6-chunked", N)}


def test_an_unsupported_split_is_refused_by_the_op(emulated):
    inputs = model_like_inputs(1, 5, 1, 32, seed=5)
    with pytest.raises(ValueError, match="split 4 is not one of"):
        wkv6_cuda(*inputs, chunked=True, split=4)  # head size 32: 8 value columns per block is not a whole tile


def test_backward_fills_no_gradient_for_the_saved_states(emulated):
    """The forward's third output (the chunk start states) is saved for the backward and never
    differentiated: autograd must not zero-fill a gradient for it."""
    B, T, H, N = 1, 40, 2, 32
    leaves = [x.clone().requires_grad_() for x in model_like_inputs(B, T, H, N, seed=41)]
    y, _ = wkv6_cuda(*leaves, chunked=True)
    filled = zero_filled_shapes(lambda: y.float().sum().backward())
    states_shape = [B, H, math.ceil(T / CHUNK_LEN), N, N]
    assert states_shape not in filled, f"a zero gradient was made for the saved states: {filled}"
    assert all(x.grad is not None for x in leaves)


@pytest.mark.parametrize("v5", [False, True], ids=["v6", "v5"])
def test_views_that_start_unaligned_give_the_same_result(emulated, v5):
    """Views of r, lw, k, v (RWKV-6's lw per step, RWKV-5's per head), the state and dy that start
    unaligned are copied to aligned ones."""
    inputs = model_like_inputs(1, 20, 2, 32, seed=51, v5=v5)
    op = torch.ops.rwkv_train
    cuda_on_cpu.assert_unaligned_views_change_nothing(op.wkv_diag_chunked_forward, op.wkv_diag_chunked_backward, inputs)


def test_state_carried_across_calls_equals_one_call(emulated):
    """Chunked BPTT: two calls with the state handed over give one call's outputs (T split mid-chunk)."""
    inputs = model_like_inputs(1, 45, 2, 32, seed=31)
    u = inputs[4]
    y_all, s_all = wkv6_cuda(*inputs, chunked=True)
    y1, s1 = wkv6_cuda(*(x[:, :21].contiguous() for x in inputs[:4]), u, chunked=True)
    y2, s2 = wkv6_cuda(*(x[:, 21:].contiguous() for x in inputs[:4]), u, state=s1, chunked=True)
    assert rel_error(torch.cat([y1, y2], 1), y_all) < 1e-2
    assert rel_error(s2, s_all) < 1e-2


class _BF16Gradient(torch.autograd.Function):
    """The identity, whose backward rounds the gradient to bf16: what a bf16 kernel does to dy."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad.to(torch.bfloat16).to(grad.dtype)


def _with_bf16_inputs(wkv):
    """`wkv` (the PyTorch backend) seeing r, k, v and dy rounded to bf16, as every bf16 kernel does; all
    else in the caller's precision."""

    def rounded(r, lw, k, v, u, state=None, **kwargs):
        def bf16(x):
            return x.to(torch.bfloat16).to(x.dtype)

        y, s = wkv(bf16(r), lw, bf16(k), bf16(v), u, state, **kwargs)
        return _BF16Gradient.apply(y), s

    return rounded


@pytest.mark.parametrize("version", ["v5", "v6"])
def test_model_with_the_chunked_kernel_matches_the_torch_backend(emulated, monkeypatch, version):
    """A 2-layer RWKV-5 / RWKV-6 with `wkv_diag_chunked: true` and kernel cuda, run on the emulation (CPU
    tensors count as the chunked kernel's): loss and every parameter gradient against the same model on
    the PyTorch backend in float64, whose WKV sees its inputs and dy rounded to bf16 as the kernel's do.

    Without that rounding the reference itself moves: in float64, rounding only the WKV's r, k, v and dy
    to bf16 changes this RWKV-5's second-layer bonus (time_faaaa) gradient by 12% and RWKV-6's first by
    2.7% (sums of terms that mostly cancel), which no bf16 kernel can do better than. With it, what is
    left is the kernel's own bf16 operands; the bound per parameter catches a gradient that is wrong."""
    import rwkv_train.ops.wkv_diag as wkv_diag_module

    real_use_cuda = kernels.use_cuda
    monkeypatch.setattr(kernels, "use_cuda",
                        lambda kernel, gen, x, n=None: gen == "v6-chunked" or real_use_cuda(kernel, gen, x, n))
    cfg = ModelConfig(version=version, n_layer=2, n_embd=64, head_size=32, vocab_size=61, kernel="cuda",
                      wkv_diag_chunked=True)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    reference = build_model(dataclasses.replace(cfg, kernel="torch", wkv_diag_chunked=False))
    reference.load_state_dict(model.state_dict())
    reference.double()

    # The model only calls the chunked kernel, the reference only the PyTorch backend, so one patch does.
    monkeypatch.setattr(wkv_diag_module, "wkv_diag_chunked", _with_bf16_inputs(wkv_diag_module.wkv_diag_chunked))
    idx = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(1))
    losses, worst, overall = model_gradient_errors(model, reference, idx)
    assert emulated and all(call == ("v6-chunked", 32) for call in emulated)
    assert math.isclose(losses[0], losses[1], rel_tol=2e-3), losses
    assert worst[0] < 5e-2, f"largest relative gradient error {worst[0]:.2e} in {worst[1]}"
    assert overall < 1e-2
