"""cuda/wkv_diag_chunked.cu (the chunked RWKV-5/6 kernel) run on the CPU (tests/cuda_cpu), against the
float64 recurrence.

The kernel's arithmetic, indexing, padding and barriers are the same code that nvcc builds; only the
threads are std::threads and the wmma tiles are computed exactly. Every output and gradient is compared
with autograd of `wkv_diag_recurrent` in float64 at the GPU tests' tolerance, outputs poisoned (NaN)
before each call. Speed, the real tensor-core fragments and register limits are left to a GPU and
`make cuda-check`.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from rwkv_train.ops.wkv_diag import wkv_diag_recurrent
from tests import cuda_on_cpu
from tests.conftest import assert_errors_within, error_summary_fixture, rel_error
from tests.test_wkv7_chunked_emulated import CASES  # (T, with initial state): one step to a long run

pytestmark = pytest.mark.skipif(cuda_on_cpu.compiler_problem() is not None, reason=str(cuda_on_cpu.compiler_problem()))

TOL = 1e-2  # as tests/test_kernels_cuda.py: every input and y pass through bf16
GRADS = ("dr", "dlw", "dk", "dv", "du", "ds0")

_WORST: dict[str, float] = {}  # quantity -> largest relative error over this module's comparisons


error_summary = error_summary_fixture("chunked WKV-5/6 kernel (CPU emulation) vs float64", _WORST)


@pytest.fixture(scope="module", params=[32, 64], ids=lambda n: f"N{n}")
def kernel(request) -> cuda_on_cpu.WkvDiagChunkedOnCpu:
    return cuda_on_cpu.WkvDiagChunkedOnCpu(request.param)


def model_like_inputs(B: int, T: int, H: int, N: int, seed: int, v5: bool = False,
                      lw: Tensor | None = None) -> list[Tensor]:
    """r, lw, k, v, u as the models make them: RWKV-6 lw = -exp(x) per step with x ~ N(-1, 0.5) clipped to
    [-2.5, 0.5]; RWKV-5 one lw [H, N] from the init's range; u ~ N(0, 0.5)."""
    g = torch.Generator().manual_seed(seed)
    r, k = (0.5 * torch.randn(B, T, H, N, generator=g) for _ in range(2))
    v = torch.randn(B, T, H, N, generator=g)
    if lw is None:
        x = -6.0 + 5.0 * torch.rand(H, N, generator=g) if v5 else (torch.randn(B, T, H, N, generator=g) * 0.5 - 1.0)
        lw = -torch.exp(x.clamp(-2.5, 0.5) if not v5 else x)
    u = 0.5 * torch.randn(H, N, generator=g)
    bf = [x.to(torch.bfloat16).contiguous() for x in (r, k, v)]
    return [bf[0], lw.float().contiguous(), bf[1], bf[2], u.contiguous()]


def check_against_reference(kernel, inputs: list[Tensor], s0: Tensor, seed: int, lw_floor: float | None = None,
                            split: int = 1):
    B, T, H, N = inputs[0].shape
    g = torch.Generator().manual_seed(seed + 1)
    dy = torch.randn(B, T, H, N, generator=g).to(torch.bfloat16)
    ds_final = torch.randn(B, H, N, N, generator=g)

    y, s_final, states = kernel.forward(*inputs, s0, split)
    dr, dlw, dk, dv, du, ds0 = kernel.backward(*inputs, states, dy, ds_final, split)
    dlw = dlw if inputs[1].dim() == 4 else dlw.sum(dim=(0, 1))  # RWKV-5: one lw for every step
    grads = (dr, dlw, dk, dv, du.sum(0), ds0)

    ref_inputs = [x.double().requires_grad_() for x in (*inputs, s0)]
    r, lw, k, v, u, s = ref_inputs
    lw_steps = lw.expand(B, T, H, N) if lw.dim() == 2 else lw
    y_ref, s_ref = wkv_diag_recurrent(r, lw_steps if lw_floor is None else lw_steps.clamp(min=lw_floor), k, v, u, s)
    torch.autograd.backward([y_ref, s_ref], [dy.double(), ds_final.double()])

    errors = {"y": rel_error(y, y_ref), "state": rel_error(s_final, s_ref)}
    errors |= {name: rel_error(grad, x.grad) for name, grad, x in zip(GRADS, grads, ref_inputs)}
    assert_errors_within(errors, TOL, _WORST)
    return states



