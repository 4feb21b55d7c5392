"""Time the chunked WKV-7 kernel of earlier revisions beside this tree's, on one GPU, in one run.

    python scripts/bench_wkv7_versions.py --export 66a2290     # with git: that revision's cuda/ into
                                                                # third_party/wkv7_versions/66a2290
    python scripts/bench_wkv7_versions.py                       # every exported revision and this tree's kernel
    python scripts/bench_wkv7_versions.py --shapes 8x4096 --repeats 20 --out out/versions
    python scripts/bench_wkv7_versions.py --plan                # what would be built and timed; no GPU needed

A kernel's time depends on the GPU it runs on, so a change is judged against the version before it
timed on the same card in the same run, not against a figure taken on another machine. Each
version's sources (the cuda/ folder of its revision, exported with git here, so a machine without
the repository's history can run this) are built as their own extension with this tree's nvcc
flags, and run through this tree's op and autograd wrapper (kernels.load swapped for the version's
module; versions from before split heads take no split argument and run one block per head, and
versions from before the saved sa take none). Per
shape: the median forward and forward + backward time of each version (CUDA events), and how far
its y and gradients are from this tree's kernel on the same inputs (relative; the versions compute
the same function, so a large difference means a broken build or version). --out writes the table
to OUT/bench_wkv7_versions.md.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import subprocess
import sys
import tarfile
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
for path in (SCRIPTS, REPO):  # bench_wkv7_split beside this script; rwkv_train from a checkout
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_wkv7_split import inputs, parse_shape  # noqa: E402
from rwkv_train.ops import kernels  # noqa: E402

VERSIONS = REPO / "third_party" / "wkv7_versions"  # git-ignored: exported sources, never committed
SOURCE = kernels.SOURCES["v7-chunked"]
CURRENT = "this tree"
TOLERANCE = 1e-2  # relative difference from this tree's kernel above which a version is flagged


def export(revision: str, into: Path | None = None) -> Path:
    """The cuda/ folder of a git revision into `into` (default VERSIONS)/<short hash>/, kept if already there;
    returns the folder."""
    into = VERSIONS if into is None else into

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, check=False)

    resolved = git("rev-parse", "--short=7", "--verify", "--quiet", f"{revision}^{{commit}}")
    if resolved.returncode != 0:
        raise ValueError(f"{revision!r} is not a commit of this repository "
                         f"(git log -- cuda/{SOURCE} lists the kernel's)")
    short = resolved.stdout.decode().strip()
    folder = into / short
    if (folder / SOURCE).is_file():
        return folder
    archive = git("archive", "--format=tar", short, "cuda")
    if archive.returncode != 0 or not archive.stdout:
        raise ValueError(f"{short} has no cuda/ folder: {archive.stderr.decode().strip()}")
    into.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=into, prefix=".export-") as tmp:  # beside it: the rename stays on one disk
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(tmp, filter="data")
        if not (Path(tmp) / "cuda" / SOURCE).is_file():
            raise ValueError(f"{short} has no cuda/{SOURCE}: the chunked kernel came later")
        (Path(tmp) / "cuda").rename(folder)  # whole or not at all
    return folder


def exported(into: Path | None = None) -> list[Path]:
    """The exported versions' folders in `into` (default VERSIONS), by name."""
    into = VERSIONS if into is None else into
    return sorted(p for p in into.iterdir() if (p / SOURCE).is_file()) if into.is_dir() else []


def build(folder: Path, head_size: int):
    """One version's kernel module, built on first use (with this tree's flags) into torch's extension cache."""
    from torch.utils import cpp_extension

    flags = kernels.nvcc_flags("v7-chunked", head_size)
    name = kernels.module_name("v7-chunked", head_size, folder)  # as the loader names its builds: by content
    directory = kernels.build_dir() / name
    directory.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(name=name, sources=[str(folder / SOURCE)], extra_cuda_cflags=flags,
                              extra_include_paths=[str(folder)], build_directory=str(directory), verbose=False)


def build_problem(folder: Path, head_size: int) -> str | None:
    """Build a version in a worker process; None, or why it failed."""
    try:
        build(folder, head_size)
    except Exception as exc:  # noqa: BLE001 - a compiler error, reported in the table
        lines = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {lines[-1] if lines else exc}"
    return None


class Version:
    """A built kernel module as the op wrapper uses it. A version from before the forward saved sa is
    called without it (it recomputes it in the backward); one from before split heads runs split 1 and
    is called without the split."""

    FORWARD_SA, BACKWARD_SA = 10, 7  # sa's place among the op wrapper's arguments

    def __init__(self, module):
        self.module = module
        self.splits = list(getattr(module, "splits", [1]))
        self.takes_split = hasattr(module, "splits")
        self.takes_sa = "sa" in getattr(module, "saved", ())

    def _arguments(self, args: tuple, sa_at: int) -> list:
        args = [x for i, x in enumerate(args) if self.takes_sa or i != sa_at]
        return args if self.takes_split else args[:-1]

    def forward(self, *args):
        return self.module.forward(*self._arguments(args, self.FORWARD_SA))

    def backward(self, *args):
        return self.module.backward(*self._arguments(args, self.BACKWARD_SA))


