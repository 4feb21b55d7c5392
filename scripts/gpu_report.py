"""Every GPU check and benchmark of the CUDA kernels in one run, summed up in one table.

    python scripts/gpu_report.py                      # build, tests, sanitizer, kernel and training benchmarks
    python scripts/gpu_report.py --skip train         # leave steps out (build, tests, sanitizer, racecheck, profile,
                                                      # splits, versions, kernels, train, train-chunked,
                                                      # train-compiled, train-modes, train-autotune, train-accumulate)
    python scripts/gpu_report.py --plan               # the commands it would run; no GPU needed
    python scripts/gpu_report.py --generations v7-chunked --skip kernels train-chunked train-compiled train-modes \
        train-autotune train-accumulate               # one kernel, a few minutes
    python scripts/gpu_report.py --budget 540 --generations v7-chunked \
        --steps build tests kernels versions sanitizer splits   # these steps, in this order, within 9 minutes

Steps, each a subprocess with its own time limit, its output kept in --out/<step>.log:
  build      scripts/build_kernels.py: every kernel built once, in parallel
  tests      pytest tests/test_kernels_cuda.py: every kernel against the float64 reference (the largest
             error per kernel and quantity goes into the report)
  sanitizer  compute-sanitizer memcheck over scripts/sanitize_kernels.py
  racecheck  compute-sanitizer racecheck over the same: shared-memory hazards between threads
  profile    scripts/profile_kernels.py: per-kernel time of both v7 kernels
  splits     scripts/bench_wkv7_split.py: the chunked kernels at 1, 2 and 4 blocks per head, B=1 to 8
  versions   scripts/bench_wkv7_versions.py: the chunked v7 kernel beside the earlier versions exported to
             third_party/wkv7_versions (--export REV), timed on this GPU in the same run
  kernels    scripts/bench_kernels.py (forward + backward times against RWKV-LM and fla)
  train      scripts/bench_train.py (tokens/s, memory, MFU of the RWKV-7 presets)
  train-chunked  the same with the chunked WKV-7 kernel (--kernel cuda-chunked)
  train-compiled the same with the chunked kernel and compiled blocks (--compile blocks, train.compile)
  train-modes    1.5B as train-compiled, without checkpointing, with selective checkpointing keeping the
                 WKV's outputs, and selective (--grad-cp off selective-wkv selective), each step's time by kind
                 (--profile: products, WKV, fused elementwise, optimiser, other, GPU idle)
  train-autotune 1.5B selective at micro-batch 8, compiled with max_autotune (--compile blocks-autotune)
  train-accumulate  1.5B as train-compiled with 4 micro-batches per optimiser step, without checkpointing
                 and with selective-wkv (--accumulate 4 --grad-cp off selective-wkv), profiled as train-modes
--generations narrows the builds, tests, sanitizers, profile and kernel benchmark to those kernels
(v7-chunked and v6-chunked are the chunked RWKV-7 and RWKV-5/6 kernels; the kernel benchmark times
both kernels of a generation for either), and keeps a step that concerns some kernels only where one
of them is chosen (train: v7; splits: the chunked ones; versions and the other training runs:
v7-chunked).
--steps runs only the steps named, in the order given (the most important first), where --skip
leaves steps out of the default order.

--budget SECONDS bounds the whole run's wall-clock time: each step's limit is cut to what is left of the
budget, and a step that would get less than MIN_STEP_S seconds is not started (reported as "not run").
So a run on a machine rented for a fixed time ends, with its report written, inside that time.

A step that outruns its limit is stopped with every process it started (builds, benchmark workers).
The summary (step, result, the line that says how it went, seconds) is printed and written to
--out/gpu_report.md after every step, with the benchmarks' tables and the last lines of each failed
step's log after it: that one file says everything, also when the run is cut short. Exits 1 if any
step failed or was not run.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
try:
    import rwkv_train  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO))

from rwkv_train.ops import kernels

STEPS = ("build", "tests", "sanitizer", "racecheck", "profile", "splits", "versions", "kernels", "train",
         "train-chunked", "train-compiled", "train-modes", "train-autotune", "train-accumulate")
GENERATIONS = tuple(kernels.SOURCES)  # v4, v5, v6, v7, v7-chunked, v6-chunked
# pytest -k expressions that pick one kernel's tests out of tests/test_kernels_cuda.py by their ids
# (v7-h64, v7-chunked-h64, v5-chunked-h64, [sequential] / [chunked] for the model step)
TEST_FILTER = {"v4": "v4", "v5": "v5 and not v5-chunked", "v6": "v6 and not v6-chunked",
               "v7": "(v7 and not chunked) or sequential",
               "v7-chunked": "chunked and not v5-chunked and not v6-chunked", "v6-chunked": "v5-chunked or v6-chunked"}
# steps that only concern some kernels: run where --generations names one of them
STEP_KERNEL = {"splits": ("v7-chunked", "v6-chunked"), "versions": ("v7-chunked",), "train": ("v7",),
               "train-chunked": ("v7-chunked",), "train-compiled": ("v7-chunked",), "train-modes": ("v7-chunked",),
               "train-autotune": ("v7-chunked",), "train-accumulate": ("v7-chunked",)}
MIN_STEP_S = 30  # with --budget, a step is started only with at least this many seconds left
LOG_TAIL_LINES = 40  # lines of a failed step's log in the report


@dataclass
class Step:
    name: str
    command: list[str]
    timeout_s: int
    verdict: str  # a regular expression for the line of the output that says how it went
    table: Path | None = None  # a markdown table the step writes, appended to the report


@dataclass
class Outcome:
    step: Step
    ok: bool
    summary: str
    seconds: float
    ran: bool = True  # False: not started (the budget was spent)
    log_tail: str = ""  # the last lines of the log of a step that failed
    table: Path | None = None  # the step's table, where this run of it wrote one

    @property
    def result(self) -> str:
        return "ok" if self.ok else "FAILED" if self.ran else "not run"


def plan(out: Path, jobs: int, generations: list[str] | None = None) -> list[Step]:
    """The steps, narrowed to `generations` (None: every kernel)."""
    py = sys.executable
    chosen = list(generations or GENERATIONS)
    narrow = generations is not None
    # every head size the GPU tests load (the chunked kernel's tests also run head size 32)
    build = ["--head-sizes", *(["32"] if {"v7-chunked", "v6-chunked"} & set(chosen) else []), "64", "128"]
    if "v7-chunked" in chosen:
        build.append("--versions")  # the versions step's earlier kernels, built beside the others
    tests, sanitize, bench = [], [], []
    if narrow:
        build += ["--generations", *chosen]
        tests = ["-k", " or ".join(f"({TEST_FILTER[g]})" for g in chosen)]
        sanitize = chosen
        bench = ["--generations", *dict.fromkeys(g.removesuffix("-chunked") for g in chosen)]
    profiled = chosen if narrow else ["v6", "v6-chunked", "v7", "v7-chunked"]

    def sanitizer(tool: str) -> list[str]:  # compute-sanitizer's `tool` over sanitize_kernels.py
        return [kernels.cuda_tool("compute-sanitizer") or "compute-sanitizer", "--tool", tool, "--error-exitcode", "1", py,
                "scripts/sanitize_kernels.py", *sanitize]

    steps = [
        Step("build", [py, "scripts/build_kernels.py", "--jobs", str(jobs), *build], 900, r"(built|failed|ok)"),
        Step("tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels_cuda.py",
                       "--kernel-errors", str(out / "tests" / "kernel_errors.csv"), *tests], 900,
             r"\d+ (passed|failed|error)", out / "tests" / "kernel_errors.md"),
        Step("sanitizer", sanitizer("memcheck"), 900, r"ERROR SUMMARY"),
        Step("racecheck", sanitizer("racecheck"), 900, r"RACECHECK SUMMARY"),
        Step("profile", [py, "scripts/profile_kernels.py", "--generations", *profiled], 600,
             rf"^{profiled[-1]} +forward \+ backward"),
        Step("splits", [py, "scripts/bench_wkv7_split.py", "--out", str(out / "splits"), "--kernels",
                        *[g for g in ("v7-chunked", "v6-chunked") if g in chosen]], 600, r"written:|error",
             out / "splits" / "bench_wkv7_split.md"),
        Step("versions", [py, "scripts/bench_wkv7_versions.py", "--out", str(out / "versions")], 600, r"written:|error",
             out / "versions" / "bench_wkv7_versions.md"),
        Step("kernels", [py, "scripts/bench_kernels.py", "--out", str(out / "kernels"), *bench], 1800, r"done after",
             out / "kernels" / "bench_kernels.md"),
        Step("train", [py, "scripts/bench_train.py", "--out", str(out / "train")], 1800, r"written:|error",
             out / "train" / "bench_train.md"),
        Step("train-chunked", [py, "scripts/bench_train.py", "--kernel", "cuda-chunked", "--out", str(out / "train-chunked")],
             1800, r"written:|error", out / "train-chunked" / "bench_train.md"),
        Step("train-compiled", [py, "scripts/bench_train.py", "--kernel", "cuda-chunked", "--compile", "blocks",
                                "--out", str(out / "train-compiled")],
             1800, r"written:|error", out / "train-compiled" / "bench_train.md"),
        # the modes that recompute no product, the likeliest best first; each starts its micro-batch search
        # where it fits on a 141 GB GPU (an 80 GB one goes on down), so a compiled run recompiles less
        Step("train-modes", [py, "scripts/bench_train.py", "--configs", "configs/rwkv7-1.5b.yaml", "--kernel", "cuda-chunked",
                             "--compile", "blocks", "--grad-cp", "off", "selective-wkv", "selective",
                             "--micro-batch", "off=6", "selective-wkv=12", "selective=16", "--profile",
                             "--out", str(out / "train-modes")],
             1800, r"written:|error", out / "train-modes" / "bench_train.md"),
        Step("train-autotune", [py, "scripts/bench_train.py", "--configs", "configs/rwkv7-1.5b.yaml", "--kernel",
                                "cuda-chunked", "--compile", "blocks-autotune", "--grad-cp", "selective", "--micro-batch",
                                "8", "--out", str(out / "train-autotune")],
             1800, r"written:|error", out / "train-autotune" / "bench_train.md"),
        Step("train-accumulate", [py, "scripts/bench_train.py", "--configs", "configs/rwkv7-1.5b.yaml", "--kernel",
                                  "cuda-chunked", "--compile", "blocks", "--accumulate", "4", "--grad-cp", "off",
                                  "selective-wkv", "--micro-batch", "off=6", "selective-wkv=12", "--profile",
                                  "--out", str(out / "train-accumulate")],
             1800, r"written:|error", out / "train-accumulate" / "bench_train.md"),
    ]
    return [s for s in steps if s.name not in STEP_KERNEL or set(STEP_KERNEL[s.name]) & set(chosen)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip", nargs="+", default=[], choices=STEPS, metavar="STEP",
                   help=f"steps to leave out: {', '.join(STEPS)}")
    p.add_argument("--steps", nargs="+", choices=STEPS, metavar="STEP",
                   help="only these steps, in this order (default: every step, in the order above)")
    p.add_argument("--generations", nargs="+", choices=GENERATIONS, metavar="KERNEL",
                   help=f"only these kernels: {', '.join(GENERATIONS)} (default: all)")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="wall-clock seconds for the whole run: step limits are cut to what is left, and no step is "
                        f"started with under {MIN_STEP_S} s left (default: no budget)")
    p.add_argument("--jobs", type=int, default=4, help="kernel builds at once in the build step (default 4)")
    p.add_argument("--out", type=Path, default=REPO / "out" / "gpu_report", help="folder for the logs and the report")
    p.add_argument("--plan", action="store_true", help="print the steps' commands and exit; no GPU needed")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    if args.budget is not None and args.budget < MIN_STEP_S:
        p.error(f"--budget must be at least {MIN_STEP_S} seconds (the least a step is started with)")
    if args.steps and len(set(args.steps)) != len(args.steps):
        p.error("--steps names a step twice")
    return args


def chosen_steps(args: argparse.Namespace) -> list[Step]:
    """The plan's steps for the arguments: --steps' order where given, without --skip's; raises ValueError
    for a step named in --steps that the plan does not have (a training run of a kernel left out)."""
    planned = {s.name: s for s in plan(args.out, args.jobs, args.generations)}
    if args.steps:
        missing = [name for name in args.steps if name not in planned]
        if missing:
            kernel = " or ".join(sorted({k for name in missing for k in STEP_KERNEL[name]}))
            raise ValueError(f"--steps {' '.join(missing)}: only run with the {kernel} kernel, which --generations "
                             f"{' '.join(args.generations or [])} leaves out; add it to --generations or drop the step")
        steps = [planned[name] for name in args.steps]
    else:
        steps = list(planned.values())
    return [s for s in steps if s.name not in args.skip]


def last_matching(text: str, pattern: str) -> str:
    """The last output line matching `pattern` (stripped), or the last non-empty line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    matching = [line for line in lines if re.search(pattern, line)]
    return (matching or lines or ["(no output)"])[-1]


