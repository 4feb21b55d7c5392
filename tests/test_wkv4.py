"""WKV-4: the per-token oracle against the defining sums, and the parallel scan against the oracle."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from rwkv_train.ops.kernels import KernelUnavailable
from rwkv_train.ops.wkv4 import BACKENDS, EMPTY_LOG, wkv4, wkv4_chunked, wkv4_recurrent, zero_wkv4_state

B, C = 2, 8
T_VALUES = (1, 5, 16, 17, 40, 64)
NAMES = ("w", "u", "k", "v", "aa", "bb", "pp")


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The tensors here are tiny: intra-op threads only add sync cost, which balloons on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_inputs(T: int, decay: str = "model", seed: int = 0, b: int = B, c: int = C) -> list[torch.Tensor]:
    """float64 (w, u, k, v) shaped like the RWKV-4 time-mix produces them, plus a random initial state."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    if decay == "model":  # time_decay in the reference init range [-5, 3]: w from -0.007 to -20
        time_decay = -5 + 8 * torch.rand(c, generator=g, dtype=torch.float64)
        k = 3 * randn(b, T, c)
    elif decay == "strong":  # trained fast channels (time_decay up to 8: w = -3000) and large keys
        time_decay = torch.linspace(-8, 8, c, dtype=torch.float64)
        k = 30 * randn(b, T, c)
    elif decay == "huge_k":  # e^k overflows float32 and float64 unless every sum is kept scaled
        time_decay = torch.linspace(-6, 4, c, dtype=torch.float64)
        k = 800 + 100 * randn(b, T, c)
    else:
        raise ValueError(decay)
    w, u, v = -torch.exp(time_decay), randn(c), randn(b, T, c)
    # a state as a previous call leaves it: bb > 0, pp about the size of k
    center = k.mean().item() if T else 0.0
    aa, bb, pp = randn(b, c), 0.5 + torch.rand(b, c, generator=g, dtype=torch.float64), center + randn(b, c)
    return [w, u, k, v, aa, bb, pp]


