"""The RWKV-6 model: GPT mode against RNN mode, state gradients, reference names and init, the official runtime."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from rwkv_train.checkpoint import atomic_torch_save, load_weights, weights_state_dict
from rwkv_train.config import ModelConfig
from rwkv_train.models.v6 import RWKV6, RWKV6Dims
from tests.conftest import run_cli

TINY = ModelConfig(version="v6", n_layer=3, n_embd=64, head_size=32, vocab_size=97)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models: intra-op threads only add sync cost, which balloons on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(cfg: ModelConfig) -> RWKV6:
    """As the registry builds models: on the meta device, then allocated, then the reference init."""
    with torch.device("meta"):
        model = RWKV6(RWKV6Dims.from_config(cfg))
    model = model.to_empty(device="cpu")
    model.reset_parameters()
    return model


def trained_looking(model: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    """Perturb every parameter so zero-initialised paths (output, ffn.receptance, ffn.value, *_w1) are exercised."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def test_gpt_mode_equals_rnn_mode_in_float64():
    model = trained_looking(build(TINY)).double()
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
    model = trained_looking(build(TINY)).double()
    idx = torch.randint(0, 97, (1, 40))
    whole, _ = model(idx)
    first, state = model(idx[:, :17])
    second, _ = model(idx[:, 17:], state)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-10, atol=1e-10)
    zero = model.zero_state(1)  # an explicit zero state is the same as none
    torch.testing.assert_close(model(idx, [[s.double() for s in layer] for layer in zero])[0], whole)


def test_gradient_flows_into_the_initial_state():
    """A loss on the second chunk has a gradient w.r.t. the state the first chunk produced (exact BPTT)."""
    model = trained_looking(build(TINY)).double()
    idx = torch.randint(0, 97, (1, 20))
    _, state = model(idx[:, :10])
    state = [[s.detach().requires_grad_(True) for s in layer] for layer in state]
    logits, _ = model(idx[:, 10:], state)
    logits.square().mean().backward()
    for layer in state:
        for s in layer:
            assert s.grad is not None and s.grad.abs().sum() > 0
    wkv = state[1][1]  # finite-difference check on one wkv state entry
    eps = 1e-7
    with torch.no_grad():
        wkv[0, 0, 1, 2] += eps
        up = model(idx[:, 10:], state)[0].square().mean()
        wkv[0, 0, 1, 2] -= 2 * eps
        down = model(idx[:, 10:], state)[0].square().mean()
    central = (up - down).item() / (2 * eps)
    assert central == pytest.approx(wkv.grad[0, 0, 1, 2].item(), rel=2e-3)


