"""The RWKV-7 model: GPT mode against RNN mode, state gradients, reference init, the fused head loss."""

from __future__ import annotations

import math

import pytest
import torch

from rwkv_train.config import ModelConfig
from rwkv_train.models import build_model
from rwkv_train.models.common import Head, cross_entropy_l2wrap
from rwkv_train.models.v7 import DECAY_SCALE, RWKV7Dims, head_norm, log_decay

TINY = ModelConfig(n_layer=3, n_embd=64, head_size=32, vocab_size=97)


def trained_looking(model: torch.nn.Module) -> torch.nn.Module:
    """Perturb every parameter so zero-initialised paths (output, ffn.value, w1, ...) are exercised."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def test_gpt_mode_equals_rnn_mode_in_float64():
    model = trained_looking(build_model(TINY)).double()
    idx = torch.randint(0, 97, (2, 23))
    logits, final = model(idx)
    state, steps = None, []
    for t in range(idx.shape[1]):
        out, state = model(idx[:, t : t + 1], state)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), logits, rtol=1e-10, atol=1e-10)
    for a, b in zip(final, state):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


def test_chunks_with_carried_state_equal_one_pass():
    model = trained_looking(build_model(TINY)).double()
    idx = torch.randint(0, 97, (1, 40))
    whole, _ = model(idx)
    first, state = model(idx[:, :17])
    second, _ = model(idx[:, 17:], state)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-10, atol=1e-10)


def test_gradient_flows_into_the_initial_state():
    """A loss on the second chunk has a gradient w.r.t. the state the first chunk produced (exact BPTT)."""
    model = trained_looking(build_model(TINY)).double()
    idx = torch.randint(0, 97, (1, 20))
    _, state = model(idx[:, :10])
    state = [[s.detach().requires_grad_(True) for s in layer] for layer in state]
    logits, _ = model(idx[:, 10:], state)
    logits.square().mean().backward()
    for layer in state:
        for s in layer:
            assert s.grad is not None and s.grad.abs().sum() > 0
    # finite-difference check on one wkv state entry
    wkv = state[1][1]
    eps = 1e-7  # the output is strongly curved in the state (GroupNorm of y): keep the step small
    with torch.no_grad():
        wkv[0, 0, 1, 2] += eps
        up = model(idx[:, 10:], state)[0].square().mean()
        wkv[0, 0, 1, 2] -= 2 * eps
        down = model(idx[:, 10:], state)[0].square().mean()
    central = (up - down).item() / (2 * eps)
    assert central == pytest.approx(wkv.grad[0, 0, 1, 2].item(), rel=2e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_head_norm_is_group_norm_over_heads(dtype):
    """head_norm over (..., H, N) gives what nn.GroupNorm(H, H * N) gives over the flattened channels, with
    an affine that differs per channel, and the same gradients for the input, weight and bias."""
    H, N, eps = 4, 16, 64e-5
    g = torch.Generator().manual_seed(5)
    norm = torch.nn.GroupNorm(H, H * N, eps=eps).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(H * N, generator=g))
        norm.bias.copy_(torch.randn(H * N, generator=g))
    y = (3 * torch.randn(2, 5, H, N, generator=g) + 1).to(dtype).requires_grad_()
    ours = head_norm(y, norm)
    assert ours.dtype == torch.promote_types(dtype, torch.float32)
    theirs = norm(y.reshape(-1, H * N)).view(2, 5, H, N)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]  # bf16: GroupNorm rounds its output
    torch.testing.assert_close(ours.to(dtype), theirs, rtol=tol, atol=tol)
    if dtype == torch.float64:
        upstream = torch.randn(2, 5, H, N, generator=g, dtype=dtype)
        ours_grads = torch.autograd.grad(ours, (y, norm.weight, norm.bias), upstream)
        theirs_grads = torch.autograd.grad(theirs, (y, norm.weight, norm.bias), upstream)
        for a, b in zip(ours_grads, theirs_grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def decay_expression(w0, lora):
    z = w0 + lora
    return -DECAY_SCALE * torch.sigmoid(z.to(torch.promote_types(z.dtype, torch.float32)))


def test_log_decay_matches_autograd_of_the_expression():
    g = torch.Generator().manual_seed(3)
    w0 = (torch.randn(1, 1, 16, generator=g, dtype=torch.float64) * 2).requires_grad_()
    lora = torch.randn(2, 5, 16, generator=g, dtype=torch.float64).requires_grad_()
    dlw = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)
    lw = log_decay(w0, lora)
    assert torch.equal(lw, decay_expression(w0, lora))
    got = torch.autograd.grad(lw, (w0, lora), dlw)
    expected = torch.autograd.grad(decay_expression(w0, lora), (w0, lora), dlw)
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    # in bf16 the output is the same float32 values, and the gradients within bf16 rounding of float64's
    w0_16, lora_16 = (t.detach().to(torch.bfloat16).requires_grad_() for t in (w0, lora))
    lw_16 = log_decay(w0_16, lora_16)
    assert lw_16.dtype == torch.float32 and torch.equal(lw_16, decay_expression(w0_16, lora_16))
    for a, b in zip(torch.autograd.grad(lw_16, (w0_16, lora_16), dlw.float()), expected):
        assert a.dtype == torch.bfloat16
        assert ((a.double() - b).norm() / b.norm()) < 1e-2


def test_names_and_shapes_follow_the_reference():
    dims = RWKV7Dims.from_config(ModelConfig(n_layer=2, n_embd=768, head_size=64, vocab_size=65536))
    assert (dims.d_decay, dims.d_aaa, dims.d_mv, dims.d_gate, dims.dim_ffn) == (64, 64, 32, 128, 3072)
    shapes = {k: tuple(v.shape) for k, v in build_model(ModelConfig(n_layer=2, n_embd=768), "meta").state_dict().items()}
    C = 768
    expect = {
        "emb.weight": (65536, C), "blocks.0.ln0.weight": (C,), "blocks.1.ln1.bias": (C,),
        "blocks.0.att.x_r": (1, 1, C), "blocks.0.att.w0": (1, 1, C), "blocks.0.att.w1": (C, 64),
        "blocks.0.att.w2": (64, C), "blocks.0.att.a1": (C, 64), "blocks.1.att.v1": (C, 32),
        "blocks.1.att.v0": (1, 1, C), "blocks.0.att.g1": (C, 128), "blocks.0.att.g2": (128, C),
        "blocks.0.att.k_k": (1, 1, C), "blocks.0.att.k_a": (1, 1, C), "blocks.0.att.r_k": (12, 64),
        "blocks.0.att.receptance.weight": (C, C), "blocks.0.att.ln_x.weight": (C,),
        "blocks.0.ffn.x_k": (1, 1, C), "blocks.0.ffn.key.weight": (4 * C, C), "blocks.0.ffn.value.weight": (C, 4 * C),
        "ln_out.weight": (C,), "head.weight": (65536, C),
    }
    for key, shape in expect.items():
        assert shapes[key] == shape, key
    assert "blocks.0.att.v0" not in shapes and "blocks.1.ln0.weight" not in shapes


def test_reference_initialisation_values():
    cfg = ModelConfig(n_layer=4, n_embd=128, head_size=64, vocab_size=1000)
    model = build_model(cfg)
    C, N, L = 128, 64, 4
    att = model.blocks[1].att
    ratio_0_to_1, ratio_1_to_0 = 1 / (L - 1), 1 - 1 / L
    i = torch.arange(C, dtype=torch.float32)
    torch.testing.assert_close(att.x_r.flatten(), 1 - (i / C) ** (0.2 * ratio_1_to_0))
    linear = i / (C - 1) - 0.5
    zig = ((i % N) - (N - 1) / 2) / ((N - 1) / 2)
    zig = zig * zig.abs()
    www = -6 + 6 * (i / (C - 1)) ** (1 + ratio_0_to_1**0.3)
    torch.testing.assert_close(att.w0.flatten(), www + 0.5 + zig * 2.5)
    torch.testing.assert_close(att.a0.flatten(), -0.19 + zig * 0.3 + linear * 0.4)
    torch.testing.assert_close(att.v0.flatten(), 0.73 - linear * 0.4)
    torch.testing.assert_close(att.k_k.flatten(), 0.71 - linear * 0.1)
    assert torch.all(att.k_a == 1.02) and torch.all(att.r_k == -0.04)
    assert torch.all(att.w1 == 0) and torch.all(att.output.weight == 0)
    assert torch.all(model.blocks[2].ffn.value.weight == 0)
    torch.testing.assert_close(att.ln_x.weight, torch.full((C,), (2 / L) ** 0.7))
    # orthogonal 0.1 up-projections: rows of w2 (32 x 128) are orthogonal with norm 0.1
    assert att.w2.shape == (32, C)
    torch.testing.assert_close(att.w2 @ att.w2.T, 0.01 * torch.eye(32), atol=1e-5, rtol=0)
    torch.testing.assert_close(att.key.weight @ att.key.weight.T, 0.01 * torch.eye(C), atol=1e-5, rtol=0)
    ffn_key = model.blocks[0].ffn.key.weight  # (4C, C): orthonormal columns, gain 1 as the reference
    torch.testing.assert_close(ffn_key.T @ ffn_key, torch.eye(C), atol=1e-4, rtol=0)
    assert model.emb.weight.abs().max() <= 1e-4
    gain = 0.5 * math.sqrt(1000 / C)
    cols = model.head.weight.T @ model.head.weight  # (C, C) = gain^2 I for a tall orthogonal matrix
    torch.testing.assert_close(cols, gain**2 * torch.eye(C), atol=1e-4, rtol=0)


def l2wrap_by_hand(logits: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor:
    """The expected gradient: scale * (softmax - onehot) / n, plus scale * 1e-4 / n * max at each argmax."""
    flat = logits.reshape(-1, logits.shape[-1])
    n = flat.shape[0]
    grad = torch.softmax(flat, -1)
    grad[torch.arange(n), targets.reshape(-1)] -= 1
    grad /= n
    top = flat.argmax(-1)
    grad[torch.arange(n), top] += 1e-4 / n * flat[torch.arange(n), top]
    return (grad * scale).reshape(logits.shape)


@pytest.mark.parametrize("scale", [1.0, 0.25, 1024.0])  # plain, accumulation over 4, fp16 loss scaling
def test_l2wrap_gradient_scales_with_grad_output(scale):
    logits = (torch.randn(2, 5, 11, dtype=torch.float64) * 3).requires_grad_(True)
    targets = torch.randint(0, 11, (2, 5))
    (cross_entropy_l2wrap(logits, targets) * scale).backward()
    torch.testing.assert_close(logits.grad, l2wrap_by_hand(logits.detach(), targets, scale))


@pytest.mark.parametrize("chunk", [3, 7, 1024])
def test_fused_head_loss_matches_unfused(chunk):
    head = Head(16, 50, bias=False).double()
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (3, 7))
    fused = head(x, targets, chunk=chunk)
    (fused * 0.37).backward()
    gx, gw = x.grad.clone(), head.weight.grad.clone()
    x.grad, head.weight.grad = None, None
    plain = cross_entropy_l2wrap(head(x), targets)
    (plain * 0.37).backward()
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, head.weight.grad)


def test_model_loss_equals_cross_entropy_of_logits():
    model = trained_looking(build_model(TINY))
    idx = torch.randint(0, 97, (2, 9))
    targets = torch.randint(0, 97, (2, 9))
    expected = torch.nn.functional.cross_entropy(model(idx)[0].flatten(0, 1), targets.flatten())
    torch.testing.assert_close(model.loss(idx, targets), expected, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = trained_looking(build_model(TINY)).double()
    idx, targets = torch.randint(0, 97, (2, 12)), torch.randint(0, 97, (2, 12))
    model.loss(idx, targets).backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.grad_cp = True
    model.loss(idx, targets).backward()
    for a, p in zip(plain, model.parameters()):
        torch.testing.assert_close(p.grad, a)
