"""Build the CUDA WKV kernels ahead of time, in parallel (they are otherwise built on first use).

    python scripts/build_kernels.py                       # every generation, head sizes 64 and 128
    python scripts/build_kernels.py --generations v7 --head-sizes 64
    python scripts/build_kernels.py --generations v7-chunked --versions   # and the exported earlier versions

--versions also builds, at head size 64, the chunked kernel of every earlier version exported for
scripts/bench_wkv7_versions.py (third_party/wkv7_versions), which that benchmark then finds built.

Each build lands in torch's extension cache (TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions), where
training finds it. Prints one line per kernel with its build time; exits 1 if any build failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]  # rwkv_train; scripts

from rwkv_train.ops import kernels


def _build(job: tuple[str, int | None]) -> tuple[str, int | None, float, str | None]:
    generation, head_size = job
    started = time.time()
    if generation.startswith("version "):  # an exported earlier version of the chunked kernel
        import bench_wkv7_versions

        problem = bench_wkv7_versions.build_problem(bench_wkv7_versions.VERSIONS / generation.split()[1], head_size)
        return generation, head_size, time.time() - started, problem
    try:
        kernels.load(generation, head_size)
    except kernels.KernelUnavailable as exc:
        return generation, head_size, time.time() - started, str(exc)
    return generation, head_size, time.time() - started, None


def build_jobs(generations: list[str], head_sizes: list[int], versions: bool) -> list[tuple[str, int | None]]:
    """(kernel, head size) per build, each source and head size once; ("version REV", 64) for each exported
    earlier version of the chunked kernel where `versions`."""
    jobs: list[tuple[str, int | None]] = []
    seen: set[tuple[str, int | None]] = set()  # (source, head size): v5 and v6 share one build
    for generation in generations:
        for size in (s for s in (None, *head_sizes) if s in kernels.head_sizes(generation)):  # v4: None
            if (kernels.SOURCES[generation], size) not in seen:
                seen.add((kernels.SOURCES[generation], size))
                jobs.append((generation, size))
    if versions:
        import bench_wkv7_versions

        jobs += [(f"version {folder.name}", 64) for folder in bench_wkv7_versions.exported()]
    return jobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generations", nargs="+", default=["v4", "v6", "v6-chunked", "v7", "v7-chunked"],
                        choices=sorted(kernels.SOURCES))
    parser.add_argument("--head-sizes", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--jobs", type=int, default=4, help="builds at once (each also uses MAX_JOBS compiler jobs)")
    parser.add_argument("--versions", action="store_true",
                        help="also the exported earlier versions of the chunked kernel (head size 64)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    jobs = build_jobs(args.generations, args.head_sizes, args.versions)
    first = next(((g, size) for g, size in jobs if g in kernels.SOURCES), ("v7-chunked", 64))  # versions: that kernel
    reason = kernels.unavailable_reason(*first) if jobs else None
    if reason is not None:
        print(f"build_kernels: cannot build here: {reason}", file=sys.stderr)
        return 1
    failed = 0
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for generation, size, seconds, error in pool.map(_build, jobs):
            label = f"{generation}" + ("" if size is None else f" head {size}")
            print(f"{label:<14} {'FAILED' if error else 'ok':<7} {seconds:6.1f} s" + (f"  {error}" if error else ""))
            failed += error is not None
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