def relative(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def time_shape(B: int, T: int, C: int, N: int, versions: dict[str, Version], repeats: int) -> list[str]:
    """One table row per version at one shape (printed as they come)."""
    from rwkv_train.ops import wkv7_chunked_cuda as op

    xs = inputs(B, T, C, N)
    dy = torch.randn(B, T, C // N, N, device="cuda", dtype=torch.bfloat16)
    reference: list[torch.Tensor] | None = None
    rows, load = [], kernels.load
    for label, version in versions.items():
        kernels.load = lambda generation, head_size=None, version=version: version  # the op's module
        try:
            def forward() -> None:
                with torch.no_grad():
                    op.wkv7_chunked_cuda(*xs)

            def both() -> list[torch.Tensor]:
                for x in xs:
                    x.grad = None
                y = op.wkv7_chunked_cuda(*xs)[0]
                y.backward(dy)
                return [y.detach(), *(x.grad for x in xs)]

            results = both()
            if reference is None:
                reference = results
            diff = max(relative(x, ref) for x, ref in zip(results, reference))
            forward_ms = kernels.median_cuda_ms(forward, repeats, warmup=2)
            both_ms = kernels.median_cuda_ms(both, repeats, warmup=2)
        finally:
            kernels.load = load
        flag = " (!)" if diff > TOLERANCE else ""
        rows.append(f"| {B} | {T} | {label} | {forward_ms:.2f} | {both_ms - forward_ms:.2f} | {both_ms:.2f} | "
                    f"{diff:.1e}{flag} |")
        print(rows[-1], flush=True)
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", nargs="+", metavar="REV",
                   help="export these revisions' kernel sources (needs git) and exit")
    p.add_argument("--versions", nargs="+", type=Path, metavar="DIR",
                   help=f"folders of kernel sources to time (default: every one in {VERSIONS.relative_to(REPO)})")
    p.add_argument("--shapes", nargs="+", type=parse_shape, default=[(8, 4096), (1, 32768)], metavar="BxT",
                   help="batch x sequence length (default: 8x4096 1x32768)")
    p.add_argument("--channels", type=int, default=4096, help="C = H x head size (default 4096)")
    p.add_argument("--head-size", type=int, default=64, choices=kernels.head_sizes("v7-chunked"))
    p.add_argument("--repeats", type=int, default=10, help="timed runs per cell (default 10)")
    p.add_argument("--out", type=Path, help="also write the table to OUT/bench_wkv7_versions.md")
    p.add_argument("--plan", action="store_true", help="list the versions and shapes, run nothing")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.channels % args.head_size:
        p.error(f"--channels {args.channels} is not a multiple of --head-size {args.head_size}")
    for folder in args.versions or []:
        if not (folder / SOURCE).is_file():
            p.error(f"--versions {folder}: no {SOURCE} there (export a revision with --export REV)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.export:
        for revision in args.export:
            try:
                print(f"{revision}: {export(revision)}")
            except ValueError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
        return 0
    folders = args.versions if args.versions is not None else exported()
    if args.plan:
        for folder in folders:
            print(f"version {folder.name}: {folder / SOURCE}")
        print(f"version {CURRENT}: {kernels.cuda_dir() / SOURCE}")
        shapes = " ".join(f"{B}x{T}" for B, T in args.shapes)
        print(f"shapes: {shapes} at C={args.channels}, head {args.head_size}")
        return 0
    if not torch.cuda.is_available():
        print("bench_wkv7_versions: needs a CUDA device (--plan lists what it would time)", file=sys.stderr)
        return 1
    N = args.head_size
    versions = {CURRENT: Version(kernels.load("v7-chunked", N))}  # the reference for the differences
    failed = {}
    if folders:  # built side by side in worker processes, then loaded here
        with ProcessPoolExecutor(len(folders), mp_context=multiprocessing.get_context("spawn")) as pool:
            problems = list(pool.map(build_problem, folders, [N] * len(folders)))
        for folder, problem in zip(folders, problems):
            if problem:
                failed[folder.name] = problem
                print(f"version {folder.name}: build failed: {problem}", file=sys.stderr)
            else:
                versions[folder.name] = Version(build(folder, N))

    title = (f"Chunked WKV-7 by version, C={args.channels}, head {N}, {torch.cuda.get_device_name()}; median of "
             f"{args.repeats}, ms; difference: the largest relative difference of y and the gradients from "
             f"{CURRENT}'s kernel on the same inputs ((!) above {TOLERANCE:g})")
    lines = [title, "", "| B | T | version | forward | backward | forward + backward | difference |",
             "|---:|---:|---|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for B, T in args.shapes:
        lines += time_shape(B, T, args.channels, N, versions, args.repeats)
        torch.cuda.empty_cache()
    lines += [f"\nversion {name}: build failed: {problem}" for name, problem in failed.items()]
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_wkv7_versions.md").write_text("\n".join(lines) + "\n")
        print(f"written: {args.out / 'bench_wkv7_versions.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
