"""Multi-process training on the CPU (gloo), and the DeepSpeed config each strategy setting produces."""

from __future__ import annotations

import csv

import pytest

from rwkv_train.config import from_dict
from rwkv_train.plan import make_plan
from rwkv_train.trainer import deepspeed_config, make_strategy
from tests.conftest import run_cli, tiny_config


def losses(out_dir) -> list[float]:
    return [float(r["loss"]) for r in csv.DictReader((out_dir / "metrics.csv").open()) if r["loss"]]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_at_the_same_global_batch(tmp_path, corpus):
    cfg = tiny_config(tmp_path, corpus, train={"max_steps": 4})
    one = run_cli("train.py", "--config", str(cfg), "train.micro_bsz=4", f"train.out_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli("train.py", "--config", str(cfg), "train.micro_bsz=2", "train.devices=2", "train.strategy=ddp",
                  f"train.out_dir={tmp_path / 'two'}", timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 4
    assert a == pytest.approx(b, rel=1e-5, abs=1e-5)
    assert "world 2 x micro_bsz 2" in two.stderr


def config(**train):
    return from_dict({"data": {"train": "x", "ctx_len": 64},
                      "train": {"max_steps": 10, "micro_bsz": 4, "devices": 8, "strategy": "deepspeed", **train}})


@pytest.mark.parametrize(
    "train, stage, offload_opt, offload_param",
    [
        ({"zero_stage": 1}, 1, False, False),
        ({"zero_stage": 2}, 2, False, False),
        ({"zero_stage": 2, "offload": "optimizer"}, 2, True, False),
        ({"zero_stage": 3}, 3, False, False),
        ({"zero_stage": 3, "offload": "all"}, 3, True, True),
    ],
)
def test_deepspeed_config_per_setting(train, stage, offload_opt, offload_param):
    cfg = config(precision="bf16", **train)
    plan = make_plan(cfg, num_params=1000, magic_primes=(11,))
    ds = deepspeed_config(cfg, plan)
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage
    assert ("offload_optimizer" in zero) == offload_opt
    assert ("offload_param" in zero) == offload_param
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 1
    assert ds["gradient_clipping"] == cfg.optim.grad_clip
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds


def test_deepspeed_fp16_uses_dynamic_loss_scaling():
    cfg = config(precision="fp16")
    ds = deepspeed_config(cfg, make_plan(cfg, 1000, (11,)))
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0 and not ds["bf16"]["enabled"]


def test_strategies_hand_the_config_to_lightning():
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    cfg = config(zero_stage=3, offload="all")
    strategy = make_strategy(cfg, make_plan(cfg, 1000, (11,)))
    assert type(strategy).__name__ == "DeepSpeedStrategy"
    assert strategy.config["zero_optimization"]["stage"] == 3
    ddp = make_strategy(from_dict({"data": {"train": "x"}, "train": {"max_steps": 1, "strategy": "ddp"}}), None)
    assert type(ddp).__name__ == "DDPStrategy"


def test_global_batch_arithmetic():
    cfg = config(global_bsz=64, strategy="ddp")
    plan = make_plan(cfg, 1000, (11,))
    assert (plan.world, plan.accumulate, plan.global_bsz, plan.tokens_per_step) == (8, 2, 64, 64 * 64)
    with pytest.raises(Exception, match="not supported with train.strategy=deepspeed"):
        make_plan(config(global_bsz=64), 1000, (11,))
    tokens = from_dict({"data": {"train": "x", "ctx_len": 100}, "train": {"max_tokens": 1050, "micro_bsz": 2}})
    assert make_plan(tokens, 1000, (11,)).total_steps == 6  # ceil(1050 / 200)
    with pytest.raises(Exception, match="not a multiple of micro_bsz x devices x num_nodes = 32"):
        make_plan(config(global_bsz=40), 1000, (11,))
