"""Training FLOPs per token, device peaks and MFU; the throughput columns of metrics.csv."""

from __future__ import annotations

import importlib.util

import csv
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import rwkv_train.callbacks
from rwkv_train import flops
from rwkv_train.config import ModelConfig, load_config
from rwkv_train.models import build_model
from rwkv_train.trainer import run
from tests.conftest import REPO, run_cli, tiny_config

VERSIONS = ("v4", "v5", "v6", "v7")


def tiny(version: str, n_layer: int = 2) -> ModelConfig:
    return ModelConfig(version=version, n_layer=n_layer, n_embd=64, head_size=16, vocab_size=97)


def real_matrix_params(model_cfg: ModelConfig) -> int:
    """2-D non-embedding weights of the built model; per-head vectors [H, N] (bonus, r_k, v5 decay) are not
    matrices, while v6's time_maa_w2 [5, d, C] is five of them."""
    model = build_model(model_cfg, device="meta")
    per_head = (model_cfg.n_head, model_cfg.head_size)
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if name != "emb.weight" and p.squeeze().dim() >= 2 and tuple(p.shape) != per_head
    )


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("n_layer", [1, 3])  # v7's layer 0 has no value-residual matrices
def test_matrix_params_match_the_real_model(version, n_layer):
    cfg = tiny(version, n_layer)
    assert flops.matrix_params(cfg) == real_matrix_params(cfg)


@pytest.mark.parametrize("version", VERSIONS)
def test_matrix_params_are_the_forward_matmul_flops(version, monkeypatch):
    """Every counted parameter does one multiply-add per token: with the WKV stubbed out, the matmul
    FLOPs torch counts in a forward pass are exactly 2 x tokens x matrix_params."""
    module = __import__(f"rwkv_train.models.{version}", fromlist=["_"])
    op = {"v4": "wkv4", "v5": "wkv5", "v6": "wkv6", "v7": "wkv7"}[version]
    if version == "v4":  # wkv4(w, u, k, v, state) -> (y, (aa, bb, pp))
        monkeypatch.setattr(module, op, lambda w, u, k, v, state=None, backend=None: (v, (None, None, None)))
    else:  # wkv(r, lw, k, v, ..., state) -> (y, state)
        monkeypatch.setattr(module, op, lambda *args, **kwargs: (args[3], None))
    cfg = tiny(version)
    model = build_model(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 5))
    with FlopCounterMode(display=False) as counter:
        model(idx)
    assert counter.get_total_flops() == 2 * idx.numel() * flops.matrix_params(cfg)


def test_flops_per_token_by_hand():
    # v7, 2 layers of 4 heads x 16: WKV forward 9 FLOPs per state element per layer
    cfg = tiny("v7")
    wkv = 2 * 9 * 4 * 16 * 16
    assert flops.wkv_forward_flops(cfg) == wkv
    assert flops.flops_per_token(cfg, 32) == 6 * flops.matrix_params(cfg) + 3 * wkv
    # v5/v6: 5 per state element; v4: 23 per channel
    assert flops.wkv_forward_flops(tiny("v5")) == flops.wkv_forward_flops(tiny("v6")) == 2 * 5 * 4 * 16 * 16
    assert flops.wkv_forward_flops(tiny("v4")) == 2 * 23 * 64
    # no attention matrix: the context length changes nothing
    assert flops.flops_per_token(cfg, 32) == flops.flops_per_token(cfg, 4096)
    with pytest.raises(ValueError, match="ctx_len"):
        flops.flops_per_token(cfg, 0)


def test_presets_land_near_six_times_params():
    # the 0.1B preset: ~141M matrix parameters of its 191M (the 50M embedding is a lookup)
    cfg = ModelConfig(version="v7", n_layer=12, n_embd=768, head_size=64, vocab_size=65536)
    assert flops.matrix_params(cfg) == pytest.approx(140.5e6, rel=1e-3)
    assert flops.flops_per_token(cfg, 4096) == pytest.approx(6 * 140.5e6 + 3 * 12 * 9 * 768 * 64, rel=1e-3)