def test_names_and_shapes_follow_the_reference():
    """Every key and shape of the reference x060 model (RWKV_Tmix_x060, RWKV_CMix_x060, RWKV), nothing more."""
    C, H, N, V, F = 768, 12, 64, 65536, 2688
    dims = RWKV6Dims.from_config(ModelConfig(version="v6", n_layer=2, n_embd=C, head_size=N, vocab_size=V))
    assert (dims.dim_ffn, dims.n_head, dims.d_mix, dims.d_decay) == (F, H, 32, 64)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in RWKV6(dims).state_dict().items()}
    expect = {"emb.weight": (V, C), "ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)}
    expect |= {"blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,)}
    for i in range(2):
        b = f"blocks.{i}."
        expect |= {b + f"ln{j}.{p}": (C,) for j in (1, 2) for p in ("weight", "bias")}
        expect |= {b + f"att.time_maa_{x}": (1, 1, C) for x in "xwkvrg"}
        expect |= {b + "att.time_maa_w1": (C, 32 * 5), b + "att.time_maa_w2": (5, 32, C)}
        expect |= {b + "att.time_decay": (1, 1, C), b + "att.time_decay_w1": (C, 64), b + "att.time_decay_w2": (64, C)}
        expect |= {b + "att.time_faaaa": (H, N)}
        expect |= {b + f"att.{x}.weight": (C, C) for x in ("receptance", "key", "value", "output", "gate")}
        expect |= {b + "att.ln_x.weight": (C,), b + "att.ln_x.bias": (C,)}
        expect |= {b + "ffn.time_maa_k": (1, 1, C), b + "ffn.time_maa_r": (1, 1, C)}
        expect |= {b + "ffn.key.weight": (F, C), b + "ffn.receptance.weight": (C, C), b + "ffn.value.weight": (C, F)}
    assert shapes == expect
    assert RWKV6.version == "v6"


def test_dims_round_trip_through_a_state_dict():
    """Low-rank widths come from the shapes (larger official models use wider ones), not from constants."""
    dims = RWKV6Dims(n_layer=3, n_embd=128, head_size=32, vocab_size=50, dim_ffn=256, d_mix=64, d_decay=128)
    with torch.device("meta"):
        state = RWKV6(dims).state_dict()
    assert RWKV6Dims.from_state_dict(state) == dims
    cfg = ModelConfig(version="v6", n_layer=3, n_embd=128, head_size=32, vocab_size=50, dim_ffn=256)
    assert RWKV6Dims.from_config(cfg) == RWKV6Dims(3, 128, 32, 50, 256, d_mix=32, d_decay=64)


def test_reference_initialisation_values():
    L, C, N, V = 4, 128, 64, 1000
    model = build(ModelConfig(version="v6", n_layer=L, n_embd=C, head_size=N, vocab_size=V))
    F = model.dims.dim_ffn
    layer = 1
    att, ffn = model.blocks[layer].att, model.blocks[layer].ffn
    r01, r1 = layer / (L - 1), 1 - layer / L
    ddd = torch.arange(C, dtype=torch.float32) / C
    for name in ("x", "w", "k"):
        torch.testing.assert_close(getattr(att, f"time_maa_{name}").flatten(), 1 - ddd**r1)
    torch.testing.assert_close(att.time_maa_v.flatten(), 1 - (ddd**r1 + 0.3 * r01))
    torch.testing.assert_close(att.time_maa_r.flatten(), 1 - ddd ** (0.5 * r1))
    torch.testing.assert_close(att.time_maa_g.flatten(), 1 - ddd ** (0.5 * r1))
    decay = [-6 + 5 * (n / (C - 1)) ** (0.7 + 1.3 * r01) for n in range(C)]
    faaaa = [r01 * (1 - n / (C - 1)) + ((n + 1) % 3 - 1) * 0.1 for n in range(C)]
    torch.testing.assert_close(att.time_decay, torch.tensor(decay).view(1, 1, C))
    torch.testing.assert_close(att.time_faaaa, torch.tensor(faaaa).view(C // N, N))
    # low rank: the down-projections zero, the up-projections uniform in +-0.01
    assert torch.all(att.time_maa_w1 == 0) and torch.all(att.time_decay_w1 == 0)
    for w in (att.time_maa_w2, att.time_decay_w2):
        assert w.abs().max() <= 0.01 and w.abs().max() > 0.009
        assert w.std().item() == pytest.approx(0.02 / 12**0.5, rel=0.1)
    torch.testing.assert_close(ffn.time_maa_k.flatten(), 1 - ddd ** (r1**3))
    torch.testing.assert_close(ffn.time_maa_r.flatten(), 1 - ddd ** (r1**3))
    # orthogonal with gain = scale: receptance/value 1, key/gate 0.1; output and ffn receptance/value zero
    eye = torch.eye(C)
    for lin, gain in ((att.receptance, 1.0), (att.value, 1.0), (att.key, 0.1), (att.gate, 0.1)):
        torch.testing.assert_close(lin.weight @ lin.weight.T, gain**2 * eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(ffn.key.weight.T @ ffn.key.weight, eye, atol=1e-5, rtol=0)  # (F, C): no sqrt(F/C)
    assert ffn.key.weight.shape == (F, C)
    for w in (att.output.weight, ffn.receptance.weight, ffn.value.weight):
        assert torch.all(w == 0)
    torch.testing.assert_close(att.ln_x.weight, torch.full((C,), (2 / L) ** 0.7))
    assert torch.all(att.ln_x.bias == 0) and att.ln_x.eps == pytest.approx(64e-5)
    assert torch.all(model.blocks[0].ln0.weight == 1) and torch.all(model.blocks[3].ln2.bias == 0)
    assert model.emb.weight.abs().max() <= 1e-4
    gain = 0.5 * math.sqrt(V / C)
    torch.testing.assert_close(model.head.weight.T @ model.head.weight, gain**2 * eye, atol=1e-4, rtol=0)
    first, last = model.blocks[0].att, model.blocks[L - 1].att
    torch.testing.assert_close(first.time_faaaa.flatten(), torch.tensor([((n + 1) % 3 - 1) * 0.1 for n in range(C)]))
    assert last.time_decay.flatten()[0] == -6 and last.time_decay.flatten()[-1] == -1


def test_strong_learned_decays_stay_exact():
    """Trained RWKV-6 decays can be far stronger than at init (w = exp(-exp(z)) per token): the model in
    float32 still matches itself in float64, through the explicit intra-chunk form."""
    model = trained_looking(build(TINY)).double()
    with torch.no_grad():
        for block in model.blocks:
            block.att.time_decay[..., ::4] = 4.0  # w = exp(-e^4) ~ 2e-24 per token on a quarter of the channels
    idx = torch.randint(0, 97, (2, 50))
    ref, ref_state = model(idx)
    low, low_state = model.float()(idx)
    torch.testing.assert_close(low.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(low_state[2].wkv.double(), ref_state[2].wkv, rtol=1e-4, atol=1e-4)


def test_model_loss_equals_cross_entropy_of_logits():
    model = trained_looking(build(TINY))
    idx = torch.randint(0, 97, (2, 9))
    targets = torch.randint(0, 97, (2, 9))
    expected = torch.nn.functional.cross_entropy(model(idx)[0].flatten(0, 1), targets.flatten())
    torch.testing.assert_close(model.loss(idx, targets), expected, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = trained_looking(build(TINY)).double()
    idx, targets = torch.randint(0, 97, (2, 12)), torch.randint(0, 97, (2, 12))
    model.loss(idx, targets).backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.grad_cp = True
    model.loss(idx, targets).backward()
    for a, p in zip(plain, model.parameters()):
        torch.testing.assert_close(p.grad, a)


def test_bf16_autocast_forward_stays_close():
    model = trained_looking(build(TINY))
    idx = torch.randint(0, 97, (2, 40))
    ref, _ = model(idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, state = model(idx)
    assert state[0].wkv.dtype == torch.float32
    assert (low.float() - ref).abs().max() <= 0.05 * ref.abs().max()


# --- the official runtime ------------------------------------------------------------------------------

# The runtime reads its environment at import, so it runs in its own process (without RWKV_V7_ON).
RUNTIME = """
import json, sys, numpy as np, torch
from rwkv.model import RWKV
path, tokens = sys.argv[1], json.loads(sys.argv[2])
model = RWKV(model=path[:-4], strategy="cpu fp32")
seq, _ = model.forward(tokens, None, full_output=True)       # GPT mode over the whole prompt
state, steps = None, []
for t in tokens:                                              # RNN mode, one token at a time
    out, state = model.forward([t], state)
    steps.append(out.numpy())
np.save(sys.argv[3], np.stack([seq.numpy(), np.stack(steps)]))
print(f"version {float(model.version):.1f}")
"""


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_official_runtime_gives_our_logits(tmp_path, dtype):
    pytest.importorskip("rwkv", reason="the official runtime (pip install rwkv) is the oracle here")
    model = trained_looking(build(ModelConfig(version="v6", n_layer=3, n_embd=128, head_size=64, vocab_size=300)), 0.05)
    path = tmp_path / "rwkv-final.pth"
    atomic_torch_save(weights_state_dict(model, dtype), path)
    saved = load_weights(path)
    model.load_state_dict({k: v.float() for k, v in saved.items()})  # the same (rounded) weights
    if dtype == torch.bfloat16:
        # The runtime folds ln0 into the embedding table at load, in the checkpoint's dtype: do the same.
        table = torch.nn.functional.layer_norm(
            saved["emb.weight"], (128,), saved["blocks.0.ln0.weight"], saved["blocks.0.ln0.bias"]
        )
        with torch.no_grad():
            model.emb.weight.copy_(table.float())
        model.blocks[0].ln0 = torch.nn.Identity()
    tokens = torch.randint(0, 300, (19,)).tolist()
    env = {"RWKV_V7_ON": "0", "RWKV_JIT_ON": "1", "RWKV_CUDA_ON": "0"}
    result = run_cli("-c", RUNTIME, str(path), json.dumps(tokens), str(tmp_path / "out.npy"), env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "version 6.0" in result.stdout
    official_seq, official_rnn = np.load(tmp_path / "out.npy")

    with torch.no_grad():
        logits = model(torch.tensor([tokens]))[0][0].numpy()
    scale = max(1.0, np.abs(logits).max())
    assert np.abs(official_seq - logits).max() <= 1e-4 * scale
    assert np.abs(official_rnn - logits).max() <= 1e-4 * scale
