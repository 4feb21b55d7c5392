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

All variants of a row see the same random inputs, shaped like the model's (see `make_inputs`) and
converted to what each takes (log-decay, its logarithm, or the pre-activation). dy is random and every
input gets its gradient. No initial state and no final-state gradient: RWKV-LM's kernels have
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
import csv
import gc
import importlib
import inspect
import math
import multiprocessing as mp
import os
import queue
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

REPO = Path(__file__).resolve().parent.parent
try:
    import rwkv_train  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO))

GENERATIONS = ("v4", "v5", "v6", "v7")
COLUMNS = ("ours-cuda", "ours-torch", "rwkv-lm", "fla")
TITLES = {"ours-cuda": "ours cuda", "ours-torch": "ours torch", "rwkv-lm": "RWKV-LM", "fla": "fla"}
DEFAULT_SHAPES = ("8x4096x4096", "1x32768x4096")

V7_DECAY_SCALE = math.exp(-0.5)  # RWKV-7's decay is exp(-e^-0.5 sigmoid(z)): log-decays in (-0.61, 0)
REF_V7_CHUNK = 16  # RWKV-LM's v7 kernels save the state every 16 steps, so T % 16 == 0
FINGERPRINT_STEPS = 32  # y is compared across variants on three windows of this many steps
MIN_RUNS = 3  # timed runs kept even when a variant is slower than the per-variant time cap


# --------------------------------------------------------------------------------------------------
# What is run


@dataclass(frozen=True)
class Shape:
    B: int
    T: int
    C: int
    N: int  # head size (v5-v7)

    @property
    def H(self) -> int:
        return self.C // self.N

    @property
    def label(self) -> str:
        return f"B={self.B} T={self.T} C={self.C}"


@dataclass(frozen=True)
class Row:
    generation: str
    shape: Shape

    @property
    def key(self) -> str:
        return f"{self.generation} {self.shape.label}"

    def seed(self, base: int) -> int:
        """The same inputs in every process that times this row."""
        return base + zlib.crc32(self.key.encode())


@dataclass(frozen=True)
class BuildSpec:
    """One extension to build: ours (via rwkv_train.ops.kernels) or an RWKV-LM kernel."""

    key: str
    name: str = ""  # RWKV-LM: the extension's name (its build folder)
    sources: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    python_module: bool = True  # False: the library only registers torch.ops.<namespace>
    namespace: str = ""
    generation: str = ""  # ours: kernels.load(generation, head_size)
    head_size: int | None = None


@dataclass(frozen=True)
class Built:
    key: str
    ok: bool
    name: str = ""
    flags: tuple[str, ...] = ()
    seconds: float = 0.0
    message: str = ""  # why it failed, or how it was built when it needed a second try
    log: str = ""


@dataclass(frozen=True)
class Variant:
    key: str  # names the prepare function in PREPARE
    column: str
    label: str  # the kernel or op, for the notes
    build: str | None = None  # BuildSpec key
    isolate: bool = False  # run in a process of its own


@dataclass(frozen=True)
class Job:
    row: Row
    variant: Variant
    skip: str = ""  # why it cannot run at all (e.g. the reference sources are missing)


@dataclass
class Task:
    job: Job
    mode: str  # "time", "warm" (one untimed run: compiles Triton kernels), "env"
    built: Built | None = None
    spec: BuildSpec | None = None
    anchor: np.ndarray | None = None  # y of the row's first variant on the fingerprint windows
    warmup: int = 2
    repeats: int = 10
    max_seconds: float = 5.0
    seed: int = 0
    device: str = "cuda"


@dataclass
class Result:
    row: str
    variant: str
    column: str
    label: str
    status: str = "ok"  # ok | OOM | error | n/a
    median_ms: float | None = None
    min_ms: float | None = None
    runs: int = 0
    peak_gb: float | None = None
    rel_err: float | None = None
    anchor: str = ""
    nan: str = ""  # which outputs held NaN after the check run
    message: str = ""
    fingerprint: np.ndarray | None = None  # numpy, not torch: torch would share it through a file
    # descriptor of the worker, which may have exited by the time the main process reads it
    poisoned: bool = False  # the CUDA context is unusable: the worker must be replaced
    info: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# RWKV-LM's kernels: sources, flags and names as its trainers build them


# The trainers' nvcc flags: RWKV-v4neo/src/model.py (bf16), RWKV-v5/src/model.py (x052, x060, x070) and
# RWKV-v7/train_temp/src/model.py; each kernel adds its -D parameters.
_REF_FLAGS = ("-res-usage", "--use_fast_math", "-O3", "-Xptxas -O3", "--extra-device-vectorization")
_REF_V4_FLAGS = ("-t 4", "-std=c++17", "-res-usage", "--maxrregcount 60", *_REF_FLAGS[1:])


