"""WKV-7: the per-token oracle against hand-computed steps, and the chunked form against the oracle."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from rwkv_train.ops.kernels import KernelUnavailable
from rwkv_train.ops.wkv7 import BACKENDS, wkv7, wkv7_chunked, wkv7_recurrent

B, H, N = 2, 2, 16
T_VALUES = (1, 5, 16, 17, 40, 64)
NAMES = ("r", "lw", "k", "v", "a", "b", "state")


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The tensors here are tiny: intra-op threads only add sync cost, which balloons on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_inputs(T: int, decay: str = "model", seed: int = 0, b: int = B, h: int = H, n: int = N) -> list[torch.Tensor]:
    """float64 inputs shaped like the RWKV-7 time-mix produces them, plus a random initial state."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    r, k, v = randn(b, T, h, n), randn(b, T, h, n), randn(b, T, h, n)
    kk = F.normalize(randn(b, T, h, n), dim=-1)  # L2-normalised per head
    a, bb = -kk, kk * torch.sigmoid(randn(b, T, h, n))
    if decay == "model":  # RWKV-7: lw = -e^{-0.5} sigmoid(.), i.e. w in (0.545, 1)
        lw = -math.exp(-0.5) * torch.sigmoid(randn(b, T, h, n))
    elif decay == "strong":  # w down to e^-5
        lw = -5.0 * torch.rand(b, T, h, n, generator=g, dtype=torch.float64)
    elif decay == "extreme":  # w down to e^-60 (underflows float32 chunk factors unless the chunk shrinks)
        lw = -60.0 * torch.rand(b, T, h, n, generator=g, dtype=torch.float64) ** 2
    else:
        raise ValueError(decay)
    state = randn(b, h, n, n)
    return [r, lw, k, v, a, bb, state]


