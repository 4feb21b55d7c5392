"""Building the extensions (in parallel processes), timing each variant (in a worker process) and the
orchestration of both."""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import queue
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kernel_bench.jobs import BuildSpec, Built, Job, Plan, Result, Row, Task
from kernel_bench.reference import load_reference
from kernel_bench.variants import PREPARE, make_inputs

FINGERPRINT_STEPS = 32  # y is compared across variants on three windows of this many steps
MIN_RUNS = 3  # timed runs kept even when a variant is slower than the per-variant time cap


def _short(exc: BaseException) -> str:
    """One line: the compiler's first error, or the exception's last line."""
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if " error" in ln or ln.startswith("error")]
    line = errors[0] if errors else (lines[-1] if lines else "")
    return f"{type(exc).__name__}: {line}"[:300]


def build_one(spec: BuildSpec, max_jobs: int) -> Built:
    """Runs in a build process: compile one extension (torch caches it on disk for the worker)."""
    os.environ["MAX_JOBS"] = str(max_jobs)  # ninja's parallelism inside this one build
    started = time.perf_counter()
    if spec.generation:  # ours
        try:
            from rwkv_train.ops import kernels

            kernels.load(spec.generation, spec.head_size)
            return Built(spec.key, True, seconds=time.perf_counter() - started)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            return Built(spec.key, False, seconds=time.perf_counter() - started, message=_short(exc), log=str(exc))
    try:
        load_reference(spec.name, spec, spec.flags)
        return Built(spec.key, True, spec.name, spec.flags, time.perf_counter() - started)
    except Exception as exc:  # noqa: BLE001
        first = exc
    # RWKV-v4neo asks for -std=c++17; torch headers newer than that kernel may need C++20. Retry once
    # under another name (a new build folder) with torch's own standard, and say so in the notes.
    if "-std=c++17" in spec.flags:
        flags = tuple(f for f in spec.flags if f != "-std=c++17")
        try:
            load_reference(spec.name + "_stdtorch", spec, flags)
            why = f"built without the trainer's -std=c++17 (with it: {_short(first)})"
            return Built(spec.key, True, spec.name + "_stdtorch", flags, time.perf_counter() - started, why)
        except Exception as exc:  # noqa: BLE001
            first = exc
    seconds = time.perf_counter() - started
    return Built(
        spec.key, False, spec.name, spec.flags, seconds, message=f"build failed: {_short(first)}", log=str(first)
    )


def _build_task(args: tuple[BuildSpec, int]) -> Built:
    return build_one(*args)


# --------------------------------------------------------------------------------------------------
# Timing one variant (inside the worker)


def _fingerprint(y: Tensor) -> np.ndarray:
    """y on three windows of FINGERPRINT_STEPS steps (start, middle, end), float32."""
    B, T = y.shape[:2]
    half = T // 2
    steps = sorted(
        {
            *range(min(FINGERPRINT_STEPS, T)),
            *range(half, min(half + FINGERPRINT_STEPS, T)),
            *range(max(0, T - FINGERPRINT_STEPS), T),
        }
    )
    index = torch.tensor(steps, device=y.device)
    return y.detach().reshape(B, T, -1).index_select(1, index).float().cpu().numpy()


def _has_nan(t: Tensor | None) -> bool:
    return t is not None and bool(torch.isnan(t).any())