def _ref_spec(
    name: str, folder: Path, sources: tuple[str, ...], flags: tuple[str, ...], namespace: str = ""
) -> BuildSpec:
    """An RWKV-LM extension; `namespace` for the ones that only register torch.ops.<namespace>."""
    files = tuple(str(folder / s) for s in sources)
    return BuildSpec(f"rwkvlm-{name}", f"rwkvlm_{name}", files, flags, not namespace, namespace)


def reference_variants(generation: str, shape: Shape, ref: Path) -> list[tuple[Variant, BuildSpec]]:
    """RWKV-LM's training kernel(s) for one generation and shape, with the build each needs.

    v4 and v6 bake T in (Tmax, _T_): one build per T, each run in a process of its own.
    """
    N, T = shape.N, shape.T
    if generation == "v4":
        spec = _ref_spec(
            f"wkv4_bf16_T{T}", ref / "RWKV-v4neo" / "cuda", ("wkv_op_bf16.cpp", "wkv_cuda_bf16.cu"),
            (*_REF_V4_FLAGS, f"-DTmax={T}"),
        )  # fmt: skip
        return [(Variant("v4:rwkvlm", "rwkv-lm", "RWKV-v4neo wkv_cuda_bf16.cu", spec.key, isolate=True), spec)]
    v5 = ref / "RWKV-v5" / "cuda"
    if generation == "v5":
        spec = _ref_spec(f"wkv5_h{N}", v5, ("wkv5_op.cpp", "wkv5_cuda.cu"), (*_REF_FLAGS, f"-D_N_={N}"))
        return [(Variant("v5:rwkvlm", "rwkv-lm", "RWKV-v5 wkv5_cuda.cu", spec.key), spec)]
    if generation == "v6":
        flags = (*_REF_FLAGS, f"-D_N_={N}", f"-D_T_={T}")
        spec = _ref_spec(f"wkv6_h{N}_T{T}", v5, ("wkv6_op.cpp", "wkv6_cuda.cu"), flags, namespace="wkv6")
        return [(Variant("v6:rwkvlm", "rwkv-lm", "RWKV-v5 wkv6_cuda.cu", spec.key, isolate=True), spec)]
    v7 = ref / "RWKV-v7" / "train_temp" / "cuda"
    chunk = f"-D_CHUNK_LEN_={REF_V7_CHUNK}"
    clampw_flags = ("-res-usage", f"-D_N_={N}", chunk, *_REF_FLAGS[1:])
    kernels = [  # (variant, source, build)
        ("v7:rwkvlm-clampw", "rwkv7_clampw.cu", _ref_spec(
            f"rwkv7_clampw_h{N}", v7, ("rwkv7_clampw.cu", "rwkv7_clampw.cpp"), clampw_flags, "rwkv7_clampw")),
        ("v7:rwkvlm-clampw-v3", "rwkv7_clampw_v3_for_h100.cu", _ref_spec(
            f"rwkv7_clampw_v3_h{N}", v7, ("rwkv7_clampw_v3_for_h100.cu", "rwkv7_clampw_v3.cpp"), clampw_flags,
            "rwkv7_clampw_v3")),
        ("v7:rwkvlm-wkv7", "wkv7_cuda.cu", _ref_spec(
            f"wind_backstepping_h{N}", v7, ("wkv7_cuda.cu", "wkv7_op.cpp"),
            ("-res-usage", f"-D_C_={N}", chunk, *_REF_FLAGS[1:]), "wind_backstepping")),
    ]  # fmt: skip
    return [(Variant(key, "rwkv-lm", f"RWKV-v7/train_temp {source}", spec.key), spec) for key, source, spec in kernels]


def ours_build(generation: str, N: int) -> BuildSpec:
    from rwkv_train.ops import kernels

    source = kernels.SOURCES[generation]
    head = None if generation == "v4" else N
    return BuildSpec(f"ours-{source}" + ("" if head is None else f"-h{head}"), generation=generation, head_size=head)


FLA_LABELS = {
    "v4": "fla.ops.rwkv4.fused_recurrent_rwkv4",
    "v5": "fla.ops.rwkv6.chunk_rwkv6, decay broadcast over (B, T)",
    "v6": "fla.ops.rwkv6.chunk_rwkv6",
    "v7": "fla.ops.rwkv7.chunk_rwkv7 (safe_gate, lower_bound -e^-0.5, chunk 64)",
}
OURS_LABELS = {
    "ours-cuda": {"v4": "wkv4_cuda", "v5": "wkv5_cuda", "v6": "wkv6_cuda", "v7": "wkv7_cuda"},
    "ours-torch": {"v4": "wkv4 torch", "v5": "wkv5 torch", "v6": "wkv6 torch", "v7": "wkv7 torch"},
}


@dataclass
class Plan:
    rows: list[Row]
    jobs: list[Job]
    builds: dict[str, BuildSpec]