def test_mfu_by_hand():
    assert flops.mfu(2000.0, 5e8, 2e12) == pytest.approx(0.5)
    # 30k tokens/s of a 1B-matrix-parameter model on one H100 SXM: 6e9 x 3e4 / 989.4e12
    assert flops.mfu(3e4, 6e9, 989.4e12) == pytest.approx(0.18193, rel=1e-4)
    assert flops.mfu(1000.0, 1e9, None) is None


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.4e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989.4e12),
        ("NVIDIA GH200 480GB", 989.4e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L40", 181e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA GeForce GTX 1080 Ti", None),
        ("NVIDIA A10G", None),
    ],
)
def test_peak_by_device_name(name, peak):
    assert flops.peak_flops_by_name(name) == peak


def test_cpu_has_no_peak():
    assert flops.peak_flops("cpu") is None
    assert flops.peak_flops(torch.device("cpu")) is None


def _train_rows(out_dir) -> tuple[list[str], list[dict]]:
    with (out_dir / "metrics.csv").open() as f:
        reader = csv.DictReader(f)
        rows = [r for r in reader if r["loss"]]
        return list(reader.fieldnames or []), rows


def test_metrics_csv_has_per_gpu_throughput_and_mfu(tmp_path, corpus, monkeypatch):
    """A tiny CPU run with a pretend 1 GFLOP/s peak (a CPU has none, so its mfu column stays empty:
    test_train_cli checks that end to end)."""
    monkeypatch.setattr(rwkv_train.callbacks, "peak_flops", lambda device: 1e9)
    cfg = load_config(tiny_config(tmp_path, corpus, train={"max_steps": 2}))
    with (run(cfg) / "metrics.csv").open() as f:
        reader = csv.DictReader(f)
        rows = [r for r in reader if r["loss"]]
    assert {"tokens_per_s", "tokens_per_s_per_gpu", "mfu"} <= set(reader.fieldnames)
    assert [int(r["step"]) for r in rows] == [1, 2]
    per_token = flops.flops_per_token(cfg.model, cfg.data.ctx_len)
    for r in rows:
        assert float(r["tokens_per_s_per_gpu"]) == float(r["tokens_per_s"]) > 0  # one device
        expected = float(r["tokens_per_s_per_gpu"]) * per_token / 1e9
        assert float(r["mfu"]) == pytest.approx(expected, rel=1e-3, abs=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_bench_train_says_it_needs_a_gpu(tmp_path):
    result = run_cli("scripts/bench_train.py", "--out", str(tmp_path / "bench"))
    assert result.returncode == 1
    assert "needs a CUDA device" in result.stderr
    assert not (tmp_path / "bench").exists()


def test_bench_train_settings_become_the_config_training_would_load():
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "scripts" / "bench_train.py")
    bench_train = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = bench_train  # its dataclasses look their module up there
    spec.loader.exec_module(bench_train)
    cfg = bench_train.load_bench_config("configs/rwkv7-0.1b.yaml", 512, "cuda", "selective")
    assert (cfg.model.kernel, cfg.model.wkv7_chunked, cfg.train.grad_cp, cfg.data.ctx_len) == ("cuda", False, "selective", 512)
    cfg = bench_train.load_bench_config("configs/rwkv7-0.1b.yaml", 4096, "cuda-chunked", "on")
    assert (cfg.model.kernel, cfg.model.wkv7_chunked, cfg.train.grad_cp) == ("cuda", True, True)
    cfg = bench_train.load_bench_config("configs/rwkv7-0.1b.yaml", 4096, "torch", None)
    assert (cfg.model.kernel, cfg.model.wkv7_chunked, cfg.train.grad_cp) == ("torch", "auto", False)
    # --grad-cp takes several modes (a row each); without it, the config's own
    assert bench_train.parse_args(["--grad-cp", "on", "selective", "off"]).grad_cp == ["on", "selective", "off"]
    assert bench_train.parse_args([]).grad_cp == [None]