def run_step(step: Step, out: Path, limit_s: float | None = None) -> Outcome:
    """Run one step with its output logged to out/<step>.log, stopped after min(its limit, limit_s) seconds
    together with every process it started (it runs in a process group of its own)."""
    limit = step.timeout_s if limit_s is None else min(step.timeout_s, limit_s)
    log = out / f"{step.name}.log"
    start, before = time.perf_counter(), _stamp(step.table)
    if shutil.which(step.command[0]) is None and not Path(step.command[0]).exists():
        return Outcome(step, False, f"{step.command[0]} not found: install it (it ships with the CUDA toolkit)", 0.0)
    proc = subprocess.Popen(step.command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=limit)
        ok = proc.returncode == 0
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the step and its builds, workers and compilers
        text, _ = proc.communicate()
        text += f"\n(stopped after its {limit:.0f} s limit)"
        ok = False
    log.write_text(text)
    summary = last_matching(text, step.verdict if ok else r"(error|Error|failed|FAILED|limit)")
    tail = "" if ok else "\n".join(text.rstrip().splitlines()[-LOG_TAIL_LINES:])
    table = step.table if _stamp(step.table) not in (None, before) else None  # not one an earlier run left
    return Outcome(step, ok, summary[:160], time.perf_counter() - start, log_tail=tail, table=table)


