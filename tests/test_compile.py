"""Compiled blocks (`train.compile`): the same loss and gradients as eager, one graph shared by layers 1..n-1,
checkpoints unchanged, and a compiled training run that follows the eager one step for step."""

from __future__ import annotations

import copy
import csv

import pytest
import torch
from torch._dynamo.utils import counters

from rwkv_train.compiling import compile_fn
from rwkv_train.config import ModelConfig
from rwkv_train.models import build_model
from tests.conftest import run_cli, tiny_config


def loss_and_grads(model, idx, targets):
    model.zero_grad(set_to_none=True)
    loss = model.loss(idx, targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("version,grad_cp", [("v4", True), ("v5", True), ("v6", True), ("v7", True), ("v7", False), ("v7", "selective")])
def test_compiled_blocks_match_eager_with_one_graph_for_later_layers(version, grad_cp):
    cfg = ModelConfig(version=version, n_layer=4, n_embd=64, head_size=16, vocab_size=97, kernel="torch")
    eager = build_model(cfg)
    eager.train()
    eager.grad_cp = grad_cp
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks(backend="aot_eager")  # the traced forward and backward, run by eager kernels
    idx, targets = torch.randint(0, 97, (2, 2, 37))  # T = 37: chunked paths pad their last chunk

    torch._dynamo.reset()
    counters.clear()
    want_loss, want = loss_and_grads(eager, idx, targets)
    got_loss, got = loss_and_grads(compiled, idx, targets)
    # layer 0 (ln0, and for v7 no value residual yet) and layers 1..3 sharing one: no per-layer recompiles,
    # which at 24 layers would pass torch's recompile limit and fall back to eager silently
    assert counters["stats"]["unique_graphs"] == 2

    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=0)
    for name, g in want.items():
        err = (got[name] - g).abs().max() / g.abs().max().clamp_min(1e-30)
        assert err < 1e-4, f"{name}: {err:.2e}"
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints keep the official keys


def test_compile_fn_rejects_an_unknown_backend():
    with pytest.raises(ValueError, match="unknown compile backend 'tensorrt'.*inductor"):
        compile_fn(lambda x: x, backend="tensorrt")


@pytest.mark.slow
def test_training_with_compile_follows_the_eager_run(tmp_path, corpus):
    """train.compile: true through train.py (inductor, fused C++ kernels on the CPU): the same losses."""
    losses = {}
    for name, flag in (("eager", "false"), ("compiled", "true")):
        cfg = tiny_config(tmp_path, corpus, train={"max_steps": 4, "out_dir": str(tmp_path / name)})
        result = run_cli("train.py", "--config", str(cfg), f"train.compile={flag}", timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        assert ("blocks compile" in result.stderr) == (name == "compiled")
        rows = list(csv.DictReader((tmp_path / name / "metrics.csv").open()))
        losses[name] = [float(r["loss"]) for r in rows if r["loss"]]
    assert len(losses["eager"]) == 4
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4)


def test_compile_fn_autotune_is_an_inductor_setting():
    with pytest.raises(ValueError, match="autotune is an inductor setting"):
        compile_fn(lambda x: x, backend="aot_eager", autotune=True)