@pytest.mark.parametrize("T,with_state", CASES, ids=[f"T{t}-{'state' if s else 'zero'}" for t, s in CASES])
def test_chunked_kernel_matches_float64_recurrence(kernel, T, with_state):
    B, H, N = 2, 2, kernel.head_size
    seed = 1000 * T + with_state
    s0 = torch.zeros(B, H, N, N)
    if with_state:
        s0 = 0.5 * torch.randn(B, H, N, N, generator=torch.Generator().manual_seed(seed + 2))
    check_against_reference(kernel, model_like_inputs(B, T, H, N, seed), s0.contiguous(), seed)


@pytest.mark.parametrize("T", [1, 37, 100])
def test_rwkv5_one_log_decay_for_every_step(kernel, T):
    """lw [H, N] is read for every step (nothing expanded); its gradient is the per-step one summed."""
    B, H, N = 2, 2, kernel.head_size
    s0 = 0.5 * torch.randn(B, H, N, N, generator=torch.Generator().manual_seed(T))
    check_against_reference(kernel, model_like_inputs(B, T, H, N, seed=T + 5, v5=True), s0, seed=T + 6)


@pytest.mark.parametrize("T,with_state", [(1, True), (37, True), (100, False)])
def test_split_heads_match_float64_recurrence(kernel, T, with_state):
    """Each head's value columns over 2 (and 4) blocks; the backward's cluster sums the key-side
    gradients, RWKV-6's and RWKV-5's decays alike."""
    assert kernel.splits == ([1, 2] if kernel.head_size == 32 else [1, 2, 4])
    B, H, N = 2, 2, kernel.head_size
    for split in kernel.splits[1:]:
        for v5 in (False, True):
            seed = 1000 * T + with_state + 7 * split + v5
            s0 = torch.zeros(B, H, N, N)
            if with_state:
                s0 = 0.5 * torch.randn(B, H, N, N, generator=torch.Generator().manual_seed(seed + 2))
            check_against_reference(kernel, model_like_inputs(B, T, H, N, seed, v5=v5), s0, seed, split=split)


def test_split_heads_compute_each_value_column_as_one_block_does(kernel):
    """A value column of the state evolves on its own, so the forward gives bitwise the same y, final
    state and saved states however the columns are dealt out; the backward's key-side sums only change
    order, so its gradients agree to float32 rounding."""
    inputs = model_like_inputs(1, 45, 2, kernel.head_size, seed=31)
    cuda_on_cpu.assert_splits_match_one_block(kernel, inputs, GRADS)


def test_a_split_the_head_size_does_not_allow_is_refused(kernel):
    cuda_on_cpu.assert_unsupported_splits_refused(kernel, model_like_inputs(1, 5, 1, kernel.head_size, seed=41))


def test_saved_chunk_states_are_the_states_at_chunk_starts(kernel):
    """The backward reads these instead of recomputing the forward: state c is S after 16 c steps."""
    T, N, L = 50, kernel.head_size, kernel.chunk_len
    inputs = model_like_inputs(1, T, 2, N, seed=7)
    s0 = 0.5 * torch.randn(1, 2, N, N, generator=torch.Generator().manual_seed(8))
    _, _, states = kernel.forward(*inputs, s0)
    assert states.shape == (1, 2, math.ceil(T / L), N, N)
    r, lw, k, v, u = inputs
    for c in range(states.shape[2]):
        _, s_ref = wkv_diag_recurrent(*(x[:, : c * L].double() for x in (r, lw, k, v)), u.double(), s0.double())
        assert rel_error(states[:, :, c], s_ref) < 5e-3, f"chunk {c}"


def test_decays_below_the_floor_are_taken_at_the_floor(kernel):
    """lw < LW_MIN acts as LW_MIN, with zero gradient there (what clamping does); RWKV-6's decays can be far
    stronger than its init's, and the factors still fit."""
    B, T, H, N = 1, 40, 2, kernel.head_size
    g = torch.Generator().manual_seed(11)
    lw = -torch.exp(2.0 * torch.randn(B, T, H, N, generator=g)).clamp(max=60.0)  # from about -1e-3 down to -60
    assert (lw < kernel.log_decay_min).float().mean() > 0.05
    inputs = model_like_inputs(B, T, H, N, seed=12, lw=lw)
    s0 = 0.5 * torch.randn(B, H, N, N, generator=g)
    check_against_reference(kernel, inputs, s0, seed=13, lw_floor=kernel.log_decay_min)