def run_with_grads(fn, inputs: list[torch.Tensor], with_state: bool, seed: int = 1):
    """y, final state and the gradients of <y, gy> + <state, gS> w.r.t. every input (random cotangents)."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    state = tuple(leaves[4:]) if with_state else None
    y, s = fn(*leaves[:4], state=state)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    gs = [torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype) for x in s]
    wrt = leaves if with_state else leaves[:4]
    grads = torch.autograd.grad((y * gy).sum() + sum((x * gx).sum() for x, gx in zip(s, gs)), wrt)
    return y.detach(), tuple(x.detach() for x in s), grads


@functools.cache
def oracle(T: int, decay: str, with_state: bool):
    return run_with_grads(wkv4_recurrent, make_inputs(T, decay), with_state)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    err = (actual.double() - expected).abs().max().item()
    scale = expected.abs().max().item()
    # relative to the largest entry, floored at 1 (the inputs are O(1)), so an all-zero expectation accepts round-off
    assert err <= tol * max(scale, 1.0), f"{what}: max error {err:.3e} vs scale {scale:.3e} (tol {tol:g})"


# --- the oracle itself ------------------------------------------------------------------------------


@pytest.mark.parametrize("with_state", [False, True])
def test_recurrent_matches_the_defining_sums(with_state):
    """wkv_t = (sum_{i<t} e^{(t-1-i)w+k_i} v_i + e^{u+k_t} v_t) / (same with v = 1), summed naively in float64."""
    w, u, k, v, aa, bb, pp = make_inputs(6, "model", seed=3)
    y, (aa_T, bb_T, pp_T) = wkv4_recurrent(w, u, k, v, state=(aa, bb, pp) if with_state else None)
    T = k.shape[1]
    for t in range(T + 1):
        # the sums over the tokens before t, plus the initial state decayed t steps
        num = sum(torch.exp((t - 1 - i) * w + k[:, i]) * v[:, i] for i in range(t)) + torch.zeros(B, C, dtype=torch.float64)
        den = sum(torch.exp((t - 1 - i) * w + k[:, i]) for i in range(t)) + torch.zeros(B, C, dtype=torch.float64)
        if with_state:
            num = num + aa * torch.exp(pp + t * w)
            den = den + bb * torch.exp(pp + t * w)
        if t < T:
            bonus = torch.exp(u + k[:, t])
            expected = (num + bonus * v[:, t]) / (den + bonus)
            torch.testing.assert_close(y[:, t], expected, rtol=1e-12, atol=1e-12)
    # the final state stands for the same sums, scaled by the largest exponent
    torch.testing.assert_close(aa_T * torch.exp(pp_T), num, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bb_T * torch.exp(pp_T), den, rtol=1e-12, atol=1e-12)
    exponents = [(T - 1 - i) * w + k[:, i] for i in range(T)] + ([pp + T * w] if with_state else [])
    torch.testing.assert_close(pp_T, torch.stack(exponents).amax(0), rtol=0, atol=1e-12)


def test_zero_state_is_the_same_as_none():
    w, u, k, v, *_ = make_inputs(9, "model")
    y1, s1 = wkv4_recurrent(w, u, k, v)
    y2, s2 = wkv4_recurrent(w, u, k, v, state=zero_wkv4_state(B, C, dtype=torch.float64))
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(s1, s2))
    assert torch.all(zero_wkv4_state(1, 3)[2] == EMPTY_LOG)


# --- the parallel scan against the oracle -------------------------------------------------------------


@pytest.mark.parametrize("chunk_len", [4, None], ids=["L4", "Ldefault"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "state"])
@pytest.mark.parametrize("decay", ["model", "strong"])
@pytest.mark.parametrize("T", T_VALUES)
def test_chunked_matches_recurrent(T, decay, with_state, dtype, chunk_len):
    y_ref, s_ref, g_ref = oracle(T, decay, with_state)
    inputs = [x.to(dtype) for x in make_inputs(T, decay)]
    kwargs = {} if chunk_len is None else {"chunk_len": chunk_len}
    y, s, grads = run_with_grads(functools.partial(wkv4_chunked, **kwargs), inputs, with_state)
    assert y.dtype == dtype and all(x.dtype == dtype for x in s) and y.shape == y_ref.shape
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert_rel_close(y, y_ref, tol, "y")
    for name, x, x_ref in zip(("aa", "bb", "pp"), s, s_ref):
        assert_rel_close(x, x_ref, tol, f"final {name}")
    for name, g, gr in zip(NAMES, grads, g_ref):
        assert_rel_close(g, gr, tol, f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_chunked_huge_keys_stay_exact(dtype):
    """k ~ 800: e^k overflows even float64; the scaled sums keep values and gradients finite and exact."""
    y_ref, s_ref, g_ref = oracle(40, "huge_k", True)
    inputs = [x.to(dtype) for x in make_inputs(40, "huge_k")]
    y, s, grads = run_with_grads(functools.partial(wkv4_chunked, chunk_len=8), inputs, True)
    assert torch.isfinite(y_ref).all() and torch.isfinite(y).all()
    # Exponents here reach ~3000, where float32 rounds them by ~2e-4 and so every e^x by as much
    # relatively (the float32 recurrence is itself off by 1e-3). pp's rounding rescales aa and bb
    # together, so the sums are compared on the oracle's scale, aa * e^(pp - pp_ref).
    tol = 1e-10 if dtype == torch.float64 else 2e-3
    assert_rel_close(y, y_ref, tol, "y")
    assert_rel_close(s[2], s_ref[2], 1e-10 if dtype == torch.float64 else 1e-6, "final pp")
    rescale = torch.exp(s[2].double() - s_ref[2])
    for name, x, x_ref in zip(("aa", "bb"), s, s_ref):
        assert_rel_close(x * rescale, x_ref, tol, f"final {name} on the oracle's scale")
    for name, g, gr in zip(NAMES, grads, g_ref):
        assert torch.isfinite(g).all(), f"grad {name} not finite"
        assert_rel_close(g, gr, tol, f"grad {name}")


@pytest.mark.parametrize("chunk_len", [3, 16])
def test_chaining_calls_equals_one_call(chunk_len):
    w, u, k, v, *state = make_inputs(45, "model", seed=5)
    y_all, s_all = wkv4_chunked(w, u, k, v, state=tuple(state), chunk_len=chunk_len)
    y1, s1 = wkv4_chunked(w, u, k[:, :19], v[:, :19], state=tuple(state), chunk_len=chunk_len)
    y2, s2 = wkv4_chunked(w, u, k[:, 19:], v[:, 19:], state=s1, chunk_len=chunk_len)
    assert_rel_close(torch.cat([y1, y2], dim=1), y_all, 1e-12, "y")
    for a, b in zip(s2, s_all):
        assert_rel_close(a, b, 1e-12, "final state")
    # the RNN-mode path: one token at a time through the oracle ends in the same place
    s_step = tuple(state)
    for t in range(45):
        _, s_step = wkv4_recurrent(w, u, k[:, t : t + 1], v[:, t : t + 1], state=s_step)
    for a, b in zip(s_step, s_all):
        assert_rel_close(a, b, 1e-12, "state after 45 single steps")


def test_chunked_gradcheck():
    """Autograd through the merges of both scans, the chunk starts and the padding (several chunks)."""
    inputs = make_inputs(7, "model", seed=7, b=1, c=3)
    leaves = [x.requires_grad_() for x in inputs]

    def fn(w, u, k, v, aa, bb, pp):
        y, s = wkv4_chunked(w, u, k, v, state=(aa, bb, pp), chunk_len=3)
        return (y, *s)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_empty_sequence_returns_the_state():
    w, u, k, v, *state = make_inputs(0, "model")
    y, s = wkv4_chunked(w, u, k, v, state=tuple(state))
    assert y.shape == (B, 0, C) and all(torch.equal(a, b) for a, b in zip(s, state))


def test_chunked_low_precision_contract():
    """bf16 k, v: computed in float32, y back in bf16, the state in float32."""
    w, u, k, v, *state = make_inputs(33, "model")
    k16, v16 = k.to(torch.bfloat16), v.to(torch.bfloat16)
    y, s = wkv4_chunked(w.float(), u.float(), k16, v16, state=tuple(x.float() for x in state))
    assert y.dtype == torch.bfloat16 and all(x.dtype == torch.float32 for x in s)
    y_ref, s_ref = wkv4_recurrent(w, u, k16.double(), v16.double(), state=tuple(state))
    assert_rel_close(s[0], s_ref[0], 1e-4, "final aa from bf16 inputs")
    assert_rel_close(y.double(), y_ref, 1e-2, "y in bf16")


# --- the interface -------------------------------------------------------------------------------------


def test_wkv4_torch_backend_is_the_chunked_form():
    w, u, k, v, *state = make_inputs(21, "model")
    y, s = wkv4(w, u, k, v, state=tuple(state), backend="torch")
    y_c, s_c = wkv4_chunked(w, u, k, v, state=tuple(state))
    assert torch.equal(y, y_c) and all(torch.equal(a, b) for a, b in zip(s, s_c))
    assert "torch" in BACKENDS


def test_wkv4_runs_outside_autocast():
    w, u, k, v, *_ = make_inputs(12, "model")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, s = wkv4(w.float(), u.float(), k.float(), v.float())
    y_ref, _ = wkv4_recurrent(w, u, k, v)
    assert y.dtype == torch.float32 and s[0].dtype == torch.float32
    assert_rel_close(y, y_ref, 1e-5, "y under autocast")


def test_wkv4_unknown_backend_names_the_choices():
    w, u, k, v, *_ = make_inputs(3, "model")
    with pytest.raises(ValueError, match="'torch'"):
        wkv4(w, u, k, v, backend="triton")
    with pytest.raises(KernelUnavailable, match="model.kernel=torch"):  # CPU tensors: no kernel to run
        wkv4(w, u, k, v, backend="cuda")
    y_auto, _ = wkv4(w, u, k, v, backend="auto")  # auto on the CPU is the PyTorch backend
    assert torch.equal(y_auto, wkv4(w, u, k, v, backend="torch")[0])


def test_shape_errors_say_what_was_expected():
    w, u, k, v, aa, bb, pp = make_inputs(4, "model")
    with pytest.raises(ValueError, match=r"v has shape"):
        wkv4_chunked(w, u, k, v[:, :3])
    with pytest.raises(ValueError, match=r"w has shape .* = \[C\]"):
        wkv4_chunked(w[:3], u, k, v)
    with pytest.raises(ValueError, match=r"state pp has shape .* = \[B, C\]"):
        wkv4_chunked(w, u, k, v, state=(aa, bb, pp[:1]))
    with pytest.raises(ValueError, match=r"\[B, T, C\]"):
        wkv4_recurrent(w, u, k[0], v[0])
    assert not math.isnan(EMPTY_LOG)
