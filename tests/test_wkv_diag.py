"""WKV-5/6 (diagonal decay): the per-token oracle against hand-computed steps, the chunked form against it."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from rwkv_train.ops.kernels import KernelUnavailable
from rwkv_train.ops import wkv_diag as ops
from rwkv_train.ops.wkv_diag import BACKENDS, wkv5, wkv6, wkv_diag_chunked, wkv_diag_recurrent

B, H, N = 2, 2, 16
T_VALUES = (1, 5, 16, 17, 40, 64)
NAMES = ("r", "lw", "k", "v", "u", "state")


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The tensors here are tiny: intra-op threads only add sync cost, which balloons on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_inputs(T: int, decay: str = "v6", seed: int = 0, b: int = B, h: int = H, n: int = N) -> list[torch.Tensor]:
    """float64 inputs shaped like the RWKV-5/6 time-mix produces them, plus a random initial state."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    r, k, v = randn(b, T, h, n), randn(b, T, h, n), randn(b, T, h, n)
    if decay == "v5":  # one decay per channel for all steps, spread like the init (-exp(-6 .. -1))
        lw = -torch.exp(-6 + 5 * torch.rand(h, n, generator=g, dtype=torch.float64)).expand(b, T, h, n)
    elif decay == "v6":  # per step, around the init's range (time_decay in -6 .. -1 plus a small lora term)
        lw = -torch.exp(-6 + 5 * torch.rand(b, T, h, n, generator=g, dtype=torch.float64) + 0.3 * randn(b, T, h, n))
    elif decay == "strong":  # w down to ~e^-7: the factorised form on shorter chunks
        lw = -torch.exp(2 * torch.rand(b, T, h, n, generator=g, dtype=torch.float64))
    elif decay == "extreme":  # w down to e^-60: the explicit form
        lw = -60.0 * torch.rand(b, T, h, n, generator=g, dtype=torch.float64) ** 2
    else:
        raise ValueError(decay)
    u = randn(h, n)
    state = randn(b, h, n, n)
    return [r, lw.contiguous(), k, v, u, state]