def _stamp(path: Path | None) -> tuple[int, int] | None:
    """A file's modification time and size, or None where there is no file."""
    if path is None or not path.exists():
        return None
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


def report(outcomes: list[Outcome]) -> str:
    rows = [("step", "result", "how it went", "seconds")]
    rows += [(o.step.name, o.result, o.summary, f"{o.seconds:.0f}") for o in outcomes]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def markdown(title: str, outcomes: list[Outcome]) -> str:
    """The whole report: the summary, the tables the steps wrote, the end of each failed step's log."""
    parts = [f"# GPU report: {title}", "```\n" + report(outcomes) + "\n```"]
    parts += [o.table.read_text() for o in outcomes if o.table]
    parts += [f"## {o.step.name}: the last lines of its log\n\n```\n{o.log_tail}\n```" for o in outcomes if o.log_tail]
    return "\n\n".join(parts) + "\n"


def run_steps(steps: list[Step], out: Path, title: str, budget: float | None = None,
              started: float | None = None) -> list[Outcome]:
    """Run the steps in order, within `budget` seconds from `started` (a perf_counter time; default now)
    where given, rewriting out/gpu_report.md after each."""
    started = time.perf_counter() if started is None else started
    out.mkdir(parents=True, exist_ok=True)
    written = out / "gpu_report.md"
    outcomes: list[Outcome] = []
    for s in steps:
        left = None if budget is None else budget - (time.perf_counter() - started)
        if left is not None and left < MIN_STEP_S:
            outcomes.append(Outcome(s, False, f"not started: {max(left, 0):.0f} s of the {budget:.0f} s budget left",
                                    0.0, ran=False))
            print(f"[{s.name}] not run: the budget is spent", flush=True)
        else:
            print(f"[{s.name}] {' '.join(s.command)}", flush=True)
            outcomes.append(run_step(s, out, left))
            print(f"[{s.name}] {outcomes[-1].result}: {outcomes[-1].summary}", flush=True)
        written.write_text(markdown(title, outcomes))  # after every step: a run cut short keeps what it did
    return outcomes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        steps = chosen_steps(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.plan:
        for s in steps:
            print(f"{s.name:<{max(map(len, STEPS))}} (limit {s.timeout_s} s)  {' '.join(s.command)}")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("error: gpu_report.py runs the GPU checks and needs a CUDA device, but torch.cuda.is_available() is "
              "False: run it on a machine with an NVIDIA GPU and a CUDA build of torch (--plan shows the steps)",
              file=sys.stderr)
        return 1
    title = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    print(f"{title}; logs in {args.out}", flush=True)
    outcomes = run_steps(steps, args.out, title, args.budget, started)
    print("\n" + report(outcomes))
    print(f"\nwritten: {args.out / 'gpu_report.md'}")
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
