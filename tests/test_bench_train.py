"""scripts/bench_train.py without a GPU: `--device cpu` runs the benchmark's own training step (bf16
weights with float32 masters, or float32 weights under autocast) for every checkpointing mode, so the
script is checked before a GPU session depends on it."""

from __future__ import annotations

import csv
import importlib.util
import sys

import pytest
import torch

from tests.conftest import REPO, run_cli, tiny_config

_spec = importlib.util.spec_from_file_location("bench_train", REPO / "scripts" / "bench_train.py")
bench_train = importlib.util.module_from_spec(_spec)
sys.modules["bench_train"] = bench_train  # its dataclasses look their module up there
_spec.loader.exec_module(bench_train)


def test_cpu_run_times_each_checkpointing_mode_and_writes_the_table(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path / "unused-corpus")
    out = tmp_path / "bench"
    result = run_cli("scripts/bench_train.py", "--device", "cpu", "--configs", str(cfg),  # the PyTorch WKV by default
                     "--ctx-len", "24", "--micro-batch", "1", "--accumulate", "2", "--warmup", "1", "--steps", "2",
                     "--grad-cp", "off", "on", "selective", "selective-wkv", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((out / "bench_train.csv").open()))
    assert [r["grad_cp"] for r in rows] == ["False", "True", "selective", "selective-wkv"]
    for r in rows:
        assert (r["micro_batch"], r["accumulate"], r["ctx_len"], r["device"], r["kernel"]) == ("1", "2", "24", "cpu", "torch")
        assert float(r["tokens_per_s"]) == pytest.approx(1 * 2 * 24 / float(r["step_s"]), rel=1e-2)
        assert r["peak_mem_gib"] == "" and r["mfu"] == ""  # neither is measured on the CPU
    assert "CPU (a check of the script, not a benchmark)" in (out / "bench_train.md").read_text()


def test_cpu_runs_refuse_a_cuda_kernel(tmp_path):
    result = run_cli("scripts/bench_train.py", "--device", "cpu", "--kernel", "cuda", "--out", str(tmp_path / "bench"))
    assert result.returncode == 2 and "pass --kernel torch" in result.stderr
    assert not (tmp_path / "bench").exists()