class _Timer:
    """Wall time of one forward + backward: CUDA events with a sync after each run (so launch overhead
    counts, as it does in training), or perf_counter on the CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __call__(self, step: Callable[[], None]) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            step()
            return (time.perf_counter() - t0) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


def measure(task: Task, inputs: dict[str, Tensor], ext: Any) -> Result:
    """The check run, warm-up and timed runs of one variant. Raises on failure (the caller reports)."""
    v = task.job.variant
    res = Result(task.job.row.key, v.key, v.column, v.label)
    cuda = task.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    fn, leaves = PREPARE[v.key](inputs, ext)
    dy = inputs["dy"]

    def step() -> Tensor:
        for t in leaves:
            t.grad = None
        y = fn()
        y.backward(dy.view(y.shape).to(y.dtype))
        return y

    # Check run: every output buffer NaN-filled first (ours and the RWKV-LM wrappers' alike).
    from rwkv_train.ops import kernels

    with kernels.poisoned_outputs():
        y = step()
    nan = (["y"] if _has_nan(y) else []) + [f"grad{i}" for i, t in enumerate(leaves) if _has_nan(t.grad)]
    res.nan = ",".join(nan)
    res.fingerprint = _fingerprint(y)
    del y
    if task.anchor is not None:
        ref = task.anchor
        res.rel_err = float(np.linalg.norm(res.fingerprint - ref) / max(float(np.linalg.norm(ref)), 1e-30))
    if task.mode == "warm":
        return res

    timer = _Timer(task.device)
    for _ in range(max(0, task.warmup - 1)):
        timer(step)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < task.repeats:
        times.append(timer(step))
        if len(times) >= MIN_RUNS and time.perf_counter() - started > task.max_seconds:
            break
    res.median_ms, res.min_ms, res.runs = statistics.median(times), min(times), len(times)
    if cuda:
        res.peak_gb = (torch.cuda.max_memory_allocated() - base) / 2**30
    return res


def _context_usable() -> bool:
    """False when a failure left the CUDA context broken (e.g. an illegal address): restart the worker."""
    try:
        torch.ones(1, device="cuda").add_(1).item()
        torch.cuda.synchronize()
        return True
    except Exception:  # noqa: BLE001
        return False


def nvcc_version() -> str:
    """The compiler the extensions are built with (torch's CUDA_HOME, else PATH)."""
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = str(Path(CUDA_HOME) / "bin" / "nvcc") if CUDA_HOME else shutil.which("nvcc")
    try:
        out = subprocess.run(
            [nvcc or "nvcc", "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "not found"
    return next((ln.strip() for ln in out.splitlines() if "release" in ln), "unknown")


def environment(device: str) -> dict[str, str]:
    """What the numbers were measured on."""
    from importlib import metadata

    info = {"Python": sys.version.split()[0], "torch": torch.__version__, "CUDA (torch)": str(torch.version.cuda)}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info["GPU"] = f"{p.name} ({p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor})"
    for pkg in ("triton", "fla-core", "flash-linear-attention"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = "not installed"
    return info


@dataclass
class WorkerState:
    """What the worker keeps between tasks: the current row's inputs and the loaded RWKV-LM ops."""

    row: Row | None = None
    inputs: dict[str, Tensor] = field(default_factory=dict)
    ops: dict[str, Any] = field(default_factory=dict)


def run_task(task: Task, state: WorkerState) -> Result:
    """One task in the worker: every failure becomes a Result, never an exception."""
    job, v = task.job, task.job.variant
    res = Result(job.row.key, v.key, v.column, v.label)
    if task.mode == "env":
        try:
            res.info = environment(task.device)
        except Exception as exc:  # noqa: BLE001 - the table still gets written
            res.status, res.message = "error", _short(exc)
        return res
    if job.skip:
        res.status, res.message = "n/a", job.skip
        return res
    if task.built is not None and not task.built.ok:
        res.status, res.message = "n/a", task.built.message
        return res
    try:
        if state.row != job.row:  # one row's inputs at a time
            state.row, state.inputs = None, {}
            gc.collect()
            if task.device == "cuda":
                torch.cuda.empty_cache()
            state.inputs = make_inputs(job.row.generation, job.row.shape, task.seed, task.device)
            state.row = job.row
        ext = None
        if task.built is not None and task.spec is not None and task.built.name:  # RWKV-LM: load the build
            if task.built.name not in state.ops:
                state.ops[task.built.name] = load_reference(task.built.name, task.spec, task.built.flags)
            ext = state.ops[task.built.name]
        res = measure(task, state.inputs, ext)
    except torch.cuda.OutOfMemoryError:
        res.status, res.message = "OOM", "out of GPU memory"
    except Exception as exc:  # noqa: BLE001 - one variant's failure is one cell
        res.status, res.message = "error", _short(exc)
    finally:
        gc.collect()
        if task.device == "cuda":
            torch.cuda.empty_cache()
    if task.device == "cuda" and res.status == "error" and not _context_usable():
        res.poisoned = True
        res.message += " (left the CUDA context unusable; the rest runs in a fresh process)"
    return res


def _worker_main(tasks: Any, results: Any) -> None:
    """The worker process: run tasks one by one until None; exit after a fatal CUDA error."""
    torch.backends.cuda.matmul.allow_tf32 = True  # as rwkv_train's trainer sets it
    torch.backends.cudnn.allow_tf32 = True
    state = WorkerState()
    while (task := tasks.get()) is not None:
        res = run_task(task, state)
        results.put(res)
        if res.poisoned:
            return


# --------------------------------------------------------------------------------------------------
# Orchestration (main process)


class Worker:
    """A spawned timing process fed one task at a time, replaced when it dies, hangs or is poisoned."""

    def __init__(self, ctx: Any):
        self.ctx = ctx
        self.proc: Any = None

    def _start(self) -> None:
        self.tasks, self.results = self.ctx.Queue(), self.ctx.Queue()
        self.proc = self.ctx.Process(target=_worker_main, args=(self.tasks, self.results), name="bench-worker")
        self.proc.start()

    def run(self, task: Task, timeout: float) -> Result:
        if self.proc is None or not self.proc.is_alive():
            self._start()
        self.tasks.put(task)
        deadline = time.monotonic() + timeout
        while True:
            try:
                res = self.results.get(timeout=1.0)
                break
            except queue.Empty:
                if not self.proc.is_alive():
                    why = f"the worker process died (exit code {self.proc.exitcode})"
                elif time.monotonic() > deadline:
                    why = f"no result after {timeout:.0f} s; the worker was stopped"
                    self.proc.kill()
                else:
                    continue
                self.proc.join(10)
                self.proc = None
                v = task.job.variant
                return Result(task.job.row.key, v.key, v.column, v.label, status="error", message=why)
        if res.poisoned:
            self.proc.join(30)
            self.proc = None
        return res

    def close(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.tasks.put(None)
            self.proc.join(30)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(10)
        self.proc = None


def log(message: str) -> None:
    print(f"[bench_kernels {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_plan(plan: Plan, args: argparse.Namespace) -> tuple[list[Result], dict[str, Built], dict[str, str]]:
    """Build in parallel (fla compiles meanwhile), then time every job; returns results in job order."""
    ctx = mp.get_context("spawn")
    started = time.perf_counter()
    builds: dict[str, Built] = {}
    pool, pending = None, {}
    if plan.builds and args.device == "cuda":
        processes = max(1, min(len(plan.builds), args.build_jobs))
        per_build = max(1, (os.cpu_count() or 2) // processes)
        log(f"building {len(plan.builds)} extensions in {processes} processes (MAX_JOBS={per_build} each)")
        pool = ctx.Pool(processes, maxtasksperchild=1)
        pending = {key: pool.apply_async(_build_task, ((spec, per_build),)) for key, spec in plan.builds.items()}

    worker = Worker(ctx)
    seeds = {row.key: row.seed(args.seed) for row in plan.rows}

    def task(job: Job, mode: str, anchor: np.ndarray | None = None) -> Task:
        build = job.variant.build or ""
        return Task(job, mode, built=builds.get(build), spec=plan.builds.get(build), anchor=anchor, warmup=args.warmup,
                    repeats=args.repeats, max_seconds=args.max_seconds, seed=seeds[job.row.key], device=args.device)  # fmt: skip

    try:
        env = worker.run(Task(plan.jobs[0], "env", device=args.device), timeout=120).info
        # fla's first call compiles and autotunes its Triton kernels (the CPU work of a minute or two):
        # do it now, at the real shapes, while the extensions build.
        for job in plan.jobs:
            if job.variant.column == "fla" and not job.skip:
                log(f"compiling fla for {job.row.key}")
                res = worker.run(task(job, "warm"), timeout=args.job_timeout * 2)
                if res.status != "ok":
                    log(f"  fla warm-up: {res.status} {res.message}")
        for key, handle in pending.items():
            try:
                builds[key] = handle.get(timeout=max(1.0, args.build_timeout - (time.perf_counter() - started)))
            except mp.TimeoutError:
                builds[key] = Built(key, False, message=f"build timed out after {args.build_timeout:.0f} s")
            except Exception as exc:  # noqa: BLE001 - a crashed build process
                builds[key] = Built(key, False, message=f"build process failed: {_short(exc)}")
            b = builds[key]
            log(f"built {key}: {'ok' if b.ok else b.message} ({b.seconds:.0f} s)")
        if pool is not None:
            pool.close()
            pool.join()
            log(f"builds done after {time.perf_counter() - started:.0f} s")

        results: dict[int, Result] = {}
        anchors: dict[str, tuple[str, np.ndarray]] = {}

        def record(i: int, res: Result) -> None:
            job = plan.jobs[i]
            if res.fingerprint is not None:
                if job.row.key in anchors:
                    res.anchor = anchors[job.row.key][0]
                elif res.status == "ok" and not res.nan:
                    anchors[job.row.key] = (job.variant.label, res.fingerprint)
                    res.anchor = "(anchor)"
                res.fingerprint = None
            results[i] = res
            ms = f"{res.median_ms:.2f} ms" if res.median_ms is not None else res.status
            extra = f" [{res.message}]" if res.message else ""
            log(f"{job.row.key:<26} {job.variant.label:<44} {ms}{extra}")

        shared = [i for i, j in enumerate(plan.jobs) if not j.variant.isolate]
        isolated = [i for i, j in enumerate(plan.jobs) if j.variant.isolate]
        for i in shared:
            job = plan.jobs[i]
            anchor = anchors.get(job.row.key, (None, None))[1]
            record(i, worker.run(task(job, "time", anchor), timeout=args.job_timeout))
        worker.close()  # its cached GPU memory goes back before the isolated runs
        for i in isolated:
            job = plan.jobs[i]
            anchor = anchors.get(job.row.key, (None, None))[1]
            alone = Worker(ctx)
            try:
                record(i, alone.run(task(job, "time", anchor), timeout=args.job_timeout))
            finally:
                alone.close()
    finally:
        worker.close()
        if pool is not None:
            pool.terminate()
    log(f"done after {time.perf_counter() - started:.0f} s")
    return [results[i] for i in range(len(plan.jobs))], builds, env