def make_plan(generations: list[str], shapes: list[Shape], columns: list[str], ref: Path) -> Plan:
    """Rows in order, each row's variants in column order (the first one that runs is the anchor)."""
    from rwkv_train.ops import kernels

    rows = [Row(g, s) for g in generations for s in shapes]
    jobs: list[Job] = []
    builds: dict[str, BuildSpec] = {}
    for row in rows:
        g, s = row.generation, row.shape
        for column in ("ours-torch", "ours-cuda", "rwkv-lm", "fla"):  # ours torch first: the exact reference
            if column not in columns:
                continue
            if column == "ours-torch":
                jobs.append(Job(row, Variant(f"{g}:ours-torch", column, OURS_LABELS[column][g])))
            elif column == "ours-cuda":
                spec = ours_build(g, s.N)
                builds[spec.key] = spec
                jobs.append(Job(row, Variant(f"{g}:ours-cuda", column, OURS_LABELS[column][g], spec.key)))
                if g == "v7" and s.N in kernels.head_sizes("v7-chunked"):  # both v7 kernels; the cell names the faster
                    spec = ours_build("v7-chunked", s.N)
                    builds[spec.key] = spec
                    jobs.append(Job(row, Variant("v7:ours-cuda-chunked", column, "wkv7_chunked_cuda", spec.key)))
            elif column == "fla":
                jobs.append(Job(row, Variant(f"{g}:fla", column, FLA_LABELS[g])))
            else:
                for variant, spec in reference_variants(g, s, ref):
                    missing = [p for p in spec.sources if not Path(p).is_file()]
                    if missing:
                        why = (
                            f"{missing[0]} is missing: run scripts/fetch_reference_kernels.sh (or pass --reference DIR)"
                        )
                        jobs.append(Job(row, variant, skip=why))
                    else:
                        builds[spec.key] = spec
                        jobs.append(Job(row, variant))
    return Plan(rows, jobs, builds)


# --------------------------------------------------------------------------------------------------
# Inputs


def make_inputs(generation: str, shape: Shape, seed: int, device: str) -> dict[str, Tensor]:
    """Random inputs shaped like the model's, never zeros; bf16 where the models hand bf16 over.

    v7: r, k, v ~ N(0, 1) * scale; z ~ N(0, 1) the decay pre-activation, lw = -e^-0.5 sigmoid(z) in
        (-0.61, 0); kk unit-normalised per head, a = -kk, b = kk * sigmoid(N(0, 1)).
    v6: lw = -exp(x), x ~ N(-1, 0.5) clipped to [-2.5, 0.5]; u ~ N(0, 0.5) [H, N].
    v5: one log-decay per channel, lw = -exp(x), x ~ U(-6, -1) (the init's range) [H, N]; u as v6.
    v4: time_decay ~ U(-5, 3) (the init's range), w = -exp(time_decay); u ~ N(-1.2, 0.5); k, v ~ N(0, 1).
    dy ~ N(0, 1) is the gradient of y.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    B, T, C, H, N = shape.B, shape.T, shape.C, shape.H, shape.N
    bf16 = torch.bfloat16

    def normal(*size: int, mean: float = 0.0, std: float = 1.0) -> Tensor:
        return torch.randn(*size, generator=gen, device=device).mul_(std).add_(mean)

    def uniform(*size: int, low: float, high: float) -> Tensor:
        return torch.rand(*size, generator=gen, device=device).mul_(high - low).add_(low)

    x: dict[str, Tensor] = {"dy": normal(B, T, C).to(bf16)}
    if generation == "v4":
        x["k"], x["v"] = normal(B, T, C).to(bf16), normal(B, T, C).to(bf16)
        x["time_decay"] = uniform(C, low=-5.0, high=3.0).to(bf16)
        x["u"] = normal(C, mean=-1.2, std=0.5).to(bf16)
        return x
    x["r"], x["k"] = normal(B, T, H, N, std=0.5).to(bf16), normal(B, T, H, N, std=0.5).to(bf16)
    x["v"] = normal(B, T, H, N).to(bf16)
    if generation == "v7":
        x["z"] = normal(B, T, H, N).to(bf16)
        x["lw"] = -V7_DECAY_SCALE * torch.sigmoid(x["z"].float())
        kk = F.normalize(normal(B, T, H, N), dim=-1)
        x["a"], x["b"] = (-kk).to(bf16), (kk * torch.sigmoid(normal(B, T, H, N))).to(bf16)
        return x
    x["u"] = normal(H, N, std=0.5).to(bf16)
    if generation == "v6":
        x["x"] = normal(B, T, H, N, mean=-1.0, std=0.5).clamp_(-2.5, 0.5).to(bf16)
    else:
        x["x"] = uniform(H, N, low=-6.0, high=-1.0).to(bf16)
    x["lw"] = -torch.exp(x["x"].float())
    return x


# --------------------------------------------------------------------------------------------------
# RWKV-LM's kernels, wrapped as its trainers wrap them


def _buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An output or gradient buffer of the RWKV-LM wrappers: allocated as the project's op wrappers do,
    so `kernels.poisoned_outputs()` NaN-fills them too."""
    from rwkv_train.ops import kernels

    return kernels.new_output(shape, dtype, device)


