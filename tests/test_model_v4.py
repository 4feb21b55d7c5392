"""The RWKV-4 model: GPT mode against RNN mode, state gradients, reference init, the official runtime."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from rwkv_train.checkpoint import atomic_torch_save, weights_state_dict
from rwkv_train.config import ModelConfig
from rwkv_train.models import build_model, model_from_weights
from rwkv_train.models.common import cross_entropy_l2wrap
from rwkv_train.models.v4 import DEFAULT_EMB_RANGE, RWKV4, RWKV4Dims
from tests.conftest import run_cli

TINY = ModelConfig(version="v4", n_layer=3, n_embd=64, vocab_size=97)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The models here are tiny: intra-op threads only add sync cost, which balloons on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def trained_looking(model: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    """Perturb every parameter so zero-initialised paths (att.key, receptance, output, ffn.value) are exercised."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
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


def test_zero_state_equals_no_state():
    model = trained_looking(build_model(TINY)).double()
    idx = torch.randint(0, 97, (2, 9))
    zero = [[s.double() for s in layer] for layer in model.zero_state(2)]
    torch.testing.assert_close(model(idx, zero)[0], model(idx)[0], rtol=1e-12, atol=1e-12)


def test_gradient_flows_into_the_initial_state():
    """A loss on the second chunk has a gradient w.r.t. the state the first chunk produced (exact BPTT)."""
    model = trained_looking(build_model(TINY)).double()
    idx = torch.randint(0, 97, (1, 20))
    _, state = model(idx[:, :10])
    state = [[s.detach().requires_grad_(True) for s in layer] for layer in state]
    logits, _ = model(idx[:, 10:], state)
    loss = logits.square().mean()
    loss.backward()
    for layer in state:
        for name, s in zip(("att_x_prev", "aa", "bb", "pp", "ffn_x_prev"), layer):
            assert s.grad is not None and s.grad.abs().sum() > 0, name
    # the state is a redundant representation: moving pp by d and scaling aa, bb by e^-d changes nothing
    aa, bb, pp = state[1][1:4]
    invariance = (pp.grad - aa.grad * aa - bb.grad * bb).abs().max().item()
    assert invariance < 1e-10 * max(1.0, pp.grad.abs().max().item())
    # central differences on one entry of each wkv tensor
    for which in (1, 2, 3):
        s = state[1][which]
        eps = 1e-5
        with torch.no_grad():
            s[0, 5] += eps
            up = model(idx[:, 10:], state)[0].square().mean()
            s[0, 5] -= 2 * eps
            down = model(idx[:, 10:], state)[0].square().mean()
            s[0, 5] += eps
        central = (up - down).item() / (2 * eps)
        assert central == pytest.approx(s.grad[0, 5].item(), rel=1e-4, abs=1e-12)


