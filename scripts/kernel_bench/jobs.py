"""What the kernel benchmark runs: shapes, rows, builds, variants, jobs, and their results."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import numpy as np

GENERATIONS = ("v4", "v5", "v6", "v7")
COLUMNS = ("ours-cuda", "ours-torch", "rwkv-lm", "fla")
TITLES = {"ours-cuda": "ours cuda", "ours-torch": "ours torch", "rwkv-lm": "RWKV-LM", "fla": "fla"}
DEFAULT_SHAPES = ("8x4096x4096", "1x32768x4096")

V7_DECAY_SCALE = math.exp(-0.5)  # RWKV-7's decay is exp(-e^-0.5 sigmoid(z)): log-decays in (-0.61, 0)
REF_V7_CHUNK = 16  # RWKV-LM's v7 kernels save the state every 16 steps, so T % 16 == 0


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


@dataclass
class Plan:
    rows: list[Row]
    jobs: list[Job]
    builds: dict[str, BuildSpec]