class _RwkvLm4(torch.autograd.Function):
    """RWKV-v4neo's bf16 WKV: the op takes w = -exp(time_decay) in float32, u, k, v in bf16."""

    @staticmethod
    def forward(ctx, ext, time_decay: Tensor, u: Tensor, k: Tensor, v: Tensor) -> Tensor:
        B, T, C = k.shape
        w = -torch.exp(time_decay.float().contiguous())
        y = _buffer((B, T, C), torch.bfloat16, k.device)
        ext.forward(B, T, C, w, u, k, v, y)
        ctx.ext = ext
        ctx.save_for_backward(w, u, k, v, y)
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):
        w, u, k, v, y = ctx.saved_tensors
        B, T, C = k.shape
        gw, gu = (_buffer((B, C), torch.bfloat16, k.device) for _ in range(2))
        gk, gv = (_buffer((B, T, C), torch.bfloat16, k.device) for _ in range(2))
        ctx.ext.backward(B, T, C, w, u, k, v, y, gy.contiguous(), gw, gu, gk, gv)
        return None, gw.sum(0), gu.sum(0), gk, gv  # the op's gw is already d/d time_decay


class _RwkvLm5(torch.autograd.Function):
    """RWKV-v5's x052 WKV: time_decay and u [H, N] bf16; the op takes exp(-exp(time_decay)) in float32."""

    @staticmethod
    def forward(ctx, ext, r: Tensor, k: Tensor, v: Tensor, time_decay: Tensor, u: Tensor) -> Tensor:
        B, T, H, N = r.shape
        ew = (-torch.exp(time_decay.float())).contiguous()
        eew = torch.exp(ew).contiguous()
        y = _buffer((B, T, H * N), torch.bfloat16, r.device)
        ext.forward(B, T, H * N, H, r, k, v, eew, u, y)
        ctx.ext = ext
        ctx.save_for_backward(r, k, v, eew, ew, u)
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):
        r, k, v, eew, ew, u = ctx.saved_tensors
        B, T, H, N = r.shape
        gr, gk, gv = (_buffer((B, T, H * N), torch.bfloat16, r.device) for _ in range(3))
        gw, gu = (_buffer((B, H * N), torch.bfloat16, r.device) for _ in range(2))
        ctx.ext.backward(B, T, H * N, H, r, k, v, eew, ew, u, gy.contiguous(), gr, gk, gv, gw, gu)
        shape = r.shape
        return None, gr.view(shape), gk.view(shape), gv.view(shape), gw.sum(0).view(H, N), gu.sum(0).view(H, N)


class _RwkvLm6(torch.autograd.Function):
    """RWKV-v5's x060 WKV: r, k, v, w [B, T, H, N] bf16 with decay exp(-exp(w)), u [H, N] bf16."""

    @staticmethod
    def forward(ctx, ops, r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor) -> Tensor:
        B, T, H, N = r.shape
        y = _buffer((B, T, H * N), torch.bfloat16, r.device)
        ops.forward(B, T, H * N, H, r, k, v, w, u, y)
        ctx.ops = ops
        ctx.save_for_backward(r, k, v, w, u)
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):
        r, k, v, w, u = ctx.saved_tensors
        B, T, H, N = r.shape
        gr, gk, gv, gw = (_buffer(tuple(r.shape), torch.bfloat16, r.device) for _ in range(4))
        gu = _buffer((B, H * N), torch.bfloat16, r.device)
        ctx.ops.backward(B, T, H * N, H, r, k, v, w, u, gy.contiguous(), gr, gk, gv, gw, gu)
        return None, gr, gk, gv, gw, gu.sum(0).view(H, N)


