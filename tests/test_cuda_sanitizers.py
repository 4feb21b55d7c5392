"""The chunked WKV kernels' CUDA sources under g++'s sanitizers, on the CPU emulation (tests/cuda_cpu).

ThreadSanitizer watches every shared-memory access of every emulated CUDA thread and the barriers
(__syncthreads and cluster barriers) that order them: two threads touching the same
bytes, one writing, with no barrier between is reported even when the run's timing happened to give
the right value. That is the hazard a GPU hides until a different schedule shows it, and what
compute-sanitizer's racecheck looks for there. AddressSanitizer reports any access outside an input,
an output or the block's dynamic shared memory (the emulation allocates exactly the bytes the launch
asks for), and UndefinedBehaviorSanitizer integer overflow and bad shifts in the index arithmetic.

First the sanitizers are shown to catch each hazard in a small kernel (tests/cuda_cpu/hazards.cpp)
and to pass its correct form; then the kernel runs forward and backward under each, for both head
sizes and every split (tests/cuda_cpu/wkv7_chunked_sanitized.cpp), and so does the chunked RWKV-5/6
kernel (tests/cuda_cpu/wkv_diag_chunked_sanitized.cpp).
"""

from __future__ import annotations

import subprocess

import pytest

from rwkv_train.ops.wkv7_chunked_cuda import CHUNK_LEN
from tests import cuda_on_cpu

SANITIZER_EXIT = {"thread": 66, "address": 1}  # what the program exits with when the sanitizer reports
REPORT = {"thread": "WARNING: ThreadSanitizer: data race", "address": "ERROR: AddressSanitizer"}
HAZARD = {"thread": ("race", "synced"), "address": ("overrun", "inside")}  # hazards.cpp's cases: (hazard, its fix)


def usable(sanitizer: str):
    problem = cuda_on_cpu.sanitizer_problem(sanitizer)
    return pytest.param(sanitizer, marks=pytest.mark.skipif(problem is not None, reason=str(problem)), id=sanitizer)


SANITIZERS = [usable("thread"), usable("address")]


def run(program, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(program), *args], capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.parametrize("sanitizer", SANITIZERS)
def test_the_sanitizer_reports_the_hazard_and_passes_its_fix(sanitizer):
    hazard, correct = HAZARD[sanitizer]
    program = cuda_on_cpu.build_program("hazards.cpp", 64, sanitizer)
    bad, good = run(program, hazard), run(program, correct)
    assert bad.returncode == SANITIZER_EXIT[sanitizer] and REPORT[sanitizer] in bad.stderr, bad.stderr[-2000:]
    assert good.returncode == 0 and "Sanitizer" not in good.stderr, good.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("head_size", [32, 64], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("sanitizer", SANITIZERS)
def test_chunked_kernel_is_clean_under_the_sanitizer(sanitizer, head_size):
    program = cuda_on_cpu.build_program("wkv7_chunked_sanitized.cpp", head_size, sanitizer)
    result = run(program)
    assert result.returncode == 0 and "Sanitizer" not in result.stderr, result.stderr[-6000:]
    splits = cuda_on_cpu.Wkv7ChunkedModule(head_size).splits  # the kernel's valid_split, as the program loops
    assert splits[-1] > 1, "a split head (a cluster) is among the runs"
    for split in splits:  # every launch ran: a padded T without a state and a whole chunk with one
        assert f"N {head_size} split {split} T {2 * CHUNK_LEN + 5} state 0: ran" in result.stdout
        assert f"N {head_size} split {split} T {CHUNK_LEN} state 1: ran" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("head_size", [32, 64], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("sanitizer", SANITIZERS)
def test_chunked_diagonal_kernel_is_clean_under_the_sanitizer(sanitizer, head_size):
    program = cuda_on_cpu.build_program("wkv_diag_chunked_sanitized.cpp", head_size, sanitizer)
    result = run(program)
    assert result.returncode == 0 and "Sanitizer" not in result.stderr, result.stderr[-6000:]
    splits = cuda_on_cpu.WkvDiagChunkedModule(head_size).splits
    assert splits[-1] > 1, "a split head (a cluster) is among the runs"
    for split in splits:  # every launch ran
        for T, state in ((2 * CHUNK_LEN + 5, 0), (CHUNK_LEN, 1)):
            for per_step in (1, 0):
                assert f"N {head_size} split {split} T {T} state {state} per-step lw {per_step}: ran" in result.stdout
