"""The real command-line tools end to end, and bad input: one clear error, exit 2, nothing half-written."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch

from rwkv_train.checkpoint import atomic_torch_save, load_weights
from rwkv_train.config import ModelConfig
from rwkv_train.models import build_model
from tests.conftest import run_cli, tiny_config, write_corpus

pytestmark = pytest.mark.slow

TEXT = "The quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸跳过了懒狗。\n" * 40


def test_data_train_eval_generate(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": TEXT[i:] + str(i)}) + "\n" for i in range(30)))
    made = run_cli("data_prep/make_binidx.py", "--input", str(src), "--output", str(tmp_path / "corpus"))
    assert made.returncode == 0, made.stderr
    cfg = tiny_config(tmp_path, tmp_path / "corpus", model={"vocab_size": 65536},
                      data={"val": str(tmp_path / "corpus"), "val_every": 3, "val_tokens": 256},
                      train={"max_steps": 6, "save_every": 3})
    out = tmp_path / "run"
    trained = run_cli("train.py", "--config", str(cfg), "optim.lr_init=0.01")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "magic prime" in trained.stderr and "parameters" in trained.stderr
    for name in ("rwkv-3.pth", "rwkv-final.pth", "resume.ckpt", "metrics.csv", "loss.png", "config.yaml"):
        assert (out / name).exists(), name
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    train_rows = [r for r in rows if r["loss"]]
    assert [int(r["step"]) for r in train_rows] == list(range(1, 7))
    assert all(float(r["tokens_per_s"]) > 0 and float(r["grad_norm"]) > 0 for r in train_rows)
    assert all(float(r["tokens_per_s_per_gpu"]) == float(r["tokens_per_s"]) and r["mfu"] == "" for r in train_rows)
    assert [int(r["step"]) for r in rows if r["val_loss"]] == [3, 6]
    assert float(train_rows[-1]["loss"]) < float(train_rows[0]["loss"])
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"

    scored = run_cli("scripts/eval.py", "--checkpoint", str(out / "rwkv-final.pth"), "--data",
                     str(tmp_path / "corpus"), "--ctx-len", "32", "--max-tokens", "256")
    assert scored.returncode == 0, scored.stderr
    result = json.loads(scored.stdout)
    assert result["tokens"] == 256 and result["perplexity"] == pytest.approx(2.718281828 ** result["loss"], rel=1e-3)
    # the validation loss logged at the end is the same measurement (same windows, same weights)
    assert result["loss"] == pytest.approx(float([r for r in rows if r["val_loss"]][-1]["val_loss"]), abs=1e-4)

    sampled = run_cli("scripts/generate.py", "--checkpoint", str(out / "rwkv-final.pth"), "--prompt", "The quick",
                      "--max-tokens", "8", "--temperature", "0")
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.startswith("The quick") and len(sampled.stdout) > len("The quick")


def test_model_load_starts_from_a_checkpoint(tmp_path, corpus):
    model = build_model(ModelConfig(n_layer=2, n_embd=64, head_size=32, vocab_size=256))
    atomic_torch_save(model.state_dict(), tmp_path / "init.pth")
    cfg = tiny_config(tmp_path, corpus, model={"load": str(tmp_path / "init.pth")}, train={"max_steps": 1})
    result = run_cli("train.py", "--config", str(cfg), "optim.lr_init=1e-9", "optim.lr_final=1e-9")
    assert result.returncode == 0, result.stderr[-2000:]
    after = load_weights(tmp_path / "run" / "rwkv-final.pth")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(after[k], v, atol=1e-6, rtol=0)


def bad_idx(tmp_path):
    prefix = write_corpus(tmp_path / "bad", 5000)
    raw = bytearray((tmp_path / "bad.idx").read_bytes())
    raw[:9] = b"NOTMAGIC!"
    (tmp_path / "bad.idx").write_bytes(raw)
    return [f"data.train={prefix}"]


def other_shape(tmp_path):
    model = build_model(ModelConfig(n_layer=2, n_embd=128, head_size=32, vocab_size=256))
    atomic_torch_save(model.state_dict(), tmp_path / "wide.pth")
    return [f"model.load={tmp_path / 'wide.pth'}"]


def other_version(tmp_path):
    v6 = {"emb.weight": torch.zeros(256, 64), "blocks.0.att.time_maa_x": torch.zeros(1, 1, 64),
          "blocks.0.att.time_faaaa": torch.zeros(2, 32)}
    atomic_torch_save(v6, tmp_path / "v6.pth")
    return [f"model.load={tmp_path / 'v6.pth'}"]


BAD = {
    "misspelled key": (lambda p: ["train.max_step=5"], r"unknown key 'train.max_step' \(did you mean train.max_steps\?\)"),
    "ctx_len longer than corpus": (lambda p: ["data.ctx_len=40000"], r"corpus has 20000 tokens, ctx_len 40000"),
    "vocab below data": (lambda p: ["model.vocab_size=10"], r"holds token id \d+ but model.vocab_size is 10"),
    "n_embd vs head_size": (lambda p: ["model.n_embd=80"], r"n_embd=80 is not divisible by model.head_size=32"),
    "missing data": (lambda p: [f"data.train={p / 'nope'}"], r"nope\.(idx|bin) does not exist"),
    "wrong idx magic": (bad_idx, r"not a binidx index"),
    "checkpoint of another shape": (other_shape, r"does not fit the configured model.*n_embd: checkpoint 128, model 64"),
    "checkpoint of another version": (other_version, r"RWKV-v6 checkpoint but model.version is v7"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_gets_one_clear_error(tmp_path, corpus, case):
    make_args, message = BAD[case]
    cfg = tiny_config(tmp_path, corpus)
    result = run_cli("train.py", "--config", str(cfg), *make_args(tmp_path))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    import re

    assert re.search(message, result.stderr, re.S), result.stderr
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_wandb_offline_run(tmp_path, corpus):
    cfg = tiny_config(tmp_path, corpus, train={"max_steps": 2}, logging={"wandb": "offline", "project": "t"})
    result = run_cli("train.py", "--config", str(cfg), env={"WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    shutil.rmtree(tmp_path / "run")
