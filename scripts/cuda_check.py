"""Compile every CUDA kernel for sm_90 and tabulate its resources: registers, spills, stack, shared memory.

    python scripts/cuda_check.py
    python scripts/cuda_check.py --jobs 4 --fail-on-spill
    python scripts/cuda_check.py --source wkv7.cu      # one kernel source, every head size

A compile-only check (nvcc, no GPU needed): each source in cuda/ is compiled (-c, nothing linked) once
per head size it is built for, with the flags `rwkv_train.ops.kernels` builds it with at run time
(the kernels alone, -DWKV_KERNELS_ONLY; --with-binding adds the torch binding and torch's headers,
minutes per build), and ptxas's resource report (-Xptxas -v) is printed as one table, one row per
kernel. Exits 1 if any build fails. Register spills are flagged: the recurrent kernels keep their
state in registers, and spilling it to local memory costs a round trip on every step. The shared
memory column is the static allocation ptxas sees (dynamic shared memory is sized at launch).
The "generic mma" column counts the kernel's tensor-core fragment loads and stores (wmma.load,
wmma.store in the PTX nvcc keeps) that name no state space: from shared memory, ptxas turns a generic
one into per-lane loads (LD, and MOVM for a transposed layout) where a .shared one is one LDSM.
Where cuobjdump is found (beside nvcc, on PATH, or from `pip install nvidia-cuda-cuobjdump`), each
kernel's static SASS is counted too: its instructions, its FFMA (the float32 multiply-adds that the
recurrences run on CUDA cores) and its global loads and stores (LDG / STG), every instruction of the
kernel once, loops or not; without it those columns show "-".
Without nvcc (on PATH or in $CUDA_HOME/bin) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

try:
    import rwkv_train  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rwkv_train.ops import kernels

SKIP_MESSAGE = "cuda-check: nvcc not found; skipped (install the CUDA toolkit to compile the kernels)"
COLUMNS = ("source", "head", "generations", "kernel", "registers", "spill st", "spill ld", "stack", "smem",
           "instr", "FFMA", "LDG/STG", "generic mma")


@dataclass
class Build:
    """One compilation: a source file with one set of flags (one head size), used by these generations."""

    source: str
    head_size: int | None
    generations: list[str]
    flags: list[str]

    @property
    def label(self) -> str:
        return self.source if self.head_size is None else f"{self.source} (head size {self.head_size})"


@dataclass
class SassCounts:
    """One kernel's static SASS: every instruction once, however often it runs."""

    instructions: int = 0
    ffma: int = 0
    global_loads: int = 0
    global_stores: int = 0


@dataclass
class KernelUsage:
    """ptxas's report for one kernel (entry function); sizes in bytes."""

    name: str
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    smem: int = 0
    generic_mma: int | None = None  # wmma fragment moves through generic addresses (see the module docstring)
    sass: SassCounts | None = None  # None: no cuobjdump

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


@dataclass
class BuildResult:
    build: Build
    ok: bool
    seconds: float
    kernels: list[KernelUsage] = field(default_factory=list)
    log: str = ""


def find_nvcc() -> str | None:
    """nvcc on PATH, else $CUDA_HOME/bin/nvcc (or $CUDA_PATH), else None."""
    found = shutil.which("nvcc")
    if found:
        return found
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


def find_cuobjdump(nvcc: str) -> str | None:
    """cuobjdump beside nvcc, else on PATH, else from the nvidia-cuda-cuobjdump wheel (nvidia/cu*/bin), else None."""
    beside = Path(os.path.realpath(nvcc)).parent / "cuobjdump"
    if beside.is_file():
        return str(beside)
    found = shutil.which("cuobjdump")
    if found:
        return found
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for path in sorted(Path(root).glob("*/bin/cuobjdump")):
            return str(path)
    return None


_SASS_FUNCTION = re.compile(r"^\s*Function : (\S+)\s*$", re.M)
_SASS_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)", re.M)


def sass_counts(sass: str) -> dict[str, SassCounts]:
    """Per kernel (mangled name) in `cuobjdump -sass` output: its instructions, FFMA, LDG and STG."""
    counts = {}
    parts = _SASS_FUNCTION.split(sass)
    for name, body in zip(parts[1::2], parts[2::2]):
        opcodes = _SASS_INSTRUCTION.findall(body)
        counts[name] = SassCounts(len(opcodes), opcodes.count("FFMA"), opcodes.count("LDG"), opcodes.count("STG"))
    return counts