class _RwkvLm7(torch.autograd.Function):
    """RWKV-LM's v7 kernels (rwkv7_clampw, rwkv7_clampw_v3, wkv7_cuda), all inputs [B, T, H, N] bf16.

    The forward also fills s, the state every 16 steps, and sa = S_{t-1} a_t, both float32, which the
    backward reads. wkv7_cuda's ops take (w, r, ...) where the clampw ones take (r, w, ...).
    """

    @staticmethod
    def forward(ctx, ops, w_first: bool, r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor) -> Tensor:
        B, T, H, N = r.shape
        if T % REF_V7_CHUNK:
            raise ValueError(f"RWKV-LM's v7 kernels need T % {REF_V7_CHUNK} == 0, got T={T}")
        y = _buffer(tuple(v.shape), torch.bfloat16, r.device)
        s = torch.empty(B, H, T // REF_V7_CHUNK, N, N, dtype=torch.float32, device=r.device)
        sa = torch.empty(B, T, H, N, dtype=torch.float32, device=r.device)
        ops.forward(*((w, r) if w_first else (r, w)), k, v, a, b, y, s, sa)
        ctx.ops, ctx.w_first = ops, w_first
        ctx.save_for_backward(r, w, k, v, a, b, s, sa)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        r, w, k, v, a, b, s, sa = ctx.saved_tensors
        dr, dw, dk, dv, da, db = (_buffer(tuple(x.shape), torch.bfloat16, x.device) for x in (r, w, k, v, a, b))
        first, d_first = ((w, r), (dw, dr)) if ctx.w_first else ((r, w), (dr, dw))
        ctx.ops.backward(*first, k, v, a, b, dy.contiguous(), s, sa, *d_first, dk, dv, da, db)
        return None, None, dr, dw, dk, dv, da, db


# --------------------------------------------------------------------------------------------------
# One function per variant: (forward returning y, the leaves whose gradients the backward computes)

Prepared = tuple[Callable[[], Tensor], list[Tensor]]


def _leaves(x: dict[str, Tensor], *names: str) -> list[Tensor]:
    """Fresh autograd leaves sharing the inputs' storage."""
    return [x[n].detach().requires_grad_() for n in names]


def _leaf(t: Tensor) -> Tensor:
    return t.detach().requires_grad_()


def _v4_ours(x: dict[str, Tensor], backend: str) -> Prepared:
    w, u = _leaf(-torch.exp(x["time_decay"].float())), _leaf(x["u"].float())
    k, v = _leaves(x, "k", "v")
    if backend == "cuda":
        from rwkv_train.ops.wkv4_cuda import wkv4_cuda

        return (lambda: wkv4_cuda(w, u, k, v)[0]), [w, u, k, v]
    from rwkv_train.ops.wkv4 import wkv4

    return (lambda: wkv4(w, u, k, v, backend="torch")[0]), [w, u, k, v]


def _diag_ours(x: dict[str, Tensor], generation: str, backend: str) -> Prepared:
    r, k, v = _leaves(x, "r", "k", "v")
    lw, u = _leaf(x["lw"]), _leaf(x["u"].float())
    if backend == "cuda":
        from rwkv_train.ops import wkv_diag_cuda

        fn = getattr(wkv_diag_cuda, f"wkv{generation[1]}_cuda")
        return (lambda: fn(r, lw, k, v, u)[0]), [r, lw, k, v, u]
    from rwkv_train.ops import wkv_diag

    fn = getattr(wkv_diag, f"wkv{generation[1]}")
    return (lambda: fn(r, lw, k, v, u, backend="torch")[0]), [r, lw, k, v, u]


def _v7_ours(x: dict[str, Tensor], backend: str) -> Prepared:
    r, lw, k, v, a, b = _leaves(x, "r", "lw", "k", "v", "a", "b")
    if backend == "cuda-chunked":
        from rwkv_train.ops.wkv7_chunked_cuda import wkv7_chunked_cuda

        return (lambda: wkv7_chunked_cuda(r, lw, k, v, a, b)[0]), [r, lw, k, v, a, b]
    if backend == "cuda":
        from rwkv_train.ops.wkv7_cuda import wkv7_cuda

        return (lambda: wkv7_cuda(r, lw, k, v, a, b)[0]), [r, lw, k, v, a, b]
    from rwkv_train.ops.wkv7 import wkv7

    return (lambda: wkv7(r, lw, k, v, a, b, backend="torch")[0]), [r, lw, k, v, a, b]


def _v4_rwkvlm(x: dict[str, Tensor], ext: Any) -> Prepared:
    time_decay, u, k, v = _leaves(x, "time_decay", "u", "k", "v")  # all bf16, as in a bf16 run
    return (lambda: _RwkvLm4.apply(ext, time_decay, u, k, v)), [time_decay, u, k, v]


def _v5_rwkvlm(x: dict[str, Tensor], ext: Any) -> Prepared:
    r, k, v, time_decay, u = _leaves(x, "r", "k", "v", "x", "u")  # x is time_decay here
    return (lambda: _RwkvLm5.apply(ext, r, k, v, time_decay, u)), [r, k, v, time_decay, u]


def _v6_rwkvlm(x: dict[str, Tensor], ops: Any) -> Prepared:
    r, k, v, w, u = _leaves(x, "r", "k", "v", "x", "u")  # decay exp(-exp(x)), x in bf16 as the trainer's w
    return (lambda: _RwkvLm6.apply(ops, r, k, v, w, u)), [r, k, v, w, u]


def _v7_rwkvlm_clampw(x: dict[str, Tensor], ops: Any) -> Prepared:
    # The clampw kernels take the decay's pre-activation z and apply exp(-e^-0.5 sigmoid(z)) themselves.
    r, z, k, v, a, b = _leaves(x, "r", "z", "k", "v", "a", "b")
    return (lambda: _RwkvLm7.apply(ops, False, r, z, k, v, a, b)), [r, z, k, v, a, b]


def _v7_rwkvlm_wkv7(x: dict[str, Tensor], ops: Any) -> Prepared:
    # wkv7_cuda takes w with decay exp(-exp(w)): w = log(-lw) = -softplus(-z) - 0.5, in bf16 as its trainer's.
    w = _leaf(torch.log(-x["lw"]).to(torch.bfloat16))
    r, k, v, a, b = _leaves(x, "r", "k", "v", "a", "b")
    return (lambda: _RwkvLm7.apply(ops, True, r, w, k, v, a, b)), [r, w, k, v, a, b]


_FLA_STUBBED = False


def _fla(module: str) -> Any:
    """Import an fla.ops module, leaving fla's model zoo out if that is what fails to import.

    fla/__init__ also imports fla.layers and fla.models, which need a recent transformers; the ops do
    not. If the import fails, those two are marked absent (fla's __init__ skips a missing one) and the
    ops are imported alone.
    """
    global _FLA_STUBBED
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name in ("fla", "fla.ops"):
            raise ModuleNotFoundError("fla is not installed (pip install flash-linear-attention)") from exc
        if _FLA_STUBBED:
            raise
    except ImportError:
        if _FLA_STUBBED:
            raise
    for name in [m for m in sys.modules if m == "fla" or m.startswith("fla.")]:
        del sys.modules[name]
    sys.modules["fla.layers"] = None  # type: ignore[assignment]
    sys.modules["fla.models"] = None  # type: ignore[assignment]
    _FLA_STUBBED = True
    return importlib.import_module(module)


def _supported(fn: Callable, **kwargs: Any) -> dict[str, Any]:
    """The keyword arguments this fla version's function accepts (older versions lack some)."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def _v4_fla(x: dict[str, Tensor]) -> Prepared:
    rwkv4 = _fla("fla.ops.rwkv4").fused_recurrent_rwkv4  # takes time_decay, does -exp itself
    time_decay, u, k, v = _leaves(x, "time_decay", "u", "k", "v")
    B, _, C = k.shape
    state = torch.zeros(B, 3, 1, C, dtype=k.dtype, device=k.device)  # (alpha, beta, eps): the empty state
    state[:, 2] = -1e38
    return (lambda: rwkv4(time_decay, u, k, v, state)[0]), [time_decay, u, k, v]


def _diag_fla(x: dict[str, Tensor], generation: str) -> Prepared:
    chunk_rwkv6 = _fla("fla.ops.rwkv6").chunk_rwkv6
    r, k, v, u = _leaves(x, "r", "k", "v", "u")
    lw = _leaf(x["lw"].to(torch.bfloat16))  # fla's RWKV-6 layer hands over w = -exp(.) in the model dtype
    if generation == "v6":
        return (lambda: chunk_rwkv6(r, k, v, lw, u, scale=1.0)[0]), [r, k, v, lw, u]
    # RWKV-5 is RWKV-6 with a decay that does not depend on t: broadcast it (its gradient sums back).
    return (lambda: chunk_rwkv6(r, k, v, lw.expand(r.shape), u, scale=1.0)[0]), [r, k, v, lw, u]


def _v7_fla(x: dict[str, Tensor]) -> Prepared:
    chunk_rwkv7 = _fla("fla.ops.rwkv7").chunk_rwkv7
    r, k, v, a, b = _leaves(x, "r", "k", "v", "a", "b")
    w = _leaf(x["lw"].to(torch.bfloat16))  # log-decay, state layout [K, V]
    # As fla's RWKV-7 layer calls it: the decay bound licenses its tensor-core path and 64-step chunks.
    extra = _supported(chunk_rwkv7, safe_gate=True, lower_bound=-V7_DECAY_SCALE, chunk_size=64)
    return (lambda: chunk_rwkv7(r, w, k, v, a, b, scale=1.0, **extra)[0]), [r, w, k, v, a, b]


PREPARE: dict[str, Callable[[dict[str, Tensor], Any], Prepared]] = {
    "v4:ours-cuda": lambda x, _: _v4_ours(x, "cuda"),
    "v4:ours-torch": lambda x, _: _v4_ours(x, "torch"),
    "v4:rwkvlm": _v4_rwkvlm,
    "v4:fla": lambda x, _: _v4_fla(x),
    "v5:ours-cuda": lambda x, _: _diag_ours(x, "v5", "cuda"),
    "v5:ours-torch": lambda x, _: _diag_ours(x, "v5", "torch"),
    "v5:rwkvlm": _v5_rwkvlm,
    "v5:fla": lambda x, _: _diag_fla(x, "v5"),
    "v6:ours-cuda": lambda x, _: _diag_ours(x, "v6", "cuda"),
    "v6:ours-torch": lambda x, _: _diag_ours(x, "v6", "torch"),
    "v6:rwkvlm": _v6_rwkvlm,
    "v6:fla": lambda x, _: _diag_fla(x, "v6"),
    "v7:ours-cuda": lambda x, _: _v7_ours(x, "cuda"),
    "v7:ours-cuda-chunked": lambda x, _: _v7_ours(x, "cuda-chunked"),
    "v7:ours-torch": lambda x, _: _v7_ours(x, "torch"),
    "v7:rwkvlm-clampw": _v7_rwkvlm_clampw,
    "v7:rwkvlm-clampw-v3": _v7_rwkvlm_clampw,
    "v7:rwkvlm-wkv7": _v7_rwkvlm_wkv7,
    "v7:fla": lambda x, _: _v7_fla(x),
}


# --------------------------------------------------------------------------------------------------
# Building (in parallel processes) and loading (in the worker)


def load_reference(name: str, spec: BuildSpec, flags: tuple[str, ...]) -> Any:
    """Build or load one RWKV-LM extension; its ops object (a module, or torch.ops.<namespace>)."""
    from torch.utils.cpp_extension import load

    module = load(
        name=name,
        sources=list(spec.sources),
        extra_cuda_cflags=list(flags),
        is_python_module=spec.python_module,
        verbose=False,
    )
    return module if spec.python_module else getattr(torch.ops, spec.namespace)


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


# --------------------------------------------------------------------------------------------------
# Reporting


def _ms(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


class Notes:
    """Numbered footnotes, one per distinct message."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def ref(self, text: str) -> str:
        if text not in self.items:
            self.items.append(text)
        return f"[{self.items.index(text) + 1}]"


MAX_REL_DIFF = 0.05  # y further than this from the anchor's (relative, on the fingerprint windows) is flagged


def check_problem(res: Result) -> str:
    """What the output check found wrong with a timed variant, or ''."""
    problems = []
    if res.nan:
        problems.append(f"NaN left in {res.nan} after the check run (unwritten or non-finite)")
    if res.rel_err is not None and not res.rel_err <= MAX_REL_DIFF:
        problems.append(f"y differs from {res.anchor}'s by {res.rel_err:.3g} (relative)")
    return "; ".join(problems)


def summarize(plan: Plan, results: list[Result], columns: list[str]) -> tuple[list[dict[str, Any]], Notes]:
    """One dict per row: each column's best time and its cell text, and the speed-up."""
    notes = Notes()
    by_row: dict[str, list[Result]] = {}
    for res in results:
        by_row.setdefault(res.row, []).append(res)
    table = []
    for row in plan.rows:
        line: dict[str, Any] = {"row": row, "cells": {}, "ms": {}, "kernel": {}}
        for column in columns:
            mine = [r for r in by_row.get(row.key, []) if r.column == column]
            ok = [r for r in mine if r.status == "ok" and r.median_ms is not None]
            if ok:
                best = min(ok, key=lambda r: r.median_ms)
                text = _ms(best.median_ms)
                problem = check_problem(best)
                if problem:
                    text += " " + notes.ref(f"{best.label}: {problem}")
                if len(mine) > 1:  # several kernels in this column: name the fastest
                    text += f" ({best.label.split()[-1].removesuffix('.cu').removesuffix('_for_h100')})"
                line["ms"][column], line["kernel"][column] = best.median_ms, best.label
            elif mine:
                first = mine[0]
                text = (
                    "OOM" if first.status == "OOM" else f"{first.status} {notes.ref(f'{first.label}: {first.message}')}"
                )
            else:
                text = "-"
            line["cells"][column] = text
        ours, ref = line["ms"].get("ours-cuda"), line["ms"].get("rwkv-lm")
        line["speedup"] = ref / ours if ours and ref else None
        table.append(line)
    return table, notes


def render_text(table: list[dict[str, Any]], columns: list[str], head_size: int) -> list[list[str]]:
    head = ["generation", f"shape (head {head_size})", *(f"{TITLES[c]} ms" for c in columns)]
    if "ours-cuda" in columns and "rwkv-lm" in columns:
        head.append("speed-up vs RWKV-LM")
    rows = [head]
    for line in table:
        cells = [line["row"].generation, line["row"].shape.label, *(line["cells"][c] for c in columns)]
        if len(head) > len(columns) + 2:
            cells.append(f"{line['speedup']:.2f}x" if line["speedup"] else "-")
        rows.append(cells)
    return rows


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for n, r in enumerate(rows):
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def markdown(rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(rows[0]) - 2)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return out


def write_outputs(
    out: Path,
    plan: Plan,
    results: list[Result],
    builds: dict[str, Built],
    env: dict[str, str],
    table: list[dict[str, Any]],
    notes: Notes,
    rows: list[list[str]],
    args: argparse.Namespace,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench_kernels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "generation",
                "B",
                "T",
                "C",
                "head_size",
                "ours_cuda_ms",
                "ours_torch_ms",
                "rwkvlm_ms",
                "rwkvlm_kernel",
                "fla_ms",
                "speedup_vs_rwkvlm",
                "cells",
            ]
        )
        for line in table:
            s, ms = line["row"].shape, line["ms"]
            w.writerow(
                [
                    line["row"].generation,
                    s.B,
                    s.T,
                    s.C,
                    s.N,
                    *(_csv(ms.get(c)) for c in ("ours-cuda", "ours-torch", "rwkv-lm")),
                    line["kernel"].get("rwkv-lm", ""),
                    _csv(ms.get("fla")),
                    _csv(line["speedup"]),
                    " | ".join(f"{c}: {t}" for c, t in line["cells"].items()),
                ]
            )
    with open(out / "bench_kernels_all.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "row",
                "column",
                "variant",
                "status",
                "median_ms",
                "min_ms",
                "runs",
                "peak_gb",
                "rel_err_vs_anchor",
                "anchor",
                "nan_after_check",
                "message",
            ]
        )
        for r in results:
            w.writerow(
                [
                    r.row,
                    r.column,
                    r.label,
                    r.status,
                    _csv(r.median_ms),
                    _csv(r.min_ms),
                    r.runs,
                    _csv(r.peak_gb),
                    _csv(r.rel_err),
                    r.anchor,
                    r.nan,
                    r.message,
                ]
            )
    failed_logs = [b for b in builds.values() if b.log]
    for b in failed_logs:
        (out / "build_logs").mkdir(exist_ok=True)
        (out / "build_logs" / f"{b.key}.log").write_text(b.log)

    ref_commit = Path(args.reference) / "COMMIT"
    lines = ["# WKV kernels: forward + backward time", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    if ref_commit.is_file():
        lines.append(f"- RWKV-LM: {ref_commit.read_text().strip()}")
    lines += [
        (
            f"- median of up to {args.repeats} runs after {args.warmup} warm-up runs (the first checks the outputs); "
            f"ms per forward + backward, head size {args.head_size}"
        ),
        "",
    ]
    lines += markdown(rows)
    lines += ["", "speed-up: RWKV-LM time / ours cuda time (> 1: ours is faster).", ""]
    if notes.items:
        lines += ["Notes:", ""] + [f"{i}. {t}" for i, t in enumerate(notes.items, 1)] + [""]
    lines += [
        "## Every variant",
        "",
        "| row | variant | status | median ms | min ms | runs | peak GiB | rel. diff vs anchor | NaN check |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.row} | {r.label} | {r.status} | {_csv(r.median_ms, 3)} | {_csv(r.min_ms, 3)} | {r.runs} | "
            f"{_csv(r.peak_gb, 2)} | {_csv(r.rel_err, 3)} {r.anchor} | {r.nan or 'ok'} |"
        )
    lines += ["", "## Builds", ""]
    for key, b in builds.items():
        spec = plan.builds.get(key)
        flags = " ".join(b.flags or (spec.flags if spec else ()))
        what = f"{b.name or key}: {'ok' if b.ok else 'FAILED'} in {b.seconds:.0f} s" + (
            f", flags `{flags}`" if flags else ""
        )
        lines.append(f"- {what}" + (f" ({b.message})" if b.message else ""))
    lines += ["", "## What each column runs", ""] + [f"- {line}" for line in _column_notes()]
    (out / "bench_kernels.md").write_text("\n".join(lines) + "\n")


def _csv(x: float | None, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}g}"


