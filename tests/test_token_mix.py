"""rwkv_train.ops.token_mix: the same values and gradients as autograd of the plain expression."""

from __future__ import annotations

import pytest
import torch

from rwkv_train.ops.token_mix import token_mix, token_shift


def plain(x, prev, mus):
    xx = token_shift(x, prev) - x
    return [x + xx * mu for mu in mus]


def inputs(T, with_prev, dtype=torch.float64, n=6, C=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, T, C, generator=g, dtype=dtype).requires_grad_()
    prev = torch.randn(3, C, generator=g, dtype=dtype).requires_grad_() if with_prev else None
    mus = [torch.rand(1, 1, C, generator=g, dtype=dtype).requires_grad_() for _ in range(n)]
    grads = [torch.randn(3, T, C, generator=g, dtype=dtype) for _ in range(n)]
    return x, prev, mus, grads


def leaves(x, prev, mus):
    return [t for t in (x, prev, *mus) if t is not None]


@pytest.mark.parametrize("T", [1, 2, 7])
@pytest.mark.parametrize("with_prev", [False, True])
def test_gradients_match_autograd_of_the_expression_in_float64(T, with_prev):
    x, prev, mus, grads = inputs(T, with_prev)
    expected = torch.autograd.grad(plain(x, prev, mus), leaves(x, prev, mus), grads)
    outs = token_mix(x, prev, *mus)
    for got, want in zip(outs, plain(x, prev, mus)):
        assert torch.equal(got, want)
    got = torch.autograd.grad(outs, leaves(x, prev, mus), grads)
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("with_prev", [False, True])
def test_coefficients_that_vary_by_token_and_batch(with_prev):
    """RWKV-6's coefficients are (B, T, C): a parameter plus a data-dependent term; others broadcast."""
    g = torch.Generator().manual_seed(2)
    x, prev, _, grads = inputs(6, with_prev, n=4)
    shapes = [(3, 6, 12), (1, 1, 12), (12,), (1, 6, 12)]
    mus = [torch.rand(shape, generator=g, dtype=torch.float64).requires_grad_() for shape in shapes]
    expected = torch.autograd.grad(plain(x, prev, mus), leaves(x, prev, mus), grads)
    got = torch.autograd.grad(token_mix(x, prev, *mus), leaves(x, prev, mus), grads)
    for g_, e in zip(got, expected):
        assert g_.shape == e.shape
        torch.testing.assert_close(g_, e, rtol=1e-12, atol=1e-12)


def test_bf16_forward_is_bitwise_the_expression_and_gradients_are_close_to_float64():
    x, prev, mus, grads = inputs(16, True, n=6, C=64)
    exact = torch.autograd.grad(plain(x, prev, mus), leaves(x, prev, mus), grads)
    low = [t.detach().to(torch.bfloat16).requires_grad_() for t in leaves(x, prev, mus)]
    x16, prev16, mus16 = low[0], low[1], low[2:]
    outs = token_mix(x16, prev16, *mus16)
    for got, want in zip(outs, plain(x16, prev16, mus16)):
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    got = torch.autograd.grad(outs, low, [g.to(torch.bfloat16) for g in grads])
    for g, e in zip(got, exact):
        assert g.dtype == torch.bfloat16
        rel = (g.double() - e).norm() / e.norm()
        assert rel < 1e-2, rel


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_gradients_match_eager(backend):
    from rwkv_train.compiling import compile_fn

    torch._dynamo.reset()
    x, prev, mus, grads = inputs(5, True, dtype=torch.float32, n=6, C=16, seed=1)

    def loss(x, prev, *mus):
        return sum((o * g).sum() for o, g in zip(token_mix(x, prev, *mus), grads))

    expected = torch.autograd.grad(loss(x, prev, *mus), leaves(x, prev, mus))
    got = torch.autograd.grad(compile_fn(loss, backend=backend)(x, prev, *mus), leaves(x, prev, mus))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_only_the_gradients_asked_for_are_formed():
    x, _, mus, grads = inputs(4, False, n=2)
    mus[1].requires_grad_(False)
    outs = token_mix(x, None, *mus)
    torch.autograd.backward(outs, grads)
    assert x.grad is not None and mus[0].grad is not None and mus[1].grad is None


def test_no_coefficient_is_refused():
    with pytest.raises(ValueError, match="at least one mixing coefficient"):
        token_mix(torch.zeros(1, 2, 3), None)