@pytest.mark.parametrize("weights", ["bf16", "fp32"])
def test_a_bench_step_trains_the_float32_weights_the_optimiser_holds(tmp_path, weights):
    cfg = bench_train.load_bench_config(str(tiny_config(tmp_path, tmp_path / "unused-corpus")), 24, "torch", "on")
    torch.manual_seed(0)
    bench = bench_train.Bench(cfg, weights, "off", device="cpu")
    start = [p.detach().clone() for p in bench.masters]
    assert all(p.dtype == torch.float32 for p in bench.masters)
    losses = [bench.step(2) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    moved = [not torch.equal(p, p0) for p, p0 in zip(bench.masters, start)]
    assert sum(moved) == len(moved)  # every parameter has a gradient and is stepped
    assert all(p.grad is None for p in bench.masters)  # gradients cleared for the next step
    if weights == "bf16":
        # the model runs on a bf16 copy, refreshed from the stepped float32 masters after each step
        assert all(c.dtype == torch.bfloat16 for c in bench.copies)
        for copy_, master in zip(bench.copies, bench.masters):
            assert torch.equal(copy_, master.to(torch.bfloat16))
            assert copy_.grad is None
    else:
        assert bench.compute is bench.model


@pytest.mark.parametrize("weights", ["bf16", "fp32"])
def test_accumulation_sums_each_micro_batch_gradient_in_float32_before_one_optimiser_step(tmp_path, weights):
    """--accumulate 2: the optimiser steps once, on the float32 sum of the two micro-batches' gradients of
    loss / 2, each taken on the same weights (checked against running the micro-batches one at a time
    on a second bench built from the same seed)."""
    cfg = bench_train.load_bench_config(str(tiny_config(tmp_path, tmp_path / "unused-corpus")), 24, "torch", "off")
    cfg.optim.grad_clip = 0  # the optimiser is to see the summed gradients themselves
    torch.manual_seed(0)
    bench = bench_train.Bench(cfg, weights, "off", device="cpu")
    torch.manual_seed(0)
    again = bench_train.Bench(cfg, weights, "off", device="cpu")
    seen = []
    bench.optimizer.register_step_pre_hook(lambda *_: seen.append([p.grad.clone() for p in bench.masters]))
    torch.manual_seed(1)
    batches = [torch.randint(0, cfg.model.vocab_size, (2, 25)) for _ in range(2)]  # the tokens step draws
    torch.manual_seed(1)
    loss = bench.step(2, accumulate=2)
    assert len(seen) == 1

    expected = [torch.zeros_like(p) for p in again.masters]
    losses = []
    for tokens in batches:
        with again.autocast:
            part = again.compute.loss(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()) / 2
        part.backward()
        losses.append(part.item())
        for total, p in zip(expected, again.compute.parameters()):
            total += p.grad.float()
            p.grad = None
    assert loss == pytest.approx(sum(losses), rel=1e-6)
    for got, want in zip(seen[0], expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_micro_batch_per_mode_starts_the_search_there_and_is_checked(tmp_path):
    assert bench_train.candidates(None, None) == list(bench_train.MICRO_BATCHES)
    assert bench_train.candidates(5, None) == [5]  # a number per config is exact
    # a per-mode value is where the search starts: it, then every smaller default, largest first
    assert bench_train.candidates(None, 12) == [12, 8, 6, 4, 2, 1]
    assert bench_train.candidates(None, 7) == [7, 6, 4, 2, 1]
    cfg = tiny_config(tmp_path, tmp_path / "unused-corpus")
    out = tmp_path / "bench"
    result = run_cli("scripts/bench_train.py", "--device", "cpu", "--configs", str(cfg), "--ctx-len", "16",
                     "--warmup", "0", "--steps", "1", "--grad-cp", "off", "on", "--micro-batch", "off=3", "on=2",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((out / "bench_train.csv").open()))
    assert [(r["grad_cp"], r["micro_batch"]) for r in rows] == [("False", "3"), ("True", "2")]
    for args, message in [(["--grad-cp", "off", "--micro-batch", "on=3"], "add --grad-cp on"),
                          (["--micro-batch", "off=2"], "none given"),
                          (["--grad-cp", "off", "--micro-batch", "off=0"], "not a positive whole number"),
                          (["--grad-cp", "off", "--micro-batch", "off=2", "4"], "not both"),
                          (["--micro-batch", "two"], "not a positive whole number")]:
        bad = run_cli("scripts/bench_train.py", "--device", "cpu", "--configs", str(cfg), *args,
                      "--out", str(tmp_path / "bad"))
        assert bad.returncode == 2 and message in bad.stderr, (args, bad.stderr)
    assert not (tmp_path / "bad").exists()


def test_rows_are_written_as_they_finish(tmp_path, monkeypatch):
    """A run stopped after its first row (here the second raises) leaves that row in both tables."""
    cfg = tiny_config(tmp_path, tmp_path / "unused-corpus")
    done = bench_train.Result(config="cfg", params=1, micro_batch=2, ctx_len=16, accumulate=1, grad_cp=False,
                              kernel="torch", weights="bf16", compiled="off", tokens_per_s=10.0, step_s=3.2)
    calls = []

    def bench_config(path, tries, grad_cp, args):
        calls.append(grad_cp)
        if len(calls) > 1:
            raise KeyboardInterrupt  # as a run stopped from outside
        return done

    monkeypatch.setattr(bench_train, "bench_config", bench_config)
    out = tmp_path / "bench"
    with pytest.raises(KeyboardInterrupt):
        bench_train.main(["--device", "cpu", "--configs", str(cfg), "--grad-cp", "off", "on", "--out", str(out)])
    assert calls == ["off", "on"]
    rows = list(csv.DictReader((out / "bench_train.csv").open()))
    assert [(r["grad_cp"], r["tokens_per_s"]) for r in rows] == [("False", "10.0")]
    assert "| cfg |" in (out / "bench_train.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["bench_train.csv", "bench_train.md"]  # no temporary left


def test_profile_parts_sort_kernels_and_operators_by_name():
    names = {
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1": "products",
        "nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTT": "products",
        "ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_stages_64x3_tn": "products",
        "cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>": "products",
        "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>": "products",
        "void gemv2T_kernel_val<int, int, __nv_bfloat16, float, float, 128, 16, 4, 4>": "products",
        "triton_tem_fused_mm_relu_square_3": "products",  # max_autotune's product with its epilogue
        "void wkv7c::backward_kernel<1>(int, int, wkv7c::Inputs, ...)": "wkv",
        "void wkv::forward(int, int, ...)": "wkv",
        "triton_per_fused__to_copy_add_mul_native_layer_norm_12": "fused",
        "cpp_fused_add_mul_0": "fused",
        "void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>": "optimiser",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>": "other",
        "aten::mm": "products", "aten::addmm": "products", "aten::mm_backward": "other",
        "Optimizer.step#AdamW.step": "optimiser", "rwkv_train::wkv7_chunked_forward": "wkv", "aten::exp": "other",
    }
    assert {name: bench_train.part_of(name) for name in names} == names


def test_profile_adds_where_a_step_goes(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path / "unused-corpus")
    out = tmp_path / "bench"
    result = run_cli("scripts/bench_train.py", "--device", "cpu", "--configs", str(cfg), "--ctx-len", "16",
                     "--micro-batch", "2", "--warmup", "1", "--steps", "2", "--grad-cp", "on", "--profile",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    row = next(csv.DictReader((out / "bench_train.csv").open()))
    parts = {p: float(row[f"{p}_ms"]) for p in bench_train.PARTS}
    assert parts["products"] > 0 and parts["optimiser"] > 0 and parts["other"] > 0 and min(parts.values()) >= 0
    md = (out / "bench_train.md").read_text()
    assert "Where a step goes" in md
    line = [ln for ln in md.splitlines() if ln.startswith(f"| {cfg.stem} | on | 2 |")][0]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert float(cells[3]) == pytest.approx(sum(parts.values()), rel=1e-2, abs=0.1)  # the step is its parts
    shares = [int(c.split("(")[1].rstrip("%)")) for c in cells[4:]]
    assert abs(sum(shares) - 100) <= len(shares)  # whole percentages, rounded
    # without --profile: no profile table, and the columns are there but empty
    plain = run_cli("scripts/bench_train.py", "--device", "cpu", "--configs", str(cfg), "--ctx-len", "16",
                    "--micro-batch", "2", "--warmup", "0", "--steps", "1", "--out", str(tmp_path / "plain"))
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "Where a step goes" not in (tmp_path / "plain" / "bench_train.md").read_text()
    assert next(csv.DictReader((tmp_path / "plain" / "bench_train.csv").open()))["products_ms"] == ""
