"""Mixed precision on the CPU: bf16 trains, official weights are saved in bf16, resume weights in fp32."""

from __future__ import annotations

import csv

import torch

from rwkv_train.checkpoint import load_weights
from rwkv_train.config import load_config
from rwkv_train.trainer import run
from tests.conftest import tiny_config


def test_bf16_run_learns_and_saves_both_precisions(tmp_path, corpus):
    out = run(load_config(tiny_config(tmp_path, corpus, train={"precision": "bf16", "max_steps": 8})))
    losses = [float(r["loss"]) for r in csv.DictReader((out / "metrics.csv").open()) if r["loss"]]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 1.0
    assert all(v.dtype == torch.bfloat16 for v in load_weights(out / "rwkv-final.pth").values())
    resume = torch.load(out / "resume.ckpt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in resume["state_dict"].values())
