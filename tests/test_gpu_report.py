"""scripts/gpu_report.py on any machine: its plan, its argument checks, how it runs and sums up a step."""

from __future__ import annotations

import csv
import importlib.util
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_cli

_spec = importlib.util.spec_from_file_location("gpu_report", REPO / "scripts" / "gpu_report.py")
gpu_report = importlib.util.module_from_spec(_spec)
sys.modules["gpu_report"] = gpu_report  # its dataclasses look their module up there
_spec.loader.exec_module(gpu_report)


def test_plan_lists_every_step_without_a_gpu():
    result = run_cli("scripts/gpu_report.py", "--plan")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(gpu_report.STEPS)
    assert "tests/test_kernels_cuda.py" in lines[1] and "--tool memcheck" in lines[2] and "--tool racecheck" in lines[3]


def test_skip_leaves_steps_out_and_rejects_unknown_ones():
    result = run_cli("scripts/gpu_report.py", "--plan", "--skip", "train", "train-chunked", "train-compiled", "train-modes",
                     "train-autotune", "train-accumulate", "kernels")
    assert [line.split()[0] for line in result.stdout.strip().splitlines()] == ["build", "tests", "sanitizer", "racecheck",
                                                                               "profile", "splits", "versions"]
    bad = run_cli("scripts/gpu_report.py", "--skip", "everything")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no CUDA device")
def test_says_it_needs_a_gpu(tmp_path):
    result = run_cli("scripts/gpu_report.py", "--out", str(tmp_path / "report"))
    assert result.returncode == 1
    assert "needs a CUDA device" in result.stderr and "--plan" in result.stderr
    assert not (tmp_path / "report").exists(), "nothing is written when nothing ran"


def _step(code: str, timeout_s: int = 60) -> gpu_report.Step:
    return gpu_report.Step("probe", [sys.executable, "-c", code], timeout_s, r"passed")


def test_a_step_is_summed_up_by_its_verdict_line_and_logged(tmp_path):
    ok = gpu_report.run_step(_step("print('building'); print('3 passed in 1.0s'); print('bye')"), tmp_path)
    assert ok.ok and ok.summary == "3 passed in 1.0s"
    assert "building" in (tmp_path / "probe.log").read_text()

    failed = gpu_report.run_step(_step("import sys; print('RuntimeError: boom'); print('tail'); sys.exit(3)"), tmp_path)
    assert not failed.ok and failed.summary == "RuntimeError: boom"

    slow = gpu_report.run_step(_step("import time; time.sleep(5)", timeout_s=1), tmp_path)
    assert not slow.ok and "1 s limit" in slow.summary

    table = gpu_report.report([ok, failed])
    assert table.splitlines()[1].split()[:2] == ["probe", "ok"] and table.splitlines()[2].split()[:2] == ["probe", "FAILED"]


def test_generations_narrow_every_step_and_drop_the_training_runs_of_other_kernels():
    result = run_cli("scripts/gpu_report.py", "--plan", "--generations", "v7-chunked")
    assert result.returncode == 0, result.stderr
    steps = {line.split()[0]: line for line in result.stdout.strip().splitlines()}
    assert list(steps) == ["build", "tests", "sanitizer", "racecheck", "profile", "splits", "versions", "kernels",
                           "train-chunked", "train-compiled", "train-modes", "train-autotune", "train-accumulate"]
    assert steps["build"].endswith("--generations v7-chunked")
    assert steps["tests"].endswith("-k (chunked and not v5-chunked and not v6-chunked)")
    assert steps["sanitizer"].endswith("sanitize_kernels.py v7-chunked")
    assert steps["racecheck"].endswith("sanitize_kernels.py v7-chunked")
    assert steps["kernels"].endswith("--generations v7")  # the kernel benchmark's v7 row times both kernels
    v6 = run_cli("scripts/gpu_report.py", "--plan", "--generations", "v6").stdout
    assert "bench_wkv7_split.py" not in v6 and "bench_wkv7_versions.py" not in v6  # steps for the chunked kernels alone
    v6_chunked = {line.split()[0]: line for line in
                  run_cli("scripts/gpu_report.py", "--plan", "--generations", "v6-chunked").stdout.splitlines()}
    assert v6_chunked["splits"].endswith("--kernels v6-chunked") and "versions" not in v6_chunked
    bad = run_cli("scripts/gpu_report.py", "--plan", "--generations", "v8")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def _collected(*args: str) -> set[str]:
    result = run_cli("-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/test_kernels_cuda.py", *args)
    return {line for line in result.stdout.splitlines() if "::" in line}