def run_with_grads(fn, inputs: list[torch.Tensor], with_state: bool, seed: int = 1):
    """y, final state and the gradients of <y, gy> + <S, gS> w.r.t. every input (random cotangents)."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    state = leaves[6] if with_state else None
    y, s = fn(*leaves[:6], state=state)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    gs = torch.randn(s.shape, generator=g, dtype=torch.float64).to(s.dtype)
    wrt = leaves if with_state else leaves[:6]
    grads = torch.autograd.grad((y * gy).sum() + (s * gs).sum(), wrt)
    return y.detach(), s.detach(), grads


@functools.lru_cache(maxsize=None)
def oracle(T: int, decay: str, with_state: bool):
    return run_with_grads(wkv7_recurrent, make_inputs(T, decay), with_state)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    err = (actual.double() - expected).abs().max().item()
    scale = expected.abs().max().item()
    # Relative to the largest entry, floored at 1 (the inputs are O(1)) so an all-zero expectation
    # (e.g. d/dlw at T = 1 from a zero state) accepts round-off.
    assert err <= tol * max(scale, 1.0), f"{what}: max error {err:.3e} vs scale {scale:.3e} (tol {tol:g})"


# --- the oracle itself ------------------------------------------------------------------------------


def test_recurrent_matches_hand_computed_two_steps():
    """N = 2, one batch, one head, worked out on paper."""
    S0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    w = torch.tensor([[0.5, 0.25], [1.0, 0.5]], dtype=torch.float64)  # (T, N)
    a = torch.tensor([[1.0, -1.0], [0.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[0.5, 1.0], [1.0, 1.0]], dtype=torch.float64)
    v = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64)
    k = torch.tensor([[2.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    r = torch.tensor([[1.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
    # Step 1: S0 diag(w) = [[.5, .5], [1.5, 1]]; S0 a = [-1, -1] -> (S0 a) b^T = [[-.5, -1], [-.5, -1]];
    # v k^T = [[2, 0], [4, 0]]  =>  S1 = [[2, -.5], [5, 0]], y1 = S1 [1, 1] = [1.5, 5].
    # Step 2: S1 diag(w) = [[2, -.25], [5, 0]]; S1 a = [-.5, 0] -> [[-.5, -.5], [0, 0]];
    # v k^T = [[0, 0], [1, 1]]  =>  S2 = [[1.5, -.75], [6, 1]], y2 = S2 [2, 0] = [3, 12].
    y_expected = torch.tensor([[1.5, 5.0], [3.0, 12.0]], dtype=torch.float64)
    S2_expected = torch.tensor([[1.5, -0.75], [6.0, 1.0]], dtype=torch.float64)

    def as_bthn(x: torch.Tensor) -> torch.Tensor:
        return x[None, :, None, :]  # (T, N) -> (1, T, 1, N)

    y, S = wkv7_recurrent(*(as_bthn(x) for x in (r, torch.log(w), k, v, a, b)), state=S0[None, None])
    torch.testing.assert_close(y[0, :, 0], y_expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(S[0, 0], S2_expected, rtol=1e-14, atol=1e-14)
    y1, S1 = wkv7_recurrent(*(as_bthn(x[:1]) for x in (r, torch.log(w), k, v, a, b)), state=S0[None, None])
    torch.testing.assert_close(y1[0, 0, 0], y_expected[0], rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(S1[0, 0], torch.tensor([[2.0, -0.5], [5.0, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("with_state", [False, True])
def test_recurrent_matches_explicit_matrix_steps(with_state):
    """S_t = S_{t-1} (diag(w_t) + a_t b_t^T) + v_t k_t^T, y_t = S_t r_t with explicit matrices, per head."""
    r, lw, k, v, a, b, state = make_inputs(2, "strong", seed=3, n=4)
    y, S_final = wkv7_recurrent(r, lw, k, v, a, b, state=state if with_state else None)
    for bi in range(B):
        for hi in range(H):
            S = state[bi, hi] if with_state else torch.zeros(4, 4, dtype=torch.float64)
            for t in range(2):
                x = {name: t_[bi, t, hi] for name, t_ in zip(NAMES, (r, lw, k, v, a, b))}
                transition = torch.diag(torch.exp(x["lw"])) + torch.outer(x["a"], x["b"])
                S = S @ transition + torch.outer(x["v"], x["k"])
                torch.testing.assert_close(y[bi, t, hi], S @ x["r"], rtol=1e-13, atol=1e-13)
            torch.testing.assert_close(S_final[bi, hi], S, rtol=1e-13, atol=1e-13)


# --- the chunked form against the oracle -------------------------------------------------------------


@pytest.mark.parametrize("chunk_len", [16, None], ids=["L16", "Ldefault"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "state"])
@pytest.mark.parametrize("decay", ["model", "strong"])
@pytest.mark.parametrize("T", T_VALUES)
def test_chunked_matches_recurrent(T, decay, with_state, dtype, chunk_len):
    y_ref, s_ref, g_ref = oracle(T, decay, with_state)
    inputs = [x.to(dtype) for x in make_inputs(T, decay)]
    kwargs = {} if chunk_len is None else {"chunk_len": chunk_len}
    y, s, grads = run_with_grads(functools.partial(wkv7_chunked, **kwargs), inputs, with_state)
    assert y.dtype == dtype and s.dtype == dtype and y.shape == y_ref.shape and s.shape == s_ref.shape
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert_rel_close(y, y_ref, tol, "y")
    assert_rel_close(s, s_ref, tol, "final state")
    for name, g, gr in zip(NAMES, grads, g_ref):
        assert_rel_close(g, gr, tol, f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_chunked_extreme_decays_stay_exact(dtype):
    """Decays far beyond RWKV-7's range shrink the chunk instead of overflowing the chunk factors."""
    y_ref, s_ref, g_ref = oracle(40, "extreme", True)
    inputs = [x.to(dtype) for x in make_inputs(40, "extreme")]
    y, s, grads = run_with_grads(wkv7_chunked, inputs, True)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert_rel_close(y, y_ref, tol, "y")
    assert_rel_close(s, s_ref, tol, "final state")
    for name, g, gr in zip(NAMES, grads, g_ref):
        assert torch.isfinite(g).all(), f"grad {name} not finite"
        assert_rel_close(g, gr, tol, f"grad {name}")


def test_chunked_zero_decay_is_finite():
    """w = 0 exactly (lw = -inf) is the limit of the recurrence, not a NaN."""
    r, lw, k, v, a, b, state = make_inputs(20, "model")
    lw[:, ::3] = -math.inf
    y_ref, s_ref = wkv7_recurrent(r, lw, k, v, a, b, state=state)
    y, s = wkv7_chunked(r, lw, k, v, a, b, state=state)
    assert_rel_close(y, y_ref, 1e-10, "y")
    assert_rel_close(s, s_ref, 1e-10, "final state")


@pytest.mark.parametrize("chunk_len", [4, 32])
def test_chaining_two_calls_equals_one_call(chunk_len):
    r, lw, k, v, a, b, state = make_inputs(45, "model", seed=5)
    xs = (r, lw, k, v, a, b)
    y_all, s_all = wkv7_chunked(*xs, state=state, chunk_len=chunk_len)
    y1, s1 = wkv7_chunked(*(x[:, :19] for x in xs), state=state, chunk_len=chunk_len)
    y2, s2 = wkv7_chunked(*(x[:, 19:] for x in xs), state=s1, chunk_len=chunk_len)
    assert_rel_close(torch.cat([y1, y2], dim=1), y_all, 1e-12, "y")
    assert_rel_close(s2, s_all, 1e-12, "final state")
    # The RNN-mode path: one token at a time through the oracle ends in the same place.
    s_step = state
    for t in range(45):
        _, s_step = wkv7_recurrent(*(x[:, t : t + 1] for x in xs), state=s_step)
    assert_rel_close(s_step, s_all, 1e-12, "state after 45 single steps")


