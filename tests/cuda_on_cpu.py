"""CUDA kernels run on the CPU, for tests on machines without a GPU.

`tests/cuda_cpu/cuda_cpu.h` turns a kernel source into C++ that runs every CUDA thread of a block as a
std::thread (barriers for __syncthreads, the wmma tiles computed exactly); a small driver per kernel
file gives its launches a C interface. `build` compiles one with g++ (a few seconds, cached by the
digest of every source involved) and `Wkv7ChunkedOnCpu` calls the chunked WKV-7 kernel's forward and
backward on CPU tensors with the CUDA op's contract.

`build_program` compiles a driver with a main under one of g++'s sanitizers instead: ThreadSanitizer
sees each CUDA thread's shared-memory accesses and the barriers between them, so a missing barrier is
reported as a data race whatever the timing of the run; AddressSanitizer reports an access outside an
input, an output or the block's shared memory.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
EMULATION = REPO / "tests" / "cuda_cpu"


def compiler_problem() -> str | None:
    """Why the emulation cannot be built here, or None."""
    return None if shutil.which("g++") else "g++ is not installed (apt install g++)"


SANITIZERS = {
    # A data race: two threads touch the same bytes, one of them writing, with no barrier between.
    "thread": ["-fsanitize=thread"],
    # Out-of-bounds or freed memory (global or shared), and undefined behaviour (overflow, bad shifts).
    "address": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"],
}


def _flags(head_size: int) -> list[str]:
    return ["-std=c++20", "-pthread", "-Wall", "-Wno-unknown-pragmas", "-fno-strict-aliasing", "-DWKV_KERNELS_ONLY",
            f"-DHEAD_SIZE={head_size}", f"-I{EMULATION}", "-include", "cuda_cpu.h"]  # fmt: skip


def _compiled(source: Path, flags: list[str], suffix: str) -> Path:
    """g++ flags source -o <cached file>: cached by the digest of the flags and of every file the build
    can include (the emulation's headers and drivers, the kernel sources)."""
    emulation, kernels = sorted(EMULATION.glob("*.[hc]*")), sorted((REPO / "cuda").glob("*.cu*"))
    digest = hashlib.sha256(" ".join(flags).encode())
    for path in (source, *emulation, *kernels):
        digest.update(path.read_bytes())
    cache = Path(tempfile.gettempdir()) / f"rwkv_train_cuda_cpu_{os.getuid()}"
    cache.mkdir(exist_ok=True)
    target = cache / f"{source.stem}_{digest.hexdigest()[:12]}{suffix}"
    if not target.exists():
        partial = target.with_suffix(f".{os.getpid()}.tmp")
        result = subprocess.run(["g++", *flags, str(source), "-o", str(partial)], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            raise RuntimeError(f"building {source.name} for the CPU emulation failed:\n{result.stderr[-4000:]}")
        partial.replace(target)  # atomic: a parallel build never sees half a file
    return target


def build(driver: str, head_size: int) -> ctypes.CDLL:
    """Compile tests/cuda_cpu/<driver> (which includes its kernel from cuda/) for one head size as a
    library; cached."""
    flags = ["-O2", "-fPIC", "-shared", *_flags(head_size)]
    return ctypes.CDLL(str(_compiled(EMULATION / driver, flags, ".so")))


@functools.cache
def sanitizer_problem(sanitizer: str) -> str | None:
    """Why g++ cannot build programs with this sanitizer here, or None."""
    if problem := compiler_problem():
        return problem
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "probe.cpp"
        source.write_text("int main() { return 0; }\n")
        probe = Path(tmp) / "probe"
        built = subprocess.run(["g++", *SANITIZERS[sanitizer], str(source), "-o", str(probe)], capture_output=True,
                               text=True, check=False)  # fmt: skip
        if built.returncode != 0:
            runtime = {"thread": "libtsan2", "address": "libasan8 libubsan1"}[sanitizer]
            return f"g++ cannot link -fsanitize={sanitizer} (apt install {runtime})"
        # ThreadSanitizer refuses to start under some kernels' address-space randomisation
        ran = subprocess.run([str(probe)], capture_output=True, text=True, check=False)
    if ran.returncode != 0:
        return f"a -fsanitize={sanitizer} program does not start here: {(ran.stderr.strip() or '?').splitlines()[0]}"
    return None


def build_program(source: str, head_size: int, sanitizer: str) -> Path:
    """Compile tests/cuda_cpu/<source>, a program with a main, for one head size under a sanitizer of
    SANITIZERS; returns the executable's path (cached)."""
    flags = ["-O1", "-g", *SANITIZERS[sanitizer], *_flags(head_size)]
    return _compiled(EMULATION / source, flags, f"_{sanitizer}")


def _ptr(x: Tensor, aligned: bool = True) -> ctypes.c_void_p:
    """x's data for the kernel; like the bindings, refusing (ValueError) one that does not start 16-byte
    aligned where the kernel moves it 16 bytes at a time (the emulation itself would abort there)."""
    assert x.device.type == "cpu" and x.is_contiguous()
    if aligned and x.data_ptr() % 16:
        raise ValueError("a tensor must start 16-byte aligned (a fresh tensor or .clone() is)")
    return ctypes.c_void_p(x.data_ptr())


def _nan(shape, dtype) -> Tensor:
    """Outputs start as NaN, so an element the kernel never writes shows up in the comparison."""
    return torch.full(shape, float("nan"), dtype=dtype)


class Wkv7ChunkedModule:
    """The compiled extension's interface (`forward` and `backward` writing into the outputs they are
    given), on the CPU emulation: what `kernels.load("v7-chunked", N)` returns on a GPU."""

    def __init__(self, head_size: int):
        self.lib = build("wkv7_chunked.cpp", head_size)
        self.lib.log_decay_min.restype = ctypes.c_float
        self.head_size = self.lib.head_size()
        self.chunk_len = self.lib.chunk_len()
        self.log_decay_min = self.lib.log_decay_min()
        self.splits = [split for split in (1, 2, 4) if self.lib.valid_split(split)]  # as the binding lists them

        self.saved = ["states", "sa"]

    def forward(self, r, lw, k, v, a, b, s0, y, s_final, states, sa, split) -> None:
        B, T, H, _ = r.shape
        if not self.lib.forward(split, B, T, H, *map(_ptr, (r, lw, k, v, a, b, s0, y, s_final, states, sa))):
            raise ValueError(f"wkv7_chunked: split {split} is not one of {self.splits}")

    def backward(self, r, lw, k, v, a, b, states, sa, dy, ds_final, dr, dlw, dk, dv, da, db, ds0, split) -> None:
        B, T, H, _ = r.shape
        pointers = map(_ptr, (r, lw, k, v, a, b, states, sa, dy, ds_final, dr, dlw, dk, dv, da, db, ds0))
        if not self.lib.backward(split, B, T, H, *pointers):
            raise ValueError(f"wkv7_chunked: split {split} is not one of {self.splits}")


class Wkv7ChunkedOnCpu(Wkv7ChunkedModule):
    """cuda/wkv7_chunked.cu on the CPU, allocating its outputs (NaN first): the CUDA op's contract."""

    def forward(self, r, lw, k, v, a, b, s0, split: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """bf16 r, k, v, a, b and float32 lw [B, T, H, N], float32 s0 -> (y bf16, final state, chunk states bf16,
        sa bf16); split: blocks per head."""
        B, T, H, N = r.shape
        y, s_final, sa = _nan(r.shape, torch.bfloat16), _nan(s0.shape, torch.float32), _nan(r.shape, torch.bfloat16)
        states = _nan((B, H, -(-T // self.chunk_len), N, N), torch.bfloat16)
        super().forward(r, lw, k, v, a, b, s0, y, s_final, states, sa, split)
        return y, s_final, states, sa

    def backward(self, r, lw, k, v, a, b, states, sa, dy, ds_final, split: int = 1) -> tuple[Tensor, ...]:
        """-> (dr, dlw, dk, dv, da, db, ds0): bf16 except dlw and ds0 (float32)."""
        grads = [_nan(r.shape, torch.float32 if name == "dlw" else torch.bfloat16) for name in ("dr", "dlw", "dk", "dv", "da", "db")]
        ds0 = _nan(ds_final.shape, torch.float32)
        super().backward(r, lw, k, v, a, b, states, sa, dy, ds_final, *grads, ds0, split)
        return (*grads, ds0)


class WkvDiagChunkedModule:
    """The compiled extension's interface for cuda/wkv_diag_chunked.cu (`forward` and `backward` writing
    into the outputs they are given), on the CPU emulation: what `kernels.load("v6-chunked", N)` returns
    on a GPU."""

    def __init__(self, head_size: int):
        self.lib = build("wkv_diag_chunked.cpp", head_size)
        self.lib.log_decay_min.restype = ctypes.c_float
        self.head_size = self.lib.head_size()
        self.chunk_len = self.lib.chunk_len()
        self.log_decay_min = self.lib.log_decay_min()
        self.splits = [split for split in (1, 2, 4) if self.lib.valid_split(split)]  # as the binding lists them
        self.saved = ["states"]

    def forward(self, r, lw, k, v, u, s0, y, s_final, states, split) -> None:
        B, T, H, _ = r.shape
        pointers = (_ptr(k), _ptr(v), _ptr(u, aligned=False), *map(_ptr, (s0, y, s_final, states)))
        if not self.lib.forward(split, B, T, H, _ptr(r), _ptr(lw), int(lw.dim() == 4), *pointers):
            raise ValueError(f"wkv_diag_chunked: split {split} is not one of {self.splits}")

    def backward(self, r, lw, k, v, u, states, dy, ds_final, dr, dlw, dk, dv, du, ds0, split) -> None:
        B, T, H, _ = r.shape
        pointers = (*map(_ptr, (k, v)), _ptr(u, aligned=False), *map(_ptr, (states, dy, ds_final, dr, dlw, dk, dv)),
                    _ptr(du, aligned=False), _ptr(ds0))
        if not self.lib.backward(split, B, T, H, _ptr(r), _ptr(lw), int(lw.dim() == 4), *pointers):
            raise ValueError(f"wkv_diag_chunked: split {split} is not one of {self.splits}")


class WkvDiagChunkedOnCpu(WkvDiagChunkedModule):
    """cuda/wkv_diag_chunked.cu on the CPU, allocating its outputs (NaN first): the CUDA op's contract."""

    def forward(self, r, lw, k, v, u, s0, split: int = 1) -> tuple[Tensor, Tensor, Tensor]:
        """bf16 r, k, v [B, T, H, N], float32 lw ([B, T, H, N] or [H, N]), u [H, N] and s0 -> (y bf16, final
        state, chunk states bf16); split: blocks per head."""
        B, T, H, N = r.shape
        y, s_final = _nan(r.shape, torch.bfloat16), _nan(s0.shape, torch.float32)
        states = _nan((B, H, -(-T // self.chunk_len), N, N), torch.bfloat16)
        super().forward(r, lw, k, v, u, s0, y, s_final, states, split)
        return y, s_final, states

    def backward(self, r, lw, k, v, u, states, dy, ds_final, split: int = 1) -> tuple[Tensor, ...]:
        """-> (dr, dlw per step [B, T, H, N], dk, dv, du per (batch, head) [B, H, N], ds0)."""
        B, _, H, N = r.shape
        dr, dk, dv = (_nan(r.shape, torch.bfloat16) for _ in range(3))
        dlw, du, ds0 = _nan(r.shape, torch.float32), _nan((B, H, N), torch.float32), _nan(ds_final.shape, torch.float32)
        super().backward(r, lw, k, v, u, states, dy, ds_final, dr, dlw, dk, dv, du, ds0, split)
        return dr, dlw, dk, dv, du, ds0

def emulate(monkeypatch, generation: str, module_class) -> list[tuple[str, int | None]]:
    """Points kernels.load(generation, N) at module_class(N), the CPU emulation (one per head size);
    returns the list of (generation, head size) it is asked for, filled as the test runs."""
    from rwkv_train.ops import kernels

    modules: dict[int | None, object] = {}
    asked: list[tuple[str, int | None]] = []

    def load(wanted: str, head_size: int | None = None):
        asked.append((wanted, head_size))
        assert wanted == generation, f"only the {generation} kernel is emulated here, not {wanted}"
        if head_size not in modules:
            modules[head_size] = module_class(head_size)
        return modules[head_size]

    monkeypatch.setattr(kernels, "load", load)
    return asked


def assert_splits_match_one_block(kernel, inputs: list[Tensor], grad_names: tuple[str, ...]) -> None:
    """kernel (an ...OnCpu emulation) at each of its splits against one block per head, from a random state
    and with random dy and final-state gradient: the forward's y, final state and what it saves for the
    backward bitwise equal (each block's values evolve on their own), the backward's gradients within
    float32 rounding (its sums across the cluster only change order)."""
    from tests.conftest import rel_error

    B, T, H, N = inputs[0].shape
    g = torch.Generator().manual_seed(32)
    s0 = 0.5 * torch.randn(B, H, N, N, generator=g)
    dy, ds_final = torch.randn(B, T, H, N, generator=g).to(torch.bfloat16), torch.randn(B, H, N, N, generator=g)
    one = kernel.forward(*inputs, s0, split=1)
    one_grads = kernel.backward(*inputs, *one[2:], dy, ds_final, split=1)
    names = ("y", "final state", *(f"saved {name}" for name in kernel.saved))
    for split in kernel.splits[1:]:
        for name, x, ref in zip(names, kernel.forward(*inputs, s0, split=split), one, strict=True):
            assert torch.equal(x, ref), f"split {split}: {name} differs from one block per head"
        grads = kernel.backward(*inputs, *one[2:], dy, ds_final, split=split)
        for name, x, ref in zip(grad_names, grads, one_grads):
            assert rel_error(x, ref) < 1e-5, f"split {split}: {name} {rel_error(x, ref):.1e} from one block per head"


def assert_unsupported_splits_refused(kernel, inputs: list[Tensor]) -> None:
    """Splits the kernel was not built for (0, 3, 8, and 4 at head size 32 or 5) are refused, launching nothing."""
    B, _, H, N = inputs[0].shape
    s0 = torch.zeros(B, H, N, N)
    for split in (0, 3, 8, 4 if N == 32 else 5):
        with pytest.raises(ValueError, match=f"split {split} is not one of"):
            kernel.forward(*inputs, s0, split=split)


def unaligned(x: Tensor) -> Tensor:
    """x's values in a contiguous view that starts one element into a buffer: not 16-byte aligned."""
    view = x.new_empty(x.numel() + 1)[1:].view_as(x).copy_(x)
    assert view.data_ptr() % 16 != 0 and view.is_contiguous()
    return view


def assert_unaligned_views_change_nothing(forward_op, backward_op, inputs: list[Tensor]) -> None:
    """The chunked kernels move inputs, outputs and states 16 bytes at a time: through the custom ops,
    contiguous views starting one element into a buffer (every input, the initial state, and dy in the
    backward) give exactly what aligned tensors give (the ops copy them to aligned ones first; on the GPU
    a misaligned access would kill the context, and the emulation refuses it)."""
    B, T, H, N = inputs[0].shape
    g = torch.Generator().manual_seed(52)
    s0 = 0.5 * torch.randn(B, H, N, N, generator=g)
    dy, ds = torch.randn(B, T, H, N, generator=g).to(torch.bfloat16), torch.randn(B, H, N, N, generator=g)

    def run(xs, s, d):
        y, s_final, *saved = forward_op(*xs, s, 0)
        return y, s_final, *saved, *backward_op(*xs, *saved, d, ds, 0)

    want = run(inputs, s0, dy)
    got = run([unaligned(x) for x in inputs], unaligned(s0), unaligned(dy))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
