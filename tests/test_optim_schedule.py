"""Optimiser groups and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest

from rwkv_train.config import ModelConfig, OptimConfig
from rwkv_train.models import build_model
from rwkv_train.optim import param_groups
from rwkv_train.schedule import lr_at


def test_groups_decay_only_2d_weights_and_double_w0():
    model = build_model(ModelConfig(n_layer=2, n_embd=64, head_size=32, vocab_size=50), "meta")
    groups = param_groups(model, weight_decay=0.1)
    by_name = {n: (g["lr_scale"], g["weight_decay"]) for g in groups for n in g["param_names"]}
    assert set(by_name) == {n for n, _ in model.named_parameters()}
    assert by_name["blocks.0.att.w0"] == (2.0, 0.0) and by_name["blocks.1.att.w0"] == (2.0, 0.0)
    for name in ("emb.weight", "head.weight", "blocks.0.att.key.weight", "blocks.1.ffn.value.weight"):
        assert by_name[name] == (1.0, 0.1), name
    for name in ("blocks.0.att.w1", "blocks.0.att.r_k", "blocks.0.ln1.weight", "blocks.0.att.ln_x.weight",
                 "blocks.0.att.x_r", "blocks.1.att.v2", "ln_out.bias"):
        assert by_name[name] == (1.0, 0.0), name


def test_no_decay_group_when_weight_decay_is_zero():
    model = build_model(ModelConfig(n_layer=1, n_embd=64, head_size=32, vocab_size=50), "meta")
    assert all(g["weight_decay"] == 0.0 for g in param_groups(model, weight_decay=0.0))


def test_cosine_schedule_by_hand():
    opt = OptimConfig(lr_init=1e-3, lr_final=1e-4, warmup_steps=10, schedule="cosine")
    total = 111  # decay spans steps 10..110
    assert lr_at(0, total, opt) == pytest.approx(1e-3 * 0.01)  # warmup starts at 1%
    assert lr_at(5, total, opt) == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5))
    assert lr_at(10, total, opt) == pytest.approx(1e-3)
    assert lr_at(60, total, opt) == pytest.approx(0.5 * (1e-3 + 1e-4))  # halfway: the mean
    assert lr_at(110, total, opt) == pytest.approx(1e-4)
    assert lr_at(500, total, opt) == pytest.approx(1e-4)


def test_exponential_and_constant_schedules():
    exp = OptimConfig(lr_init=1e-3, lr_final=1e-5, warmup_steps=0, schedule="exponential")
    assert lr_at(50, 101, exp) == pytest.approx(1e-4)  # geometric mean at the midpoint
    assert lr_at(100, 101, exp) == pytest.approx(1e-5)
    const = OptimConfig(lr_init=1e-3, lr_final=1e-5, warmup_steps=0, schedule="constant")
    assert lr_at(77, 101, const) == 1e-3


def test_schedule_is_monotone_after_warmup():
    opt = OptimConfig(lr_init=6e-4, lr_final=6e-5, warmup_steps=3, schedule="cosine")
    lrs = [lr_at(s, 50, opt) for s in range(50)]
    assert all(a <= b for a, b in zip(lrs[:3], lrs[1:4]))
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert math.isclose(max(lrs), 6e-4)


def test_reference_groups_of_rwkv5_and_rwkv6():
    for version in ("v5", "v6"):
        cfg = ModelConfig(version=version, n_layer=2, n_embd=128, head_size=64, vocab_size=50)
        groups = param_groups(build_model(cfg, "meta"), weight_decay=0.1, version=version)
        by_name = {n: (g["lr_scale"], g["weight_decay"]) for g in groups for n in g["param_names"]}
        assert by_name["blocks.0.att.time_decay"] == (2.0, 0.0)
        assert by_name["blocks.0.att.time_faaaa"] == (1.0, 0.0)
        assert by_name["blocks.1.att.key.weight"] == (1.0, 0.1)
        assert by_name["blocks.1.att.ln_x.weight"] == (1.0, 0.0)
        if version == "v6":  # the low-rank decay matrices train at 1x, as the reference's "_w1"/"_w2" rule
            assert by_name["blocks.0.att.time_decay_w1"] == (1.0, 0.0)
            assert by_name["blocks.0.att.time_maa_w2"] == (1.0, 0.0)
        else:
            assert by_name["blocks.0.att.time_mix_g"] == (1.0, 0.0)