def test_chunked_gradcheck():
    """Autograd through the chunk factors, the triangular solve and the state scan (several chunks, padding)."""
    inputs = make_inputs(7, "strong", seed=7, b=1, h=2, n=3)
    leaves = [x.requires_grad_() for x in inputs]

    def fn(*xs):
        return wkv7_chunked(*xs[:6], state=xs[6], chunk_len=3)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_chunked_low_precision_contract():
    """bf16 inputs: computed in float32, y back in bf16, the state in float32."""
    inputs = make_inputs(33, "model")
    y_ref, s_ref = wkv7_recurrent(*inputs[:6], state=inputs[6])
    low = [x.to(torch.bfloat16) for x in inputs[:6]]
    y, s = wkv7_chunked(*low, state=inputs[6].to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    y_ref16, s_ref16 = wkv7_recurrent(*(x.double() for x in low), state=inputs[6].to(torch.bfloat16).double())
    assert_rel_close(s, s_ref16, 1e-4, "final state from bf16 inputs")
    assert_rel_close(y.double(), y_ref16, 1e-2, "y in bf16")


# --- the interface -------------------------------------------------------------------------------------


def test_wkv7_torch_backend_is_the_chunked_form():
    r, lw, k, v, a, b, state = make_inputs(21, "model")
    y, s = wkv7(r, lw, k, v, a, b, state=state, backend="torch")
    y_c, s_c = wkv7_chunked(r, lw, k, v, a, b, state=state)
    assert torch.equal(y, y_c) and torch.equal(s, s_c)
    assert "torch" in BACKENDS


def test_wkv7_unknown_backend_names_the_choices():
    inputs = make_inputs(3, "model")
    with pytest.raises(ValueError, match="'torch'"):
        wkv7(*inputs[:6], backend="triton")
    with pytest.raises(KernelUnavailable, match="model.kernel=torch"):  # CPU tensors: no kernel to run
        wkv7(*inputs[:6], backend="cuda")
    y_auto, _ = wkv7(*inputs[:6], backend="auto")  # auto on the CPU is the PyTorch backend
    assert torch.equal(y_auto, wkv7(*inputs[:6], backend="torch")[0])


def test_shape_errors_say_what_was_expected():
    r, lw, k, v, a, b, state = make_inputs(4, "model")
    with pytest.raises(ValueError, match=r"lw has shape"):
        wkv7_chunked(r, lw[:, :3], k, v, a, b)
    with pytest.raises(ValueError, match=r"\[B, H, N, N\]"):
        wkv7_chunked(r, lw, k, v, a, b, state=state[:, :1])
    with pytest.raises(ValueError, match=r"\[B, T, H, N\]"):
        wkv7_recurrent(r[0], lw[0], k[0], v[0], a[0], b[0])


@pytest.mark.parametrize("chunked,head_size,first", [("auto", 32, "v7-chunked"), ("auto", 64, "v7-chunked"),
                                                     ("auto", 128, "v7"), (True, 64, "v7-chunked"),
                                                     (False, 64, "v7")])
def test_cuda_kernel_choice(monkeypatch, chunked, head_size, first):
    """Which CUDA kernel wkv7 asks for: chunked="auto" takes the chunked one where it has the head size
    (32, 64) and the sequential one otherwise; True and False insist. With neither available here it
    runs the PyTorch path, so the result still equals the reference."""
    from rwkv_train.ops import kernels

    asked = []

    def use_cuda(kernel, generation, x, n=None):
        asked.append(generation)
        return False

    monkeypatch.setattr(kernels, "use_cuda", use_cuda)
    B, T, H = 1, 5, 1
    g = torch.Generator().manual_seed(3)
    r, k, v = (torch.randn(B, T, H, head_size, generator=g) for _ in range(3))
    kk = F.normalize(torch.randn(B, T, H, head_size, generator=g), dim=-1)
    lw = -0.5 * torch.rand(B, T, H, head_size, generator=g)
    y, s = wkv7(r, lw, k, v, -kk, 0.5 * kk, None, "cuda", chunked=chunked)
    assert asked[0] == first
    assert ("v7-chunked" in asked) == (first == "v7-chunked")
    y_ref, s_ref = wkv7_recurrent(r, lw, k, v, -kk, 0.5 * kk, None)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-5)


def test_chunked_choice_must_be_true_false_or_auto():
    x = torch.zeros(1, 1, 1, 32)
    with pytest.raises(ValueError, match="chunked must be True, False or 'auto'"):
        wkv7(x, x, x, x, x, x, None, "torch", chunked="yes")