def _column_notes() -> list[str]:
    return [
        "ours cuda: rwkv_train.ops wkv4_cuda / wkv5_cuda / wkv6_cuda / wkv7_cuda (bf16 inputs, float32 log-decay and state).",
        'ours torch: the backend="torch" implementations (float32 compute, TF32 matmuls as the trainer enables them).',
        "RWKV-LM v4: RWKV-v4neo/cuda/wkv_cuda_bf16.cu, Tmax = T baked in; w = -exp(time_decay) float32, u/k/v bf16.",
        "RWKV-LM v5: RWKV-v5/cuda/wkv5_cuda.cu (x052); time_decay and u [H, N] bf16, the op gets exp(-exp(time_decay)).",
        "RWKV-LM v6: RWKV-v5/cuda/wkv6_cuda.cu (x060), _T_ = T baked in; w bf16 with decay exp(-exp(w)).",
        (
            "RWKV-LM v7: RWKV-v7/train_temp/cuda rwkv7_clampw.cu (the trainer's default; takes the decay "
            "pre-activation), rwkv7_clampw_v3_for_h100.cu (its H100 option), wkv7_cuda.cu (the earlier kernel; takes "
            "w = log(-lw)); chunk 16, T % 16 == 0."
        ),
        (
            "fla v7: chunk_rwkv7(r, w=lw, k, v, a, b, scale=1) with safe_gate, lower_bound=-e^-0.5, chunk_size=64 as "
            "fla's RWKV-7 layer calls it; fla's state layout is [K, V] (RWKV's is [V, K]) and w is the log-decay."
        ),
        (
            "fla v6: chunk_rwkv6(r, k, v, w=lw, u, scale=1). fla v5: the same op with the time-constant decay expanded "
            "to [B, T, H, N], which is the RWKV-5 recurrence (fla has no RWKV-5 op)."
        ),
        "fla v4: fused_recurrent_rwkv4 (a recurrent Triton kernel: fla has no chunked RWKV-4).",
        (
            "Inputs: see make_inputs in scripts/bench_kernels.py. No initial state and no final-state gradient "
            "anywhere (RWKV-LM's training kernels have neither)."
        ),
    ]


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