def test_names_and_shapes_follow_the_reference():
    dims = RWKV4Dims.from_config(ModelConfig(version="v4", n_layer=2, n_embd=768, vocab_size=50277))
    assert (dims.dim_ffn, dims.dim_att) == (3072, 768)
    with torch.device("meta"):
        model = RWKV4(dims)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    C, F = 768, 3072
    expected_block0 = {
        "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,),
        "blocks.0.ln1.weight": (C,), "blocks.0.ln1.bias": (C,),
        "blocks.0.ln2.weight": (C,), "blocks.0.ln2.bias": (C,),
        "blocks.0.att.time_decay": (C,), "blocks.0.att.time_first": (C,),
        "blocks.0.att.time_mix_k": (1, 1, C), "blocks.0.att.time_mix_v": (1, 1, C), "blocks.0.att.time_mix_r": (1, 1, C),
        "blocks.0.att.key.weight": (C, C), "blocks.0.att.value.weight": (C, C),
        "blocks.0.att.receptance.weight": (C, C), "blocks.0.att.output.weight": (C, C),
        "blocks.0.ffn.time_mix_k": (1, 1, C), "blocks.0.ffn.time_mix_r": (1, 1, C),
        "blocks.0.ffn.key.weight": (F, C), "blocks.0.ffn.receptance.weight": (C, C), "blocks.0.ffn.value.weight": (C, F),
    }  # fmt: skip
    assert {k: v for k, v in shapes.items() if k.startswith("blocks.0.")} == expected_block0
    block1 = {k.replace("blocks.1.", "blocks.0.") for k in shapes if k.startswith("blocks.1.")}
    assert block1 == set(expected_block0) - {"blocks.0.ln0.weight", "blocks.0.ln0.bias"}
    others = {k: v for k, v in shapes.items() if not k.startswith("blocks.")}
    assert others == {"emb.weight": (50277, C), "ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (50277, C)}
    assert RWKV4Dims.from_state_dict(model.state_dict()) == dims
    assert model.version == "v4"


def test_reference_init_values():
    C, L, V = 96, 4, 1000
    model = build_model(ModelConfig(version="v4", n_layer=L, n_embd=C, vocab_size=V))
    i = torch.arange(C, dtype=torch.float64)
    ddd = (torch.arange(C, dtype=torch.float32) / C).view(1, 1, C)
    for layer in range(L):
        att, ffn = model.blocks[layer].att, model.blocks[layer].ffn
        r01, r10 = layer / (L - 1), 1 - layer / L
        decay = -5 + 8 * (i / (C - 1)) ** (0.7 + 1.3 * r01)
        torch.testing.assert_close(att.time_decay, decay.float())
        zigzag = torch.tensor([0.0, 0.5, -0.5]).repeat(C // 3)
        torch.testing.assert_close(att.time_first, math.log(0.3) + zigzag)
        torch.testing.assert_close(att.time_mix_k, ddd**r10)
        torch.testing.assert_close(att.time_mix_v, ddd**r10 + 0.3 * r01)
        torch.testing.assert_close(att.time_mix_r, ddd ** (0.5 * r10))
        torch.testing.assert_close(ffn.time_mix_k, ddd**r10)
        torch.testing.assert_close(ffn.time_mix_r, ddd**r10)
        for zero in (att.key, att.receptance, att.output, ffn.receptance, ffn.value):
            assert torch.all(zero.weight == 0)
        # orthogonal: att.value gain 1, ffn.key (4C x C) gain sqrt(4C / C) = 2
        torch.testing.assert_close(att.value.weight @ att.value.weight.T, torch.eye(C), atol=1e-5, rtol=0)
        torch.testing.assert_close(ffn.key.weight.T @ ffn.key.weight, 4 * torch.eye(C), atol=1e-4, rtol=0)
    assert model.emb.weight.abs().max() <= DEFAULT_EMB_RANGE
    assert model.emb.weight.abs().max() > 0.9 * DEFAULT_EMB_RANGE
    gain = 0.5 * math.sqrt(V / C)
    torch.testing.assert_close(model.head.weight.T @ model.head.weight, gain**2 * torch.eye(C), atol=1e-4, rtol=0)
    for name, p in model.named_parameters():
        if ".ln" in name or "ln_out" in name:
            assert torch.all(p == (1.0 if name.endswith("weight") else 0.0)), name
    model.reset_parameters(emb_range=3e-3)  # the reference ties this range to lr_init
    assert 2.5e-3 < model.emb.weight.abs().max() <= 3e-3


def test_a_single_layer_model_initialises():
    """The reference divides by n_layer - 1; one layer gets ratio_0_to_1 = 0 instead of a crash."""
    model = build_model(ModelConfig(version="v4", n_layer=1, n_embd=32, vocab_size=20))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_model_loss_equals_cross_entropy_of_logits():
    model = trained_looking(build_model(TINY))
    idx, targets = torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (2, 9))
    expected = torch.nn.functional.cross_entropy(model(idx)[0].flatten(0, 1), targets.flatten())
    torch.testing.assert_close(model.loss(idx, targets), expected, rtol=1e-5, atol=1e-6)


def test_fused_loss_gradients_equal_unfused():
    model = trained_looking(build_model(TINY)).double()
    idx, targets = torch.randint(0, 97, (2, 11)), torch.randint(0, 97, (2, 11))
    (model.loss(idx, targets) * 0.5).backward()
    fused = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (cross_entropy_l2wrap(model(idx)[0], targets) * 0.5).backward()
    for a, (name, p) in zip(fused, model.named_parameters()):
        torch.testing.assert_close(a, p.grad, msg=name)


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


def test_bf16_autocast_forward_is_close_to_fp32():
    model = trained_looking(build_model(TINY))
    idx = torch.randint(0, 97, (2, 16))
    ref = model(idx)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, state = model(idx)
    assert state[0].aa.dtype == torch.float32
    assert (low.float() - ref).abs().max() <= 0.05 * ref.abs().max()


# --- the official runtime ---------------------------------------------------------------------------

# The runtime decides between v4 and v7 at import (RWKV_V7_ON), so it runs in its own process.
RUNTIME = """
import json, sys, numpy as np, torch
from rwkv.model import RWKV
tokens, out = json.loads(sys.argv[1]), []
for path in sys.argv[3:]:
    model = RWKV(model=path[:-4], strategy="cpu fp32")
    assert model.version == 4, model.version
    seq, _ = model.forward(tokens, None, full_output=True)   # GPT mode over the whole prompt
    state, steps = None, []
    for t in tokens:                                          # RNN mode, one token at a time
        step, state = model.forward([t], state)
        steps.append(step.numpy())
    out.append(np.stack([seq.numpy(), np.stack(steps)]))
np.save(sys.argv[2], np.stack(out))
"""


def test_official_runtime_gives_our_logits(tmp_path):
    pytest.importorskip("rwkv", reason="the official runtime (pip install rwkv) is the oracle here")
    model = build_model(ModelConfig(version="v4", n_layer=3, n_embd=128, vocab_size=300))
    trained_looking(model, 0.05)
    with torch.no_grad():  # trained time_decay spreads wider than the init; exercise strong decays too
        for block in model.blocks:
            block.att.time_decay.add_(torch.randn(128) * 2)
            block.att.key.weight.mul_(10)  # keys of a few units, as trained models have
    paths = [tmp_path / "rwkv-fp32.pth", tmp_path / "rwkv-bf16.pth"]
    for path, dtype in zip(paths, (torch.float32, torch.bfloat16)):
        atomic_torch_save(weights_state_dict(model, dtype), path)
    tokens = torch.randint(0, 300, (19,)).tolist()

    result = run_cli("-c", RUNTIME, json.dumps(tokens), str(tmp_path / "out.npy"), *map(str, paths),
                     env={"RWKV_V7_ON": "0", "RWKV_JIT_ON": "1", "RWKV_CUDA_ON": "0"})
    assert result.returncode == 0, result.stderr[-2000:]
    official = np.load(tmp_path / "out.npy")  # (checkpoint, GPT / RNN, T, V)

    # fp32 weights: the same logits. bf16 weights: the runtime applies ln0 to the bf16 embedding in
    # bf16 (rounding it to 3 significant digits), so there it is only close.
    for path, (official_seq, official_rnn), tol in zip(paths, official, (1e-4, 1e-2)):
        ours = model_from_weights(str(path))  # the same (possibly bf16-rounded) weights, in fp32
        assert isinstance(ours, RWKV4)
        with torch.no_grad():
            logits = ours(torch.tensor([tokens]))[0][0].numpy()
        scale = max(1.0, np.abs(logits).max())
        assert np.abs(official_seq - logits).max() <= tol * scale, path.name
        assert np.abs(official_rnn - logits).max() <= tol * scale, path.name
