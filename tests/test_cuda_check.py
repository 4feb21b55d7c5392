"""scripts/cuda_check.py: its ptxas report parser, its skip without nvcc, and (with nvcc) a compile of every kernel."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from rwkv_train.ops import kernels
from tests.conftest import REPO, run_cli

SCRIPT = REPO / "scripts" / "cuda_check.py"

# What `nvcc -Xptxas -v` (CUDA 13) prints for a noinline device function and two kernels.
PTXAS_REPORT = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z2k2Pf' for 'sm_90'
ptxas info    : Function properties for _Z2k2Pf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, used 0 barriers
ptxas info    : Compile time = 18.623 ms
ptxas info    : Function properties for _Z6helperf
    16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function '_Z4kernILi64EEvPKfPfi' for 'sm_90'
ptxas info    : Function properties for _Z4kernILi64EEvPKfPfi
    256 bytes stack frame, 24 bytes spill stores, 32 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 256 bytes cumulative stack size, 8704 bytes smem
ptxas info    : Compile time = 71.615 ms
"""


def load_script():
    """The script as a module (registered first: its dataclasses look their module up by name)."""
    if "cuda_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("cuda_check", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["cuda_check"] = module
        spec.loader.exec_module(module)
    return sys.modules["cuda_check"]


def test_parse_ptxas_reads_each_kernel_and_skips_device_functions():
    usage = {k.name: k for k in load_script().parse_ptxas(PTXAS_REPORT)}
    assert list(usage) == ["_Z2k2Pf", "_Z4kernILi64EEvPKfPfi"]
    small, big = usage["_Z2k2Pf"], usage["_Z4kernILi64EEvPKfPfi"]
    assert (small.registers, small.stack, small.smem, small.spills) == (8, 0, 0, False)
    assert (big.registers, big.stack, big.spill_stores, big.spill_loads, big.smem) == (255, 256, 24, 32, 8704)
    assert big.spills


# `cuobjdump -sass` (CUDA 13) for two kernels, abridged: predicated instructions, and the encoding lines
# that follow each instruction.
SASS = """\
\t\tFunction : _Z2k2Pf
\t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                       /* 0x00000a00ff017b82 */
                                                                                /* 0x000ff00000000800 */
        /*0010*/                   LDG.E R2, desc[UR4][R2.64] ;                 /* 0x0000000402027981 */
        /*0020*/                   FFMA R0, R2, R2, R0 ;                        /* 0x0000000202007223 */
        /*0030*/               @P0 STG.E desc[UR4][R4.64], R0 ;                 /* 0x0000000004000986 */
        /*0040*/                   EXIT ;                                       /* 0x000000000000794d */
\t\t..........

\t\tFunction : _Z4kernILi64EEvPKfPfi
        /*0000*/              @!P1 FFMA R3, R4, R5, R3 ;                        /* 0x0000000504039223 */
        /*0010*/                   FFMA R6, R4, R5, R6 ;                        /* 0x0000000504067223 */
        /*0020*/                   LDG.E.128 R8, desc[UR4][R2.64] ;             /* 0x0000000402087981 */
        /*0030*/              @!PT BRA 0x30 ;                                   /* 0xfffffffc00007947 */
"""


def test_sass_counts_every_instruction_of_each_kernel_once():
    counts = load_script().sass_counts(SASS)
    assert list(counts) == ["_Z2k2Pf", "_Z4kernILi64EEvPKfPfi"]
    small, big = counts["_Z2k2Pf"], counts["_Z4kernILi64EEvPKfPfi"]
    assert (small.instructions, small.ffma, small.global_loads, small.global_stores) == (5, 1, 1, 1)
    assert (big.instructions, big.ffma, big.global_loads, big.global_stores) == (4, 2, 1, 0)


