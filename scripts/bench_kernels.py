"""Time WKV forward + backward on one GPU: this project's kernels next to RWKV-LM's and fla's.

    scripts/fetch_reference_kernels.sh             # once: BlinkDL/RWKV-LM's kernels into third_party/
    python scripts/bench_kernels.py                # v4-v7 at (B, T, C) = (8, 4096, 4096) and (1, 32768, 4096)
    python scripts/bench_kernels.py --generations v7 --shapes 8x4096x4096 --columns ours-cuda rwkv-lm
    python scripts/bench_kernels.py --plan         # what would be built and timed (no GPU needed)

One row per (generation, shape), head size 64; median milliseconds of one forward + backward:
  ours cuda    rwkv_train.ops.wkv{4,5,6,7}_cuda: this project's CUDA kernels; for v7 both the
               sequential wkv7_cuda and the chunked tensor-core wkv7_chunked_cuda, the cell names the
               faster.
  ours torch   the pure-PyTorch backends (backend="torch"), float32 compute, TF32 matmuls as the
               trainer sets them; "OOM" where they do not fit.
  RWKV-LM      BlinkDL/RWKV-LM's training kernels, built from third_party/RWKV-LM with its trainers'
               flags and called as its trainers call them (same dtypes, same arithmetic around the
               op). v7 has three (the trainer's default rwkv7_clampw, its H100 option clampw_v3, the
               earlier wkv7_cuda); the cell shows the fastest. Where a kernel cannot handle a shape
               the cell says why.
  fla          flash-linear-attention, when importable: chunk_rwkv7 (called as fla's RWKV-7 layer calls
               it), chunk_rwkv6; for v5 chunk_rwkv6 with the time-constant decay broadcast over (B, T),
               the same recurrence (fla has no RWKV-5 op); for v4 fused_recurrent_rwkv4 (no chunked one).
  speed-up     RWKV-LM / ours cuda.

All variants of a row see the same random inputs, shaped like the model's (see
`kernel_bench.variants.make_inputs`) and converted to what each takes (log-decay, its logarithm, or the
pre-activation). dy is random and every input gets its gradient. No initial state and no final-state gradient: RWKV-LM's kernels have
neither. Each variant's first run is a check: its outputs (and the RWKV-LM wrappers' gradient
buffers) start as NaN, so an element left unwritten shows up, and y is compared with the first
variant of the row that ran (ours torch when it fits) on three 32-step windows. One input set per
row: each tensor is hundreds of MB against a 50 MB L2, so no rotation is needed to keep runs from
hitting a warm cache. The table and the details go to --out as markdown and CSV.

How it runs: the kernels build in parallel processes while fla's Triton kernels compile; the timing
runs in a worker process, restarted when a failure leaves the CUDA context unusable; RWKV-LM's v4 and
v6 kernels bake T in and reserve per-thread local memory that grows with it (several GB, kept by
the driver), and register their ops under one fixed name, so each of those runs in a process of its own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
for path in (SCRIPTS, REPO):  # the kernel_bench package beside this script; rwkv_train from a checkout
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from kernel_bench.jobs import COLUMNS, DEFAULT_SHAPES, GENERATIONS, TITLES, Plan, Shape  # noqa: E402
from kernel_bench.plan import make_plan  # noqa: E402
from kernel_bench.report import print_table, render_text, summarize, write_outputs  # noqa: E402
from kernel_bench.runner import MIN_RUNS, nvcc_version, run_plan  # noqa: E402

# --------------------------------------------------------------------------------------------------
# Command line


def parse_shape(text: str, head_size: int) -> Shape:
    parts = text.replace(",", "x").split("x")
    try:
        B, T, C = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected BxTxC, e.g. 8x4096x4096") from None
    if min(B, T, C) < 1 or C % head_size:
        raise argparse.ArgumentTypeError(
            f"shape {text!r}: B, T, C must be positive and C a multiple of the head size {head_size}"
        )
    return Shape(B, T, C, head_size)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out", default="out/bench_kernels", help="folder for bench_kernels.md / .csv (default: %(default)s)"
    )
    p.add_argument(
        "--reference",
        default=str(REPO / "third_party" / "RWKV-LM"),
        help="a copy of BlinkDL/RWKV-LM (default: third_party/RWKV-LM, see scripts/fetch_reference_kernels.sh)",
    )
    p.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="BxTxC each (default: %(default)s)")
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--generations", nargs="+", choices=GENERATIONS, default=list(GENERATIONS))
    p.add_argument("--columns", nargs="+", choices=COLUMNS, default=list(COLUMNS))
    p.add_argument("--repeats", type=int, default=10, help="timed runs per variant, at most (default: %(default)s)")
    p.add_argument(
        "--warmup", type=int, default=2, help="untimed runs first, the output check included (default: %(default)s)"
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=5.0,
        help=f"stop timing a variant after this long, once it has {MIN_RUNS} runs (default: %(default)s)",
    )
    p.add_argument("--build-jobs", type=int, default=8, help="extensions built at once (default: %(default)s)")
    p.add_argument("--build-timeout", type=float, default=420.0, help="seconds for all builds (default: %(default)s)")
    p.add_argument("--job-timeout", type=float, default=180.0, help="seconds for one variant (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cpu: a smoke test of this script on tiny shapes (PyTorch backends only)",
    )
    p.add_argument("--plan", action="store_true", help="print the builds and variants, run nothing")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.repeats < 1:
        p.error("--warmup and --repeats must be at least 1 (the first warm-up run is the output check)")
    try:
        args.shape_list = [parse_shape(s, args.head_size) for s in args.shapes]
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    return args


def print_plan(plan: Plan) -> None:
    print("builds:")
    for spec in plan.builds.values():
        if spec.generation:
            print(f"  {spec.key}: rwkv_train.ops.kernels.load({spec.generation!r}, {spec.head_size})")
        else:
            print(f"  {spec.name}: {' + '.join(Path(s).name for s in spec.sources)}  flags: {' '.join(spec.flags)}")
    print("variants:")
    for job in plan.jobs:
        tag = " (own process)" if job.variant.isolate else ""
        skip = f"  SKIPPED: {job.skip}" if job.skip else ""
        print(f"  {job.row.key:<26} {TITLES[job.variant.column]:<11} {job.variant.label}{tag}{skip}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    plan = make_plan(args.generations, args.shape_list, args.columns, Path(args.reference))
    if args.plan:
        print_plan(plan)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(
            "bench_kernels: no CUDA device (torch.cuda.is_available() is False). This benchmark times GPU "
            "kernels: run it on a machine with an NVIDIA GPU and a CUDA build of torch; "
            "`--plan` shows what it would run, `--device cpu` smoke-tests it on the PyTorch backends."
        )
    if args.device == "cpu":
        plan.jobs, plan.builds = [j for j in plan.jobs if j.variant.column == "ours-torch"], {}
    if not plan.jobs:
        sys.exit("bench_kernels: nothing to run (on --device cpu only the ours-torch column runs)")
    results, builds, env = run_plan(plan, args)
    env["nvcc"] = nvcc_version()
    table, notes = summarize(plan, results, args.columns)
    rows = render_text(table, args.columns, args.head_size)
    print()
    print_table(rows)
    print("speed-up: RWKV-LM / ours cuda (> 1: ours is faster)")
    for i, text in enumerate(notes.items, 1):
        print(f"[{i}] {text}")
    write_outputs(Path(args.out), plan, results, builds, env, table, notes, rows, args)
    print(f"\nwritten: {Path(args.out) / 'bench_kernels.md'}, bench_kernels.csv, bench_kernels_all.csv")


if __name__ == "__main__":
    main()