def run_with_grads(fn, inputs: list[torch.Tensor], with_state: bool, seed: int = 1):
    """y, final state and the gradients of <y, gy> + <S, gS> w.r.t. every input (random cotangents)."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    state = leaves[5] if with_state else None
    y, s = fn(*leaves[:5], state=state)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    gs = torch.randn(s.shape, generator=g, dtype=torch.float64).to(s.dtype)
    wrt = leaves if with_state else leaves[:5]
    grads = torch.autograd.grad((y * gy).sum() + (s * gs).sum(), wrt)
    return y.detach(), s.detach(), grads


@functools.lru_cache(maxsize=None)
def oracle(T: int, decay: str, with_state: bool):
    return run_with_grads(wkv_diag_recurrent, make_inputs(T, decay), with_state)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    err = (actual.double() - expected).abs().max().item()
    scale = expected.abs().max().item()
    # Relative to the largest entry, floored at 1 (the inputs are O(1)) so an all-zero expectation
    # (e.g. d/dlw at T = 1 from a zero state) accepts round-off.
    assert err <= tol * max(scale, 1.0), f"{what}: max error {err:.3e} vs scale {scale:.3e} (tol {tol:g})"


# --- the oracle itself ------------------------------------------------------------------------------


def test_recurrent_matches_hand_computed_two_steps():
    """N = 2, one batch, one head, worked out on paper. S is [key, value]."""
    S0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    w = torch.tensor([[0.5, 0.25], [1.0, 0.5]], dtype=torch.float64)  # (T, N_k)
    k = torch.tensor([[2.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    v = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64)
    r = torch.tensor([[1.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
    u = torch.tensor([0.5, 3.0], dtype=torch.float64)
    # Step 1: k^T v = [[2, 4], [0, 0]]; S0 + diag(u) k^T v = [[2, 4], [3, 4]]; y1 = r1 (.) = [5, 8].
    #         S1 = diag(w1) S0 + k^T v = [[.5, 1], [.75, 1]] + [[2, 4], [0, 0]] = [[2.5, 5], [.75, 1]].
    # Step 2: k^T v = [[0, 1], [0, 1]]; S1 + diag(u) k^T v = [[2.5, 5.5], [.75, 4]]; y2 = [5, 11].
    #         S2 = diag(w2) S1 + k^T v = [[2.5, 5], [.375, .5]] + [[0, 1], [0, 1]] = [[2.5, 6], [.375, 1.5]].
    y_expected = torch.tensor([[5.0, 8.0], [5.0, 11.0]], dtype=torch.float64)
    S2_expected = torch.tensor([[2.5, 6.0], [0.375, 1.5]], dtype=torch.float64)

    def as_bthn(x: torch.Tensor) -> torch.Tensor:
        return x[None, :, None, :]  # (T, N) -> (1, T, 1, N)

    y, S = wkv_diag_recurrent(*(as_bthn(x) for x in (r, torch.log(w), k, v)), u[None], state=S0[None, None])
    torch.testing.assert_close(y[0, :, 0], y_expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(S[0, 0], S2_expected, rtol=1e-14, atol=1e-14)
    y, S = wkv_diag_chunked(*(as_bthn(x) for x in (r, torch.log(w), k, v)), u[None], state=S0[None, None])
    torch.testing.assert_close(y[0, :, 0], y_expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(S[0, 0], S2_expected, rtol=1e-14, atol=1e-14)


def test_recurrent_matches_explicit_matrix_steps():
    """y_t = r_t (S_{t-1} + diag(u) k_t^T v_t), S_t = diag(w_t) S_{t-1} + k_t^T v_t, per head."""
    r, lw, k, v, u, state = make_inputs(3, "strong", seed=3, n=4)
    y, S_final = wkv_diag_recurrent(r, lw, k, v, u, state=state)
    for bi in range(B):
        for hi in range(H):
            S = state[bi, hi]
            for t in range(3):
                kv = torch.outer(k[bi, t, hi], v[bi, t, hi])
                torch.testing.assert_close(y[bi, t, hi], r[bi, t, hi] @ (S + torch.diag(u[hi]) @ kv))
                S = torch.diag(torch.exp(lw[bi, t, hi])) @ S + kv
            torch.testing.assert_close(S_final[bi, hi], S, rtol=1e-13, atol=1e-13)


# --- the chunked form against the oracle -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "state"])
@pytest.mark.parametrize("decay", ["v5", "v6", "strong", "extreme"])
@pytest.mark.parametrize("T", T_VALUES)
def test_chunked_matches_recurrent(T, decay, with_state, dtype):
    y_ref, s_ref, g_ref = oracle(T, decay, with_state)
    inputs = [x.to(dtype) for x in make_inputs(T, decay)]
    y, s, grads = run_with_grads(functools.partial(wkv_diag_chunked, chunk_len=16), inputs, with_state)
    assert y.dtype == dtype and s.dtype == dtype and y.shape == y_ref.shape and s.shape == s_ref.shape
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert_rel_close(y, y_ref, tol, "y")
    assert_rel_close(s, s_ref, tol, "final state")
    for name, g, gr in zip(NAMES, grads, g_ref):
        assert torch.isfinite(g).all(), f"grad {name} not finite"
        assert_rel_close(g, gr, tol, f"grad {name}")


@pytest.mark.parametrize("form", ["factorised", "explicit"])
@pytest.mark.parametrize("chunk_len", [8, 32])
@pytest.mark.parametrize("T", [17, 64])
def test_both_intra_chunk_forms_match_recurrent(T, chunk_len, form):
    """Forced forms at several chunk lengths (auto picks one per call; both must be exact)."""
    y_ref, s_ref, g_ref = oracle(T, "v6", True)
    fn = functools.partial(wkv_diag_chunked, chunk_len=chunk_len, form=form)
    y, s, grads = run_with_grads(fn, make_inputs(T, "v6"), True)
    assert_rel_close(y, y_ref, 1e-10, "y")
    assert_rel_close(s, s_ref, 1e-10, "final state")
    for name, g, gr in zip(NAMES, grads, g_ref):
        assert_rel_close(g, gr, 1e-10, f"grad {name}")


def test_auto_form_follows_the_decays():
    """Init-range decays take the factorised form at full length; strong ones shorten it; extreme ones go explicit."""
    assert ops._plan(make_inputs(64, "v6")[1].float(), 32, 80.0) == (32, True)
    assert ops._plan(torch.full((1, 8, 1, 4), -2.5), 32, 80.0) == (32, True)
    assert ops._plan(torch.full((1, 8, 1, 4), -5.0), 32, 80.0) == (16, True)
    assert ops._plan(torch.full((1, 8, 1, 4), -40.0), 32, 80.0) == (8, False)


def test_chunked_zero_decay_is_finite():
    """w = 0 exactly (lw = -inf) is the limit of the recurrence, not a NaN."""
    r, lw, k, v, u, state = make_inputs(20, "v6")
    lw[:, ::3] = -math.inf
    y_ref, s_ref = wkv_diag_recurrent(r, lw, k, v, u, state=state)
    for form in ("auto", "explicit"):
        y, s = wkv_diag_chunked(r, lw, k, v, u, state=state, form=form)
        assert_rel_close(y, y_ref, 1e-10, f"y ({form})")
        assert_rel_close(s, s_ref, 1e-10, f"final state ({form})")


@pytest.mark.parametrize("chunk_len", [4, 32])
def test_chaining_two_calls_equals_one_call(chunk_len):
    r, lw, k, v, u, state = make_inputs(45, "v6", seed=5)
    xs = (r, lw, k, v)
    y_all, s_all = wkv_diag_chunked(*xs, u, state=state, chunk_len=chunk_len)
    y1, s1 = wkv_diag_chunked(*(x[:, :19] for x in xs), u, state=state, chunk_len=chunk_len)
    y2, s2 = wkv_diag_chunked(*(x[:, 19:] for x in xs), u, state=s1, chunk_len=chunk_len)
    assert_rel_close(torch.cat([y1, y2], dim=1), y_all, 1e-12, "y")
    assert_rel_close(s2, s_all, 1e-12, "final state")
    s_step = state  # the RNN-mode path: one token at a time through the oracle ends in the same place
    for t in range(45):
        _, s_step = wkv_diag_recurrent(*(x[:, t : t + 1] for x in xs), u, state=s_step)
    assert_rel_close(s_step, s_all, 1e-12, "state after 45 single steps")


@pytest.mark.parametrize("form", ["factorised", "explicit"])
def test_chunked_gradcheck(form):
    """Autograd through the chunk factors, the intra-chunk scores and the state scan (several chunks, padding)."""
    inputs = make_inputs(7, "strong", seed=7, b=1, h=2, n=3)
    leaves = [x.detach().requires_grad_() for x in inputs]

    def fn(*xs):
        return wkv_diag_chunked(*xs[:5], state=xs[5], chunk_len=3, form=form)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_explicit_form_works_in_slices(monkeypatch):
    """The pairwise-decay blocks are formed a slice of chunks at a time; slicing changes nothing."""
    inputs = make_inputs(40, "extreme")
    fn = functools.partial(wkv_diag_chunked, chunk_len=8, form="explicit")  # 2 x 2 x 5 = 20 chunks
    whole = run_with_grads(fn, inputs, True)
    monkeypatch.setattr(ops, "_PAIR_BLOCK_ELEMENTS", 3 * 8 * 8 * N)  # 3 chunks per slice, a ragged last one
    sliced = run_with_grads(fn, inputs, True)
    for a, b in zip([whole[0], whole[1], *whole[2]], [sliced[0], sliced[1], *sliced[2]]):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


def test_chunked_low_precision_contract():
    """bf16 inputs: computed in float32, y back in bf16, the state in float32."""
    r, lw, k, v, u, state = make_inputs(33, "v6")
    low = [x.to(torch.bfloat16) for x in (r, lw, k, v)]
    y, s = wkv_diag_chunked(*low, u, state=state.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    y_ref, s_ref = wkv_diag_recurrent(*(x.double() for x in low), u, state=state.to(torch.bfloat16).double())
    assert_rel_close(s, s_ref, 1e-4, "final state from bf16 inputs")
    assert_rel_close(y.double(), y_ref, 1e-2, "y in bf16")


# --- the interfaces ------------------------------------------------------------------------------------


def test_wkv6_is_the_chunked_form_and_steps_through_the_oracle():
    r, lw, k, v, u, state = make_inputs(21, "v6")
    y, s = wkv6(r, lw, k, v, u, state=state, backend="torch")
    y_c, s_c = wkv_diag_chunked(r, lw, k, v, u, state=state)
    assert torch.equal(y, y_c) and torch.equal(s, s_c)
    y1, s1 = wkv6(r[:, :1], lw[:, :1], k[:, :1], v[:, :1], u, state=state)
    y1_ref, s1_ref = wkv_diag_recurrent(r[:, :1], lw[:, :1], k[:, :1], v[:, :1], u, state=state)
    assert torch.equal(y1, y1_ref) and torch.equal(s1, s1_ref)
    assert "torch" in BACKENDS


def test_wkv5_broadcasts_one_decay_over_time():
    r, lw, k, v, u, state = make_inputs(21, "v5")
    y, s = wkv5(r, lw[0, 0], k, v, u, state=state)
    y_ref, s_ref = wkv_diag_recurrent(r, lw, k, v, u, state=state)
    assert_rel_close(y, y_ref, 1e-12, "y")
    assert_rel_close(s, s_ref, 1e-12, "final state")
    with pytest.raises(ValueError, match=r"\[H, N\]"):
        wkv5(r, lw, k, v, u)


def test_runs_in_float32_under_autocast():
    r, lw, k, v, u, state = (x.float() for x in make_inputs(24, "v6"))
    y_ref, s_ref = wkv6(r, lw, k, v, u, state=state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, s = wkv6(r, lw, k, v, u, state=state)
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(s, s_ref)


def test_unknown_backend_and_form_name_the_choices():
    r, lw, k, v, u, _ = make_inputs(3, "v6")
    with pytest.raises(ValueError, match="'torch'"):
        wkv6(r, lw, k, v, u, backend="triton")
    with pytest.raises(KernelUnavailable, match="model.kernel=torch"):  # CPU tensors: no kernel to run
        wkv6(r, lw, k, v, u, backend="cuda")
    y_auto, _ = wkv6(r, lw, k, v, u, backend="auto")  # auto on the CPU is the PyTorch backend
    assert torch.equal(y_auto, wkv6(r, lw, k, v, u, backend="torch")[0])
    with pytest.raises(ValueError, match="'explicit'"):
        wkv_diag_chunked(r, lw, k, v, u, form="fast")


def test_shape_errors_say_what_was_expected():
    r, lw, k, v, u, state = make_inputs(4, "v6")
    with pytest.raises(ValueError, match=r"lw has shape"):
        wkv_diag_chunked(r, lw[:, :3], k, v, u)
    with pytest.raises(ValueError, match=r"\[B, H, N, N\]"):
        wkv_diag_chunked(r, lw, k, v, u, state=state[:, :1])
    with pytest.raises(ValueError, match=r"u has shape"):
        wkv_diag_chunked(r, lw, k, v, u[:1])
    with pytest.raises(ValueError, match=r"\[B, T, H, N\]"):
        wkv_diag_recurrent(r[0], lw[0], k[0], v[0], u)