def planned_builds() -> list[Build]:
    """Every (source, head size) the loader can build. v5 and v6 share a source and, flags alike, one build."""
    builds: dict[tuple[str, tuple[str, ...]], Build] = {}
    for generation, source in kernels.SOURCES.items():
        for head_size in kernels.head_sizes(generation):
            flags = kernels.nvcc_flags(generation, head_size)
            key = (source, tuple(flags))
            if key in builds:
                builds[key].generations.append(generation)
            else:
                builds[key] = Build(source, head_size, [generation], flags)
    return list(builds.values())


# A CUDA build of torch generates this header; a CPU-only wheel ships c10/cuda without it. Its one
# definition only selects symbol export on Windows, so a stand-in changes nothing a compile checks.
GENERATED_HEADER = "c10/cuda/impl/cuda_cmake_macros.h"
GENERATED_HEADER_TEXT = "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"


def torch_includes(workdir: Path) -> list[str]:
    """torch's header folders, plus a folder with the generated header when torch is a CPU-only build."""
    from torch.utils import cpp_extension

    paths = cpp_extension.include_paths()
    if not any((Path(p) / GENERATED_HEADER).is_file() for p in paths):
        stand_in = workdir / "torch_cpu_stand_in" / GENERATED_HEADER
        stand_in.parent.mkdir(parents=True, exist_ok=True)
        stand_in.write_text(GENERATED_HEADER_TEXT)
        paths.append(str(workdir / "torch_cpu_stand_in"))
    return paths


def compile_command(
    nvcc: str, build: Build, obj: Path, arch: str, includes: list[str] | None, keep_dir: Path | None = None
) -> list[str]:
    """The nvcc line for one build, mirroring the flag order of torch.utils.cpp_extension.load; with
    keep_dir, nvcc leaves its intermediate files (the PTX among them) there.

    torch's common flags come first and the kernel's own flags last, so its -U of torch's
    -D__CUDA_NO_*__ switches wins exactly as in the real build. With includes None, only the kernels
    are compiled (-DWKV_KERNELS_ONLY leaves out the torch binding): the same device code, in seconds.
    """
    from torch.utils import cpp_extension

    cmd = [nvcc, "-c", str(kernels.cuda_dir() / build.source), "-o", str(obj)]
    if keep_dir is not None:
        cmd += ["-keep", "-keep-dir", str(keep_dir)]
    if includes is None:
        cmd += ["-DWKV_KERNELS_ONLY", f"-I{kernels.cuda_dir()}", "-std=c++17"]
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}", *build.flags, "-Xptxas", "-v"]
        return cmd
    cmd += [f"-DTORCH_EXTENSION_NAME=cuda_check_{Path(build.source).stem}", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    cmd += [f"-I{kernels.cuda_dir()}"]
    for include in [*includes, sysconfig.get_paths()["include"]]:
        cmd += ["-isystem", include]
    cmd += list(getattr(cpp_extension, "COMMON_NVCC_FLAGS", []))
    cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}", "--compiler-options", "-fPIC"]
    cmd += build.flags
    if not any(flag.startswith("-std=") for flag in cmd):
        cmd.append("-std=c++20")  # torch's default when the kernel names none
    cmd += ["-Xptxas", "-v"]
    return cmd


_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(text: str) -> list[KernelUsage]:
    """The kernels in a `-Xptxas -v` report, in the order ptxas compiled them.

    ptxas prints, per entry function: "Compiling entry function 'NAME'", then "Function properties
    for NAME" followed by the stack/spill line, then "Used N registers, ..., S bytes smem". Non-entry
    (noinline device) functions get a properties block too; they are not kernels and are left out.
    """
    frames: dict[str, tuple[int, int, int]] = {}
    found: dict[str, KernelUsage] = {}
    current: KernelUsage | None = None
    framed: str | None = None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            current = found.setdefault(m.group(1), KernelUsage(m.group(1)))
        elif m := _PROPERTIES.search(line):
            framed = m.group(1)
        elif (m := _FRAME.search(line)) and framed is not None:
            frames[framed] = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
            framed = None
        elif (m := _REGISTERS.search(line)) and current is not None:
            current.registers = int(m.group(1))
            if s := _SMEM.search(line):
                current.smem = int(s.group(1))
    for usage in found.values():
        usage.stack, usage.spill_stores, usage.spill_loads = frames.get(usage.name, (0, 0, 0))
    return list(found.values())


