"""scripts/bench_kernels.py without a GPU: its plan, its CPU smoke run, its inputs, the output check every
variant passes before it is timed, and how the table picks and footnotes its cells.

The chunked WKV-7 variant runs here on the CPU emulation of its kernel (tests/cuda_on_cpu.py), so the
benchmark's own path for it (the variant's inputs, the NaN-poisoned check run, the comparison with the
row's anchor) is exercised before a GPU session depends on it.
"""

from __future__ import annotations

import csv
import importlib.util
import math

import numpy as np
import pytest
import torch

from rwkv_train.ops import kernels
from tests import cuda_on_cpu
from tests.conftest import REPO, run_cli

_spec = importlib.util.spec_from_file_location("bench_kernels", REPO / "scripts" / "bench_kernels.py")
_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_script)  # puts scripts/ on the path, where its kernel_bench package is

from kernel_bench import jobs, plan, report, runner, variants  # noqa: E402

GENERATIONS = ("v4", "v5", "v6", "v7")


def test_plan_lists_each_generation_shape_and_column_and_why_the_reference_cannot_run(tmp_path):
    result = run_cli("scripts/bench_kernels.py", "--plan", "--reference", str(tmp_path / "no-copy"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for g in GENERATIONS:
        for shape in ("B=8 T=4096 C=4096", "B=1 T=32768 C=4096"):
            mine = [ln for ln in lines if ln.strip().startswith(f"{g} {shape}")]
            assert any("ours torch" in ln for ln in mine) and any("ours cuda" in ln for ln in mine), mine
            assert any("fla" in ln for ln in mine), mine
            reference = [ln for ln in mine if "RWKV-LM" in ln]
            assert reference and all("SKIPPED" in ln and "fetch_reference_kernels.sh" in ln for ln in reference)
    v7 = [ln for ln in lines if ln.strip().startswith("v7 B=8")]
    assert any("wkv7_chunked_cuda" in ln for ln in v7) and any(ln.rstrip().endswith("wkv7_cuda") for ln in v7)
    assert sum("RWKV-LM" in ln for ln in v7) == 4  # clampw, clampw_v3 and its _alt, wkv7_cuda
    # clampw_v3's two H100 builds register the same op names: the _alt one runs in a process of its own
    assert [ln for ln in v7 if "(own process)" in ln] == [ln for ln in v7 if "_for_h100_alt.cu" in ln]
    # RWKV-LM's v4 and v6 kernels bake T in: each runs in a process of its own
    assert all("(own process)" in ln for ln in lines if ln.strip().startswith(("v4", "v6")) and "RWKV-LM" in ln)


def test_cpu_smoke_run_times_the_pytorch_backends_and_writes_the_table(tmp_path):
    out = tmp_path / "bench"
    result = run_cli("scripts/bench_kernels.py", "--device", "cpu", "--shapes", "2x40x128", "--repeats", "2",
                     "--warmup", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "written:" in result.stdout
    rows = list(csv.DictReader((out / "bench_kernels.csv").open()))
    assert [r["generation"] for r in rows] == list(GENERATIONS)
    for r in rows:
        assert (r["B"], r["T"], r["C"], r["head_size"]) == ("2", "40", "128", "64")
        assert float(r["ours_torch_ms"]) > 0 and r["ours_cuda_ms"] == ""
    variants = list(csv.DictReader((out / "bench_kernels_all.csv").open()))
    assert len(variants) == 4 and all(v["status"] == "ok" and v["nan_after_check"] == "" for v in variants)
    assert all(v["anchor"] == "(anchor)" for v in variants)  # the first variant of each row is its anchor
    assert "| v7 | B=2 T=40 C=128 |" in (out / "bench_kernels.md").read_text()


@pytest.mark.parametrize("args,message", [
    (["--shapes", "8x4096x100"], "multiple of the head size 64"),
    (["--shapes", "8x4096"], "expected BxTxC"),
    (["--warmup", "0"], "--warmup and --repeats must be at least 1"),
])
def test_bad_command_lines_are_refused(args, message):
    result = run_cli("scripts/bench_kernels.py", "--plan", *args)
    assert result.returncode == 2 and message in result.stderr


def test_without_cuda_it_says_what_to_run_instead():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run_cli("scripts/bench_kernels.py", "--generations", "v7")
    assert result.returncode != 0 and "no CUDA device" in result.stderr and "--device cpu" in result.stderr


@pytest.mark.parametrize("generation", GENERATIONS)
def test_inputs_are_model_like_and_every_variant_sees_the_same_decay(generation):
    shape = jobs.Shape(2, 24, 128, 64)
    x = variants.make_inputs(generation, shape, seed=5, device="cpu")
    again = variants.make_inputs(generation, shape, seed=5, device="cpu")
    assert all(torch.equal(x[k], again[k]) for k in x)  # a row's inputs are the same in every process
    for name, t in x.items():
        assert torch.isfinite(t).all() and (t != 0).float().mean() > 0.99, name  # never zeros
    if generation == "v4":
        assert x["k"].shape == (2, 24, 128) and x["time_decay"].shape == (128,)
        return
    assert x["r"].shape == (2, 24, 2, 64) and x["dy"].shape == (2, 24, 128)
    lw = x["lw"]
    assert lw.dtype == torch.float32 and (lw < 0).all()
    if generation == "v7":
        assert (lw > -math.exp(-0.5)).all()  # RWKV-7's decay range
        # the clampw kernels get the pre-activation z, wkv7_cuda w = log(-lw), fla lw itself: one decay
        decay = torch.exp(lw.double())
        clampw = torch.exp(-math.exp(-0.5) * torch.sigmoid(x["z"].double()))
        torch.testing.assert_close(clampw, decay, rtol=1e-6, atol=0)
        w = torch.log(-lw).to(torch.bfloat16)  # as _v7_rwkvlm_wkv7 hands it over
        torch.testing.assert_close(torch.exp(-torch.exp(w.double())), decay, rtol=2e-3, atol=0)
        a, b = x["a"].float(), x["b"].float()
        torch.testing.assert_close(a.norm(dim=-1), torch.ones(2, 24, 2), rtol=1e-2, atol=0)  # a = -kk, unit per head
        ratio = -b / a  # b = kk * gate, gate in (0, 1)
        assert ((ratio > 0) & (ratio < 1.01)).all()
    else:  # RWKV-LM v5/v6 get x with decay exp(-exp(x)), ours lw = -exp(x)
        torch.testing.assert_close(lw, -torch.exp(x["x"].float()), rtol=0, atol=0)
        if generation == "v5":
            assert lw.shape == (2, 64)  # one decay per channel


def _task(generation: str, shape, variant_key: str, label: str, anchor=None):
    row = jobs.Row(generation, shape)
    job = jobs.Job(row, jobs.Variant(variant_key, "ours-cuda" if "cuda" in variant_key else "ours-torch", label))
    return jobs.Task(job, "time", anchor=anchor, warmup=1, repeats=1, max_seconds=60, seed=row.seed(0), device="cpu")


@pytest.mark.skipif(cuda_on_cpu.compiler_problem() is not None, reason=str(cuda_on_cpu.compiler_problem()))
def test_chunked_variant_passes_the_benchmarks_output_check_on_the_emulated_kernel(monkeypatch):
    modules: dict[int, cuda_on_cpu.Wkv7ChunkedModule] = {}

    def load(generation: str, head_size: int | None = None):
        assert generation == "v7-chunked", generation
        return modules.setdefault(head_size, cuda_on_cpu.Wkv7ChunkedModule(head_size))

    monkeypatch.setattr(kernels, "load", load)
    shape = jobs.Shape(1, 40, 64, 32)  # T = 40: the kernel pads its last chunk
    inputs = variants.make_inputs("v7", shape, seed=3, device="cpu")
    anchor = runner.measure(_task("v7", shape, "v7:ours-torch", "wkv7 torch"), inputs, None)
    assert anchor.nan == "" and anchor.fingerprint.shape == (1, 40, 64)

    got = runner.measure(_task("v7", shape, "v7:ours-cuda-chunked", "wkv7_chunked_cuda", anchor.fingerprint), inputs,
                        None)
    assert modules, "the chunked variant did not run the (emulated) kernel"
    assert got.nan == "", got.nan  # every gradient buffer written, though poisoned with NaN first
    assert got.rel_err is not None and got.rel_err < 1e-2  # bf16 operands against the float32 PyTorch backend
    assert got.median_ms > 0 and got.runs == 1 and report.check_problem(got) == ""

    # The check has teeth: a variant whose y is 10% off is flagged, and so is one that leaves NaN behind.
    wrong_y = jobs.Result(got.row, got.variant, got.column, got.label, median_ms=1.0, anchor="wkv7 torch",
                           rel_err=float(np.linalg.norm(1.1 * anchor.fingerprint - anchor.fingerprint)
                                         / np.linalg.norm(anchor.fingerprint)))
    assert "differs from wkv7 torch's by 0.1" in report.check_problem(wrong_y)
    assert "NaN left in grad2" in report.check_problem(jobs.Result("r", "v", "c", "l", nan="grad2"))


def test_table_cells_name_the_fastest_kernel_and_footnote_failures():
    shape = jobs.Shape(8, 4096, 4096, 64)
    the_plan = plan.make_plan(["v7"], [shape], list(jobs.COLUMNS), REPO / "no-copy")
    row = the_plan.rows[0].key

    def result(column, label, ms=None, status="ok", **kw):
        return jobs.Result(row, "", column, label, status=status, median_ms=ms, **kw)

    results = [
        result("ours-torch", "wkv7 torch", 109.0),
        result("ours-cuda", "wkv7_cuda", 14.3),
        result("ours-cuda", "wkv7_chunked_cuda", 8.5, rel_err=0.003),
        result("rwkv-lm", "RWKV-v7/train_temp rwkv7_clampw.cu", 14.5),
        result("rwkv-lm", "RWKV-v7/train_temp rwkv7_clampw_v3_for_h100.cu", 12.5, rel_err=0.2, anchor="wkv7 torch"),
        result("rwkv-lm", "RWKV-v7/train_temp wkv7_cuda.cu", None, status="error", message="illegal address"),
        result("fla", "fla chunk_rwkv7", None, status="OOM"),
    ]
    table, notes = report.summarize(the_plan, results, list(jobs.COLUMNS))
    cells = table[0]["cells"]
    assert cells["ours-torch"] == "109"
    assert cells["ours-cuda"] == "8.5 (wkv7_chunked_cuda)"
    assert cells["rwkv-lm"] == "12.5 [1] (rwkv7_clampw_v3)"  # the fastest, flagged: its y is off
    assert cells["fla"] == "OOM"
    flagged = "RWKV-v7/train_temp rwkv7_clampw_v3_for_h100.cu: y differs from wkv7 torch's by 0.2 (relative)"
    assert notes.items == [flagged]
    assert table[0]["speedup"] == pytest.approx(12.5 / 8.5)
    rendered = report.render_text(table, list(jobs.COLUMNS), 64)
    assert rendered[0][-1] == "speed-up vs RWKV-LM" and rendered[1][-1] == "1.47x"

    # the _alt build, when the fastest, is named apart from clampw_v3
    alt = result("rwkv-lm", "RWKV-v7/train_temp rwkv7_clampw_v3_for_h100_alt.cu", 11.9)
    table, _ = report.summarize(the_plan, [*results, alt], ["rwkv-lm"])
    assert table[0]["cells"]["rwkv-lm"] == "11.9 (rwkv7_clampw_v3_alt)"

    # a column whose only variant failed shows the failure with its reason as a note
    table, notes = report.summarize(the_plan, [results[5]], ["rwkv-lm"])
    assert table[0]["cells"]["rwkv-lm"] == "error [1]" and "illegal address" in notes.items[0]