def test_short_name_drops_return_type_and_parameters():
    short = load_script().short_name
    assert short("void kern<64>(float const*, float*, int)") == "kern<64>"
    templated = "void wkv::forward_kernel<(wkv::Pass)1, 4>(int, int, float const*)"
    assert short(templated) == "wkv::forward_kernel<(wkv::Pass)1, 4>"
    assert short("(anonymous namespace)::wkv4_forward_kernel(int, int, float const*)") == "wkv4_forward_kernel"
    assert short("k2") == "k2"


# Two kernels of a PTX module: the first moves one fragment through a generic address (besides a
# shared load, a shared store and a predicated shared load), the second only through shared ones.
PTX = """\
.visible .entry _Z5firstPf(
\t.param .u64 _Z5firstPf_param_0
)
{
\twmma.load.a.sync.aligned.row.m16n16k16.shared.bf16 \t{%r1, %r2, %r3, %r4}, [%r5], %r6;
\twmma.load.b.sync.aligned.col.m16n16k16.bf16 \t{%r7, %r8, %r9, %r10}, [%rd1], %r6;
\twmma.mma.sync.aligned.row.col.m16n16k16.f32.bf16.bf16.f32 \t{%f1}, {%r1}, {%r7}, {%f1};
\twmma.store.d.sync.aligned.row.m16n16k16.shared.f32 \t[%r11], {%f1}, %r12;
\t@%p1 wmma.load.c.sync.aligned.row.m16n16k16.shared.f32 \t{%f1}, [%r11], %r12;
}
.entry _Z6secondv(
)
{
\t@!%p2 wmma.load.a.sync.aligned.col.m16n16k16.global.bf16 \t{%r1, %r2, %r3, %r4}, [%rd2], %r6;
}
"""


def test_generic_mma_accesses_counts_fragment_moves_without_a_state_space_per_kernel():
    assert load_script().generic_mma_accesses(PTX) == {"_Z5firstPf": 1, "_Z6secondv": 0}


def test_every_generation_and_head_size_is_planned():
    planned = {(b.source, b.head_size) for b in load_script().planned_builds()}
    expected = {(src, h) for g, src in kernels.SOURCES.items() for h in kernels.head_sizes(g)}
    assert planned == expected


def test_without_nvcc_it_says_so_and_succeeds(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    env["PATH"] = str(tmp_path)  # an empty folder: no nvcc on it
    proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "cuda-check: nvcc not found; skipped (install the CUDA toolkit to compile the kernels)" in proc.stdout


@pytest.mark.skipif(load_script().find_nvcc() is None, reason="nvcc not found (on PATH or in $CUDA_HOME/bin)")
def test_every_kernel_compiles_for_sm90():
    """Every source x head size, the kernels alone (about 30 s on a 2-core machine)."""
    proc = run_cli("scripts/cuda_check.py", timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = {tuple(line.split()[:2]) for line in proc.stdout.splitlines() if line.split()}
    sources = set(kernels.SOURCES.values())
    kernel_rows = [line.replace("<- SPILLS", "").split() for line in proc.stdout.splitlines()]
    kernel_rows = [cells for cells in kernel_rows if cells and cells[0] in sources]
    assert kernel_rows, proc.stdout
    # Every tensor-core fragment comes from shared memory by its own state space (LDSM), none through
    # generic addresses; "?" would mean nvcc kept no PTX to count.
    assert all(cells[-1] == "0" for cells in kernel_rows), proc.stdout
    # With cuobjdump, every kernel's static SASS is counted (instructions, FFMA, LDG/STG before the last column).
    if load_script().find_cuobjdump(load_script().find_nvcc()) is not None:
        assert all(cells[-4].isdigit() and int(cells[-4]) > 0 for cells in kernel_rows), proc.stdout
        assert all(cells[-2].count("/") == 1 for cells in kernel_rows), proc.stdout
    for generation, source in kernels.SOURCES.items():
        for head_size in kernels.head_sizes(generation):
            assert (source, "-" if head_size is None else str(head_size)) in rows, (
                f"no row for {source} head size {head_size}:\n{proc.stdout}"
            )