_PTX_ENTRY = re.compile(r"^(?:\.(?:visible|weak)\s+)?\.entry\s+([\w$]+)\s*\(", re.MULTILINE)
_PTX_MMA_ACCESS = re.compile(r"^\s*(?:@!?%\w+\s+)?wmma\.(?:load|store)\.([\w.]+)", re.MULTILINE)


def generic_mma_accesses(ptx: str) -> dict[str, int]:
    """Per kernel (entry function) of a PTX module, its wmma loads and stores that name no state space."""
    entries = list(_PTX_ENTRY.finditer(ptx))
    counts = {}
    for i, entry in enumerate(entries):
        body = ptx[entry.end() : entries[i + 1].start() if i + 1 < len(entries) else len(ptx)]
        counts[entry.group(1)] = sum(
            1 for m in _PTX_MMA_ACCESS.finditer(body) if not {"shared", "global"} & set(m.group(1).split("."))
        )
    return counts


def short_name(demangled: str) -> str:
    """'void wkv::forward<64, 2>(float const*, int)' -> 'wkv::forward<64, 2>': no return type, no parameters.

    Kernels in an anonymous namespace lose the "(anonymous namespace)::" prefix.
    """
    demangled = demangled.replace("(anonymous namespace)::", "")
    depth, end = 0, len(demangled)
    for i, ch in enumerate(demangled):  # the parameter list is the first '(' outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            end = i
            break
    head = demangled[:end].strip()
    depth = 0
    for i in range(len(head) - 1, -1, -1):  # drop the return type: the last space outside brackets
        ch = head[i]
        if ch == ">":
            depth += 1
        elif ch == "<":
            depth -= 1
        elif ch == " " and depth == 0:
            return head[i + 1 :]
    return head


def demangle(names: list[str], nvcc: str) -> dict[str, str]:
    """Mangled -> readable names, with cu++filt (shipped beside nvcc) or c++filt; unchanged if neither exists."""
    beside = Path(os.path.realpath(nvcc)).parent / "cu++filt"
    tool = str(beside) if beside.is_file() else shutil.which("cu++filt") or shutil.which("c++filt")
    if not names or tool is None:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True, check=False)
    readable = out.stdout.splitlines()
    if out.returncode != 0 or len(readable) != len(names):
        return {n: n for n in names}
    return dict(zip(names, readable))


def compile_one(nvcc: str, build: Build, workdir: Path, arch: str, includes: list[str],
                cuobjdump: str | None = None) -> BuildResult:
    """Compile one build into workdir; the result carries ptxas's per-kernel report (and with cuobjdump each
    kernel's SASS counts) or the compiler's log."""
    suffix = "" if build.head_size is None else f"_h{build.head_size}"
    obj = workdir / f"{Path(build.source).stem}{suffix}.o"
    started = time.time()
    if not (kernels.cuda_dir() / build.source).is_file():
        return BuildResult(build, False, 0.0, log=f"source {kernels.cuda_dir() / build.source} does not exist")
    keep_dir = workdir / f"{obj.stem}_intermediate"
    keep_dir.mkdir(exist_ok=True)
    cmd = compile_command(nvcc, build, obj, arch, includes, keep_dir)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    log = proc.stdout + proc.stderr
    seconds = time.time() - started
    usage = parse_ptxas(log)
    generic = {}
    for ptx in keep_dir.glob("*.ptx"):
        generic.update(generic_mma_accesses(ptx.read_text()))
    for kernel in usage:
        kernel.generic_mma = generic.get(kernel.name)  # None: no PTX found for it
    if cuobjdump and proc.returncode == 0:
        dump = subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True, check=False)
        sass = sass_counts(dump.stdout) if dump.returncode == 0 else {}
        for kernel in usage:
            kernel.sass = sass.get(kernel.name)
    shutil.rmtree(keep_dir, ignore_errors=True)  # the preprocessed sources are megabytes per build
    return BuildResult(build, proc.returncode == 0, seconds, usage, f"$ {shlex.join(cmd)}\n{log}")


def sass_cells(sass: SassCounts | None) -> tuple[str, str, str]:
    if sass is None:
        return "-", "-", "-"
    return str(sass.instructions), str(sass.ffma), f"{sass.global_loads}/{sass.global_stores}"


