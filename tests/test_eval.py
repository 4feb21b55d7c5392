"""Evaluation: windowed loss, loss by position with the state carried in chunks, sampling."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from rwkv_train.checkpoint import atomic_torch_save
from rwkv_train.config import ModelConfig
from rwkv_train.data.binidx import BinIdx
from rwkv_train.evaluate import long_documents, loss_by_position, sample_token, windowed_loss
from rwkv_train.models import build_model
from tests.conftest import run_cli, write_corpus


def tiny_model():
    model = build_model(ModelConfig(n_layer=2, n_embd=64, head_size=32, vocab_size=256))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_loss_by_position_is_the_same_whatever_the_chunk(tmp_path):
    data = BinIdx(write_corpus(tmp_path / "c", 4000, docs=4))  # 1000-token documents
    model = tiny_model()
    docs = long_documents(data, 300, max_docs=3)
    assert docs == [0, 1, 2]
    chunked, n = loss_by_position(model, data, docs, 300, chunk=37, batch=2)
    whole, _ = loss_by_position(model, data, docs, 300, chunk=300, batch=3)
    assert n == 3 and chunked.shape == (300,)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)
    # position 5 by hand: the loss of predicting token 6 of each document after reading tokens 0..5
    expected = 0.0
    for d in docs:
        tokens = torch.from_numpy(data.document(d)[:7].astype(np.int64))
        logits = model(tokens[None, :6])[0][0, 5]
        expected += torch.nn.functional.cross_entropy(logits[None], tokens[6:7]).item() / 3
    assert chunked[5] == pytest.approx(expected, rel=1e-5)


def test_windowed_loss_matches_a_direct_computation(tmp_path):
    data = BinIdx(write_corpus(tmp_path / "c", 1000))
    model = tiny_model()
    result = windowed_loss(model, data, ctx_len=50, max_tokens=200, batch=3)
    tokens = torch.from_numpy(np.asarray(data.tokens[:201], dtype=np.int64))
    total = 0.0
    for j in range(4):
        window = tokens[50 * j : 50 * j + 51]
        total += torch.nn.functional.cross_entropy(model(window[None, :-1])[0][0], window[1:], reduction="sum").item()
    assert result["tokens"] == 200
    assert result["loss"] == pytest.approx(total / 200, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / 200), rel=1e-4)


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    gen = torch.Generator().manual_seed(0)
    picks = {sample_token(logits, 1.0, 0.7, gen) for _ in range(200)}
    assert picks == {0, 1}  # 0.5 + 0.3 reaches 0.7; 2 and 3 are never drawn
    assert sample_token(logits, 0.0, 0.7, gen) == 0  # temperature 0: greedy


def test_by_position_cli_writes_csv_and_png(tmp_path):
    prefix = write_corpus(tmp_path / "c", 3000, docs=3)
    atomic_torch_save(tiny_model().state_dict(), tmp_path / "m.pth")
    out = tmp_path / "curve"
    result = run_cli("scripts/eval.py", "--checkpoint", str(tmp_path / "m.pth"), "--data", str(prefix),
                     "--by-position", "--ctx-len", "256", "--chunk", "64", "--out", str(out))
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stdout)
    assert line["documents"] == 3 and line["positions"] == 256
    rows = (tmp_path / "curve.csv").read_text().splitlines()
    assert rows[0] == "position,mean_loss" and len(rows) == 257
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    too_long = run_cli("scripts/eval.py", "--checkpoint", str(tmp_path / "m.pth"), "--data", str(prefix),
                       "--by-position", "--ctx-len", "5000")
    assert too_long.returncode == 2 and "no document" in too_long.stderr and "lower --ctx-len" in too_long.stderr
