"""cuda/wkv7_chunked.cu run on the CPU (tests/cuda_cpu), against the float64 recurrence.

The chunked kernel's arithmetic, indexing, padding and barriers are the same code that nvcc builds;
only the threads are std::threads and the wmma tiles are computed exactly. Every output and gradient
is compared with autograd of `wkv7_recurrent` in float64, at the GPU tests' tolerance, with outputs
poisoned (NaN) before each call. What this cannot check (speed, the real tensor-core fragments,
register limits) is left to tests/test_kernels_cuda.py on a GPU and `make cuda-check`.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from rwkv_train.ops.wkv7 import wkv7_recurrent
from tests import cuda_on_cpu
from tests.conftest import assert_errors_within, error_summary_fixture, rel_error

pytestmark = pytest.mark.skipif(cuda_on_cpu.compiler_problem() is not None, reason=str(cuda_on_cpu.compiler_problem()))

TOL = 1e-2  # as tests/test_kernels_cuda.py: every input and y pass through bf16
GRADS = ("dr", "dlw", "dk", "dv", "da", "db", "ds0")


_WORST: dict[str, float] = {}  # quantity -> largest relative error over this module's comparisons


error_summary = error_summary_fixture("chunked WKV-7 kernel (CPU emulation) vs float64", _WORST)


@pytest.fixture(scope="module", params=[32, 64], ids=lambda n: f"N{n}")
def kernel(request) -> cuda_on_cpu.Wkv7ChunkedOnCpu:
    return cuda_on_cpu.Wkv7ChunkedOnCpu(request.param)


def model_like_inputs(B: int, T: int, H: int, N: int, seed: int, lw: Tensor | None = None) -> list[Tensor]:
    """r, lw, k, v, a, b shaped as the model makes them (a = -kk, b = kk * gate, lw in (-0.61, 0))."""
    g = torch.Generator().manual_seed(seed)

    def randn() -> Tensor:
        return torch.randn(B, T, H, N, generator=g)

    r, k, v = randn(), randn(), randn()
    kk = F.normalize(randn(), dim=-1)
    a, b = -kk, kk * torch.sigmoid(randn())
    if lw is None:
        lw = -math.exp(-0.5) * torch.sigmoid(randn())
    bf = [x.to(torch.bfloat16).contiguous() for x in (r, k, v, a, b)]
    return [bf[0], lw.float().contiguous(), *bf[1:]]


def check_against_reference(kernel, inputs: list[Tensor], s0: Tensor, seed: int, lw_floor: float | None = None,
                            split: int = 1):
    B, T, H, N = inputs[0].shape
    g = torch.Generator().manual_seed(seed + 1)
    dy = torch.randn(B, T, H, N, generator=g).to(torch.bfloat16)
    ds_final = torch.randn(B, H, N, N, generator=g)

    y, s_final, *saved = kernel.forward(*inputs, s0, split)
    grads = kernel.backward(*inputs, *saved, dy, ds_final, split)

    ref_inputs = [x.double().requires_grad_() for x in (*inputs, s0)]
    r, lw, k, v, a, b, s = ref_inputs
    y_ref, s_ref = wkv7_recurrent(r, lw if lw_floor is None else lw.clamp(min=lw_floor), k, v, a, b, s)
    torch.autograd.backward([y_ref, s_ref], [dy.double(), ds_final.double()])

    errors = {"y": rel_error(y, y_ref), "state": rel_error(s_final, s_ref)}
    errors |= {name: rel_error(grad, x.grad) for name, grad, x in zip(GRADS, grads, ref_inputs)}
    assert_errors_within(errors, TOL, _WORST)


# (T, with initial state): one step, one whole chunk, partial chunks, and a long run.
CASES = [(1, False), (1, True), (16, False), (37, True), (100, False), (100, True), (1000, True)]


@pytest.mark.parametrize("T,with_state", CASES, ids=[f"T{t}-{'state' if s else 'zero'}" for t, s in CASES])
def test_chunked_kernel_matches_float64_recurrence(kernel, T, with_state):
    seed = 1000 * T + with_state
    inputs = model_like_inputs(2, T, 2, kernel.head_size, seed)
    g = torch.Generator().manual_seed(seed + 2)
    s0 = 0.5 * torch.randn(2, 2, kernel.head_size, kernel.head_size, generator=g) if with_state else torch.zeros(2, 2, kernel.head_size, kernel.head_size)
    check_against_reference(kernel, inputs, s0.contiguous(), seed)


# (T, with initial state) for split heads: one step, partial chunks, and several chunks.
SPLIT_CASES = [(1, True), (37, True), (100, False)]


@pytest.mark.parametrize("T,with_state", SPLIT_CASES, ids=[f"T{t}-{'state' if s else 'zero'}" for t, s in SPLIT_CASES])
def test_split_heads_match_float64_recurrence(kernel, T, with_state):
    """Each head's value rows over 2 (and 4) blocks; the backward's cluster sums the key-side gradients."""
    assert kernel.splits == ([1, 2] if kernel.head_size == 32 else [1, 2, 4])
    B, H, N = 2, 2, kernel.head_size
    for split in kernel.splits[1:]:
        seed = 1000 * T + with_state + 7 * split
        inputs = model_like_inputs(B, T, H, N, seed)
        s0 = 0.5 * torch.randn(B, H, N, N, generator=torch.Generator().manual_seed(seed + 2)) if with_state else torch.zeros(B, H, N, N)
        check_against_reference(kernel, inputs, s0, seed, split=split)


def test_split_heads_compute_each_value_row_as_one_block_does(kernel):
    """A value row of the state evolves on its own (row i of S' needs only row i of S and v_i), so the
    forward gives bitwise the same y, final state and saved states however the rows are dealt out; the
    backward's key-side sums only change order, so its gradients agree to float32 rounding."""
    inputs = model_like_inputs(1, 45, 2, kernel.head_size, seed=31)
    cuda_on_cpu.assert_splits_match_one_block(kernel, inputs, GRADS)


def test_a_split_the_head_size_does_not_allow_is_refused(kernel):
    cuda_on_cpu.assert_unsupported_splits_refused(kernel, model_like_inputs(1, 5, 1, kernel.head_size, seed=41))


def test_saved_chunk_states_and_sa_are_the_forwards(kernel):
    """The backward reads these instead of recomputing the forward: state c is S after 16 c steps, and
    sa at step t is S_{t-1} a_t (the state before step t applied to a_t)."""
    T, N, L = 50, kernel.head_size, kernel.chunk_len
    inputs = model_like_inputs(1, T, 2, N, seed=7)
    a = inputs[4]
    s0 = 0.5 * torch.randn(1, 2, N, N, generator=torch.Generator().manual_seed(8))
    _, _, states, sa = kernel.forward(*inputs, s0)
    assert states.shape == (1, 2, math.ceil(T / L), N, N) and sa.shape == a.shape
    for t in range(T):
        _, s_ref = wkv7_recurrent(*(x[:, :t].double() for x in inputs), s0.double())  # [B, H, value, key]
        if t % L == 0:
            assert rel_error(states[:, :, t // L], s_ref) < 5e-3, f"chunk {t // L}"
        sa_ref = torch.einsum("bhij,bhj->bhi", s_ref, a[:, t].double())
        assert rel_error(sa[:, t], sa_ref) < 1e-2, f"sa at step {t}"


def test_decays_below_the_floor_are_taken_at_the_floor(kernel):
    """lw < LW_MIN acts as LW_MIN, with zero gradient there (what clamping does); stronger ones fit too."""
    B, T, H, N = 1, 40, 2, kernel.head_size
    g = torch.Generator().manual_seed(11)
    lw = -torch.exp(2.0 * torch.randn(B, T, H, N, generator=g)).clamp(max=30.0)  # from about -1e-3 down to -30
    assert (lw < kernel.log_decay_min).float().mean() > 0.05
    inputs = model_like_inputs(B, T, H, N, seed=12, lw=lw)
    s0 = 0.5 * torch.randn(B, H, N, N, generator=g)
    check_against_reference(kernel, inputs, s0, seed=13, lw_floor=kernel.log_decay_min)