def test_the_per_kernel_test_filters_split_the_gpu_tests_exactly():
    """Each GPU test belongs to exactly one kernel's -k filter (but the sanitizer's, which runs them all),
    so --generations neither skips nor repeats one. A new test whose id names no kernel fails here."""
    everything = _collected()
    parts = {g: _collected("-k", gpu_report.TEST_FILTER[g]) for g in gpu_report.GENERATIONS}
    assert all(parts.values())
    assert sum(len(p) for p in parts.values()) == len(set().union(*parts.values())), "a test in two filters"
    left = everything - set().union(*parts.values())
    assert {t.split("::")[1] for t in left} == {"test_kernels_pass_compute_sanitizer_memcheck"}


def test_split_benchmark_checks_its_arguments_and_says_it_needs_a_gpu():
    bad = run_cli("scripts/bench_wkv7_split.py", "--shapes", "1by32768")
    assert bad.returncode == 2 and "is not BxT" in bad.stderr
    odd = run_cli("scripts/bench_wkv7_split.py", "--channels", "100")
    assert odd.returncode == 2 and "not a multiple of --head-size 64" in odd.stderr
    if not torch.cuda.is_available():
        result = run_cli("scripts/bench_wkv7_split.py", "--shapes", "1x64")
        assert result.returncode == 1 and "needs a CUDA device" in result.stderr


def test_steps_runs_the_named_steps_in_the_order_given():
    result = run_cli("scripts/gpu_report.py", "--plan", "--generations", "v7-chunked", "--steps", "kernels", "build",
                     "tests", "--skip", "tests")
    assert result.returncode == 0, result.stderr
    assert [line.split()[0] for line in result.stdout.strip().splitlines()] == ["kernels", "build"]
    # the build step builds every head size the chunked kernel's tests load
    build = [line for line in result.stdout.splitlines() if line.startswith("build")][0]
    assert "--head-sizes 32 64 128" in build
    twice = run_cli("scripts/gpu_report.py", "--plan", "--steps", "build", "build")
    assert twice.returncode == 2 and "names a step twice" in twice.stderr
    absent = run_cli("scripts/gpu_report.py", "--plan", "--generations", "v7-chunked", "--steps", "build", "train")
    assert absent.returncode == 2 and "--steps train: only run with the v7 kernel" in absent.stderr
    small = run_cli("scripts/gpu_report.py", "--plan", "--budget", "10")
    assert small.returncode == 2 and "--budget must be at least" in small.stderr


def test_the_budget_cuts_step_limits_and_leaves_what_does_not_fit_unrun(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_report, "MIN_STEP_S", 1)
    steps = [gpu_report.Step("quick", [sys.executable, "-c", "print('3 passed')"], 60, r"passed"),
             gpu_report.Step("slow", [sys.executable, "-uc", "import time; print('working'); time.sleep(60)"], 600,
                             r"passed"),
             gpu_report.Step("late", [sys.executable, "-c", "print('3 passed')"], 60, r"passed")]
    outcomes = gpu_report.run_steps(steps, tmp_path, "test machine", budget=4.0)
    assert [o.result for o in outcomes] == ["ok", "FAILED", "not run"]
    assert outcomes[1].seconds < 10 and "limit" in outcomes[1].summary  # stopped by the budget, not its 600 s
    assert "budget" in outcomes[2].summary and not (tmp_path / "late.log").exists()
    md = (tmp_path / "gpu_report.md").read_text()
    assert md.startswith("# GPU report: test machine")
    assert "## slow: the last lines of its log" in md and "working" in md  # the failed step's output comes along
    assert "quick: the last lines" not in md