def format_table(results: list[BuildResult], names: dict[str, str]) -> list[str]:
    """One row per kernel of every successful build; spilling kernels marked."""
    rows = []
    for result in results:
        b = result.build
        for k in result.kernels:
            flag = "  <- SPILLS" if k.spills else ""
            rows.append((b.source, "-" if b.head_size is None else str(b.head_size), ",".join(b.generations),
                         short_name(names.get(k.name, k.name)), str(k.registers), str(k.spill_stores),
                         str(k.spill_loads), str(k.stack), str(k.smem), *sass_cells(k.sass),
                         "?" if k.generic_mma is None else str(k.generic_mma), flag))
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(COLUMNS)]
    numeric = set(range(4, len(COLUMNS)))

    def fmt(cells) -> str:
        parts = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(parts)

    return [fmt(COLUMNS), fmt("-" * w for w in widths)] + [fmt(r[:-1]) + r[-1] for r in rows]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2, help="compilations run in parallel (default 2)")
    parser.add_argument("--arch", default="90", help="compute capability to compile for, without the dot (default 90)")
    parser.add_argument(
        "--with-binding",
        action="store_true",
        help="also compile each source's torch binding against torch's headers (minutes per build instead of seconds)",
    )
    parser.add_argument("--fail-on-spill", action="store_true", help="exit 1 when any kernel spills registers")
    parser.add_argument("--source", action="append", metavar="FILE",
                        help="only this source in cuda/, e.g. wkv7.cu (repeatable; default: all)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    nvcc = find_nvcc()
    if nvcc is None:
        print(SKIP_MESSAGE)
        return 0
    builds = planned_builds()
    if args.source:
        unknown = sorted(set(args.source) - {b.source for b in builds})
        if unknown:
            print(f"cuda-check: unknown source(s) {', '.join(unknown)}; the kernels are "
                  f"{', '.join(sorted({b.source for b in builds}))}", file=sys.stderr)
            return 2
        builds = [b for b in builds if b.source in args.source]
    print(f"cuda-check: compiling {len(builds)} builds for sm_{args.arch} with {nvcc} ({args.jobs} at a time)",
          flush=True)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="cuda_check_") as tmp, ThreadPoolExecutor(max(1, args.jobs)) as pool:
        includes = torch_includes(Path(tmp)) if args.with_binding else None
        if includes and any("torch_cpu_stand_in" in p for p in includes):
            print(f"cuda-check: torch is a CPU-only build; standing in for its generated {GENERATED_HEADER}")
        cuobjdump = find_cuobjdump(nvcc)
        if cuobjdump is None:
            print("cuda-check: no cuobjdump (beside nvcc, on PATH, or `pip install nvidia-cuda-cuobjdump`); "
                  "the SASS counts are left out")
        results = list(pool.map(lambda b: compile_one(nvcc, b, Path(tmp), args.arch, includes, cuobjdump), builds))

    for r in results:
        if not r.ok:
            print(f"\ncuda-check: {r.build.label} failed to compile:\n{r.log.strip()}\n", file=sys.stderr)
        elif not r.kernels:  # a source without kernels, or a ptxas report this script cannot read
            r.ok = False
            print(f"\ncuda-check: {r.build.label} compiled, but ptxas reported no kernel:\n{r.log.strip()}\n",
                  file=sys.stderr)
    failed = [r for r in results if not r.ok]
    names = demangle(sorted({k.name for r in results for k in r.kernels}), nvcc)
    print("\n".join(format_table(results, names)))

    spilling = [f"{r.build.label}: {short_name(names[k.name])}" for r in results for k in r.kernels if k.spills]
    if spilling:
        print("cuda-check: WARNING: register spills (local memory traffic every step) in\n  " + "\n  ".join(spilling))
    generic = [f"{r.build.label}: {short_name(names[k.name])}" for r in results for k in r.kernels if k.generic_mma]
    if generic:
        print("cuda-check: WARNING: tensor-core fragments moved through generic addresses (LD and MOVM, not LDSM) in"
              "\n  " + "\n  ".join(generic))
    print(f"cuda-check: {len(results) - len(failed)}/{len(results)} builds compiled in {time.time() - started:.0f} s")
    if failed:
        print(f"cuda-check: FAILED: {', '.join(r.build.label for r in failed)}", file=sys.stderr)
        return 1
    if spilling and args.fail_on_spill:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
