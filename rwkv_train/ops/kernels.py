"""Loading the CUDA WKV kernels in `cuda/`: JIT-built on first use, cached per compile-time parameters.

Each generation's kernel is one source file in the repository's `cuda/` folder, built with
`torch.utils.cpp_extension.load` by absolute path the first time an op needs it (never at import and
never in a module's constructor). The build is cached per (generation, head size): the head size is
the only compile-time parameter; nothing about the sequence length is baked in. The module name
carries a digest of the source and flags, so an edited kernel is rebuilt rather than a stale one loaded.

Builds are serialised across processes (DDP ranks, parallel test workers) with an advisory `flock`
that the kernel releases when its holder dies. torch's own build lock is a plain file that an
interrupted build leaves behind, which makes every later build wait forever; holding our `flock`
proves no build is running, so such a file is reported as stale and removed.

`unavailable_reason` says why a kernel cannot be used here (no CUDA device, no compiler, a head size
with no kernel); the `auto` backend then falls back to the pure-PyTorch reference.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import torch

from rwkv_train.errors import UserError

__all__ = [
    "HEAD_SIZES",
    "KERNEL_CHOICES",
    "SOURCES",
    "KernelUnavailable",
    "aligned",
    "build_dir",
    "cuda_dir",
    "head_sizes",
    "load",
    "median_cuda_ms",
    "module_name",
    "new_output",
    "nvcc_flags",
    "poisoned_outputs",
    "unavailable_reason",
    "use_cuda",
]

log = logging.getLogger("rwkv_train")

# kernel -> source file in cuda/; v5 and v6 share one diagonal-decay kernel. "v7-chunked" is the
# tensor-core WKV-7 kernel (16-step chunks), beside the sequential "v7"; "v6-chunked" the tensor-core
# diagonal-decay kernel (RWKV-5 and RWKV-6), beside the sequential "v5" / "v6".
SOURCES = {"v4": "wkv4.cu", "v5": "wkv_diag.cu", "v6": "wkv_diag.cu", "v7": "wkv7.cu", "v7-chunked": "wkv7_chunked.cu",
           "v6-chunked": "wkv_diag_chunked.cu"}
HEAD_SIZES = (32, 64, 128)  # head sizes the v5-v7 kernels are compiled for
_HEAD_SIZES = {"v4": (None,), "v7-chunked": (32, 64), "v6-chunked": (32, 64)}  # where a kernel differs from HEAD_SIZES
KERNEL_CHOICES = ("auto", "cuda", "torch")


class KernelUnavailable(UserError):
    """The CUDA kernel was asked for explicitly and cannot be built or run here."""


def cuda_dir() -> Path:
    """The absolute path of the kernel sources (the repository's `cuda/` folder)."""
    return Path(__file__).resolve().parents[2] / "cuda"


def head_sizes(generation: str) -> tuple[int | None, ...]:
    """The head sizes a kernel is built for; (None,) for v4, which has no heads."""
    return _HEAD_SIZES.get(generation, HEAD_SIZES)


def _source_key(generation: str) -> str:
    """The kernel family a generation uses: v5 and v6 share one build per head size."""
    return Path(SOURCES[generation]).stem


def nvcc_flags(generation: str, head_size: int | None = None) -> list[str]:
    """The nvcc flags of one build, without the target architecture (torch picks the device's)."""
    flags = ["-O3", "--use_fast_math", "-Xptxas=-O3", "-lineinfo"]
    # torch's headers switch off the half/bf16 operators by default; the kernels use the conversions.
    flags += ["-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
    if generation != "v4":
        flags.append(f"-DHEAD_SIZE={_check_head_size(generation, head_size)}")
    return flags


def _check_head_size(generation: str, head_size: int | None) -> int:
    if head_size not in head_sizes(generation):
        raise KernelUnavailable(
            f"no {generation} CUDA kernel for head size {head_size}: kernels exist for head sizes "
            f"{', '.join(map(str, head_sizes(generation)))}; set model.kernel=torch to use the PyTorch backend"
        )
    return head_size


def cuda_tool(name: str) -> str | None:
    """A CUDA toolkit program (compute-sanitizer, ...): on PATH, else in the toolkit torch builds with."""
    from torch.utils.cpp_extension import CUDA_HOME

    beside_nvcc = Path(CUDA_HOME) / "bin" / name if CUDA_HOME else None
    return shutil.which(name) or (str(beside_nvcc) if beside_nvcc and beside_nvcc.is_file() else None)


def _compiler_problem() -> str | None:
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home is None or not (Path(home) / "bin" / "nvcc").exists() and shutil.which("nvcc") is None:
        return "no CUDA compiler (nvcc) found: install the CUDA toolkit or set CUDA_HOME"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (torch builds extensions with it): pip install ninja"
    return None


def unavailable_reason(generation: str, head_size: int | None = None) -> str | None:
    """Why the CUDA kernel of this generation cannot be used here, or None if it can."""
    if generation not in SOURCES:
        return f"unknown generation {generation!r}"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    if generation != "v4" and head_size not in head_sizes(generation):
        return f"no {generation} kernel for head size {head_size} (kernels: {', '.join(map(str, head_sizes(generation)))})"
    if (generation, head_size) in _failed:
        return _failed[(generation, head_size)]
    if not (cuda_dir() / SOURCES[generation]).is_file():
        return f"kernel source {cuda_dir() / SOURCES[generation]} is missing (the cuda/ folder ships with the repository)"
    return _compiler_problem()


def build_dir() -> Path:
    """Where builds go: torch's extension cache (TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory("rwkv_train_kernels", verbose=False))


def module_name(generation: str, head_size: int | None, sources: Path | None = None) -> str:
    """The extension's name: kernel, head size and a digest of its source, the headers beside it and the
    flags. `sources`: another folder of kernel sources than cuda_dir() (an earlier version of them)."""
    folder = cuda_dir() if sources is None else sources
    digest = hashlib.sha256((folder / SOURCES[generation]).read_bytes())
    for header in sorted(folder.glob("*.cuh")):
        digest.update(header.read_bytes())
    digest.update(" ".join(nvcc_flags(generation, head_size)).encode())
    suffix = "" if generation == "v4" else f"_h{head_size}"
    return f"rwkv_train_{_source_key(generation)}{suffix}_{digest.hexdigest()[:12]}"


@contextlib.contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """Exclusive across processes; released by the kernel if the holder dies, so it never goes stale."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "rwkv_train.flock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _clear_stale_torch_lock(directory: Path) -> None:
    """Called while holding our lock: no build of ours runs, so a torch `lock` file here is stale."""
    stale = directory / "lock"
    if stale.exists():
        age = time.time() - stale.stat().st_mtime
        log.warning(
            "kernels: removing the stale build lock %s (%.0f s old, left by an interrupted build; "
            "without this the build would wait forever)",
            stale,
            age,
        )
        stale.unlink(missing_ok=True)


_loaded: dict[tuple[str, int | None], ModuleType] = {}
_failed: dict[tuple[str, int | None], str] = {}
_warned: set[tuple[str, int | None]] = set()


def load(generation: str, head_size: int | None = None) -> ModuleType:
    """The compiled kernel module of a generation (and head size for v5-v7), building it on first use.

    Raises KernelUnavailable, naming the problem and the fix, when it cannot be built or run here.
    """
    key = (generation, None if generation == "v4" else head_size)
    if key in _loaded:
        return _loaded[key]
    reason = unavailable_reason(*key)
    if reason is not None:
        raise KernelUnavailable(f"the {generation} CUDA kernel cannot be used: {reason}; set model.kernel=torch (or auto)")
    from torch.utils import cpp_extension

    name = module_name(*key)
    directory = build_dir() / name
    started = time.time()
    with _build_lock(directory):
        _clear_stale_torch_lock(directory)
        fresh = not any(directory.glob("*.so"))
        if fresh:
            log.info("kernels: building %s (once; cached in %s)", name, directory)
        try:
            module = cpp_extension.load(
                name=name,
                sources=[str(cuda_dir() / SOURCES[generation])],
                extra_cuda_cflags=nvcc_flags(*key),
                extra_include_paths=[str(cuda_dir())],
                build_directory=str(directory),
                verbose=False,
            )
        except Exception as exc:  # a compiler error: remember it, so `auto` does not retry every call
            message = f"building {name} failed ({type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc})"
            _failed[key] = message
            raise KernelUnavailable(f"the {generation} CUDA kernel cannot be used: {message}; set model.kernel=torch") from exc
    if fresh:
        log.info("kernels: %s ready after %.1f s", name, time.time() - started)
    _loaded[key] = module
    return module


def use_cuda(kernel: str, generation: str, x: torch.Tensor, head_size: int | None = None) -> bool:
    """Whether an op called with backend `kernel` on tensor x runs the CUDA kernel.

    "cuda" insists (an error naming the reason when it cannot), "torch" never, "auto" when x is on a
    CUDA device and the kernel can be built (otherwise the PyTorch backend, with one log line).
    """
    if kernel == "torch":
        return False
    if kernel == "cuda":
        if not x.is_cuda:
            raise KernelUnavailable(
                f"model.kernel=cuda, but the {generation} WKV inputs are on {x.device}: "
                "train on a CUDA device or set model.kernel=torch (or auto)"
            )
        load(generation, head_size)
        return True
    if kernel != "auto":
        raise ValueError(f"unknown kernel {kernel!r}; valid choices: {', '.join(KERNEL_CHOICES)}")
    if not x.is_cuda:
        return False
    key = (generation, None if generation == "v4" else head_size)
    if key in _loaded:
        return True
    reason = unavailable_reason(*key)
    if reason is None:
        try:
            load(*key)
            return True
        except KernelUnavailable as exc:
            reason = str(exc)
    if key not in _warned:
        _warned.add(key)
        log.warning("kernels: using the PyTorch %s backend: %s", generation, reason)
    return False


_poison = False


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Fill every kernel output with NaN before the kernel runs (tests: proves each element is written)."""
    global _poison
    before, _poison = _poison, True
    try:
        yield
    finally:
        _poison = before


def aligned(x: torch.Tensor) -> torch.Tensor:
    """x, or a copy where it does not start 16-byte aligned: the chunked kernels move their inputs, outputs
    and states 16 bytes at a time (a contiguous view can start anywhere, e.g. a slice of a flat buffer)."""
    return x if x.data_ptr() % 16 == 0 else x.clone()


def new_output(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """How the op wrappers allocate kernel outputs: uninitialised, or NaN under `poisoned_outputs()`."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poison:
        out.fill_(float("nan"))
    return out


def median_cuda_ms(fn: Callable[[], object], repeats: int, warmup: int = 0) -> float:
    """The median GPU time of `fn` over `repeats` runs (CUDA events around each, synchronised), after
    `warmup` untimed runs: what the benchmark scripts report."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
