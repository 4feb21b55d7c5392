"""A run stopped after k steps and resumed reproduces the uninterrupted run loss for loss."""

from __future__ import annotations

import csv
import shutil

import lightning as L
import pytest
import torch

from rwkv_train.checkpoint import load_weights
from rwkv_train.config import load_config
from rwkv_train.errors import ConfigError
from rwkv_train.trainer import run
from tests.conftest import tiny_config


class Killed(Exception):
    pass


class KillAfter(L.Callback):
    """Stands in for a crash: the process dies right after step `step` (and its checkpoint)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Killed


def losses(out_dir) -> dict[int, float]:
    rows = [r for r in csv.DictReader((out_dir / "metrics.csv").open()) if r["loss"]]
    steps = [int(r["step"]) for r in rows]
    assert len(steps) == len(set(steps)), f"metrics.csv repeats steps: {steps}"
    return {int(r["step"]): float(r["loss"]) for r in rows}


def test_resume_reproduces_the_uninterrupted_run(tmp_path, corpus):
    overrides = {"train": {"max_steps": 8, "save_every": 3, "micro_bsz": 2, "accumulate": 2},
                 "optim": {"warmup_steps": 2, "weight_decay": 0.1}}
    path = tiny_config(tmp_path, corpus, **overrides)

    full = run(load_config(path, [f"train.out_dir={tmp_path / 'full'}"]))

    broken_dir = tmp_path / "broken"
    with pytest.raises(Killed):
        run(load_config(path, [f"train.out_dir={broken_dir}"]), callbacks=[KillAfter(4)])
    assert sorted(losses(broken_dir)) == [1, 2, 3, 4]
    assert not (broken_dir / "rwkv-final.pth").exists()

    # a fresh start into that directory is refused: it holds a run
    with pytest.raises(ConfigError, match="train.resume=auto"):
        run(load_config(path, [f"train.out_dir={broken_dir}"]))

    run(load_config(path, [f"train.out_dir={broken_dir}", "train.resume=auto"]))  # continues from step 3
    expected, got = losses(full), losses(broken_dir)
    assert sorted(expected) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == expected[step], f"step {step}: resumed {got[step]} vs uninterrupted {expected[step]}"
    a, b = load_weights(full / "rwkv-final.pth"), load_weights(broken_dir / "rwkv-final.pth")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_into_a_run_with_another_config_is_refused(tmp_path, corpus):
    path = tiny_config(tmp_path, corpus, train={"max_steps": 2})
    out = run(load_config(path))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(ConfigError, match=r"optim.lr_init: run has 0.003, now 0.01"):
        run(load_config(path, ["train.resume=auto", "optim.lr_init=0.01", "train.max_steps=4"]))
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_resume_checkpoint_loads_weights_only(tmp_path, corpus):
    out = run(load_config(tiny_config(tmp_path, corpus, train={"max_steps": 2})))
    ckpt = torch.load(out / "resume.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["rwkv_run"]["step"] == 2
    assert "optimizer_states" in ckpt and "lr_schedulers" in ckpt
    assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values())  # full-precision weights
    shutil.rmtree(out)
