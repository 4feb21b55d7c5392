"""Checkpoints written here load in the official `rwkv` runtime and give the same logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rwkv_train.checkpoint import atomic_torch_save, load_weights, weights_state_dict
from rwkv_train.config import ModelConfig
from rwkv_train.models import build_model, model_from_weights
from tests.conftest import run_cli

pytest.importorskip("rwkv", reason="the official runtime (pip install rwkv) is the oracle here")

# The runtime reads RWKV_V7_ON at import, so it runs in its own process.
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
"""


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():  # exercise the zero-initialised paths too
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_official_runtime_gives_our_logits(tmp_path, dtype):
    cfg = ModelConfig(n_layer=3, n_embd=128, head_size=64, vocab_size=300)
    model = perturbed(build_model(cfg))
    path = tmp_path / "rwkv-final.pth"
    atomic_torch_save(weights_state_dict(model, dtype), path)
    tokens = torch.randint(0, 300, (19,)).tolist()

    result = run_cli("-c", RUNTIME, str(path), json.dumps(tokens), str(tmp_path / "out.npy"),
                     env={"RWKV_V7_ON": "1", "RWKV_JIT_ON": "1", "RWKV_CUDA_ON": "0"})
    assert result.returncode == 0, result.stderr[-2000:]
    official_seq, official_rnn = np.load(tmp_path / "out.npy")

    ours = model_from_weights(str(path))  # the same (possibly bf16-rounded) weights, in fp32
    with torch.no_grad():
        logits = ours(torch.tensor([tokens]))[0][0].numpy()
    scale = np.abs(logits).max()
    assert np.abs(official_seq - logits).max() <= 1e-4 * max(1.0, scale)
    assert np.abs(official_rnn - logits).max() <= 1e-4 * max(1.0, scale)


def test_saved_weights_are_flat_official_tensors(tmp_path):
    model = build_model(ModelConfig(n_layer=2, n_embd=64, head_size=32, vocab_size=50))
    path = tmp_path / "rwkv-1.pth"
    atomic_torch_save(weights_state_dict(model, torch.bfloat16), path)
    state = load_weights(path)  # weights_only=True inside
    assert set(state) == set(model.state_dict())
    assert all(v.dtype == torch.bfloat16 for v in state.values())
    assert not any(k.startswith("model.") for k in state)
    assert not list(tmp_path.glob("*.tmp"))