def test_a_step_stopped_at_its_limit_takes_the_processes_it_started_along(tmp_path):
    pid_file = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; "
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(120)")
    outcome = gpu_report.run_step(gpu_report.Step("spawner", [sys.executable, "-c", code], 60, r"passed"), tmp_path,
                                  limit_s=3)
    assert not outcome.ok and "3 s limit" in outcome.summary
    # promptly: a child left alive would hold the output pipe open, and the step would wait for it
    assert outcome.seconds < 30
    child = int(pid_file.read_text())
    deadline = time.time() + 10
    while time.time() < deadline and _running(child):
        time.sleep(0.1)
    assert not _running(child), "the step's own child process outlived it"


def _running(pid: int) -> bool:
    """Whether a process exists and is not a zombie (an ended process nobody has reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_table_is_reported_only_where_this_run_of_the_step_wrote_it(tmp_path):
    table = tmp_path / "bench" / "table.md"
    table.parent.mkdir()
    table.write_text("| an earlier run's table |\n")
    write = f"import pathlib; pathlib.Path({str(table)!r}).write_text('| this run |\\n'); print('3 passed')"
    crash = "import sys; print('RuntimeError: no GPU'); sys.exit(1)"
    stale = gpu_report.run_step(gpu_report.Step("crash", [sys.executable, "-c", crash], 60, r"passed", table), tmp_path)
    assert stale.table is None
    fresh = gpu_report.run_step(gpu_report.Step("bench", [sys.executable, "-c", write], 60, r"passed", table), tmp_path)
    assert fresh.table == table
    md = gpu_report.markdown("test machine", [stale, fresh])
    assert "| this run |" in md and "earlier run" not in md


def test_the_gpu_tests_error_table_keeps_the_largest_error_per_kernel_and_quantity(tmp_path):
    from tests.test_kernels_cuda import write_errors

    rows = [{"generation": g, "head_size": 64, "T": t, "initial_state": s, "quantity": q, "rel_error": e}
            for g, t, s, q, e in [("v7", 16, False, "y", 1e-3), ("v7", 1000, True, "y", 3e-3),
                                  ("v7", 16, False, "dk", 2e-3), ("v7-chunked", 33, True, "y", 4e-3)]]
    text = write_errors(rows, tmp_path / "errors.csv")
    assert len(list(csv.DictReader((tmp_path / "errors.csv").open()))) == 4
    lines = (tmp_path / "errors.md").read_text().splitlines()
    assert lines[2] == "| kernel | head | quantity | max rel error | at |"
    assert lines[4:] == ["| v7 | 64 | y | 3.00e-03 | T=1000, initial state |", "| v7 | 64 | dk | 2.00e-03 | T=16 |",
                         "| v7-chunked | 64 | y | 4.00e-03 | T=33, initial state |"]
    assert "3.00e-03" in text and str(tmp_path / "errors.csv") in text


@pytest.mark.parametrize("kernel", ["v6", "v6-chunked", "v7-chunked"])
def test_test_filters_pick_that_kernels_gpu_tests(kernel):
    """Each -k expression selects tests of its own kernel (the test above checks that none is in two):
    the chunked kernels' ids share "chunked", and "v6" is a prefix of "v6-chunked"."""
    ids = sorted(_collected("-k", gpu_report.TEST_FILTER[kernel]))
    assert ids
    others = {"v6": ("chunked", "v7", "v5", "v4"), "v6-chunked": ("v7", "v4", "[v5-h", "[v6-h"),
              "v7-chunked": ("v5-chunked", "v6-chunked", "v4")}[kernel]
    assert not [i for i in ids if any(other in i for other in others)], ids
    wanted = {"v6": "v6-h64", "v6-chunked": "v6-chunked-h32", "v7-chunked": "v7-chunked-h64"}[kernel]
    assert any(wanted in i for i in ids), ids
