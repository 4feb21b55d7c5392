"""Training throughput on one CUDA GPU: tokens/s, peak memory and MFU of the RWKV-7 presets.

    python scripts/bench_train.py                                 # 0.1B and 1.5B at ctx_len 4096
    python scripts/bench_train.py --micro-batch 16 8 --steps 20   # fixed micro-batches, longer timing
    python scripts/bench_train.py --kernel torch --grad-cp on     # the PyTorch WKV, checkpointing forced on
    python scripts/bench_train.py --configs configs/rwkv7-1.5b.yaml --kernel cuda-chunked --compile blocks \
        --grad-cp on selective selective-wkv off                  # one row per checkpointing mode
    python scripts/bench_train.py --configs configs/rwkv7-1.5b.yaml --kernel cuda-chunked --compile blocks \
        --grad-cp selective-wkv off --micro-batch selective-wkv=12 off=6   # the largest to try per mode

Each config is built as training builds it (rwkv_train.models.build_model, the reference init) on the
GPU, with the weights of one of the two ways `train.precision: bf16` trains:
  --weights bf16   (default) what the presets' `train.strategy: deepspeed` runs: the model in bf16, and
                   float32 master weights that the optimiser steps and copies back (DeepSpeed's bf16 mode,
                   without ZeRO's partitioning on one GPU)
  --weights fp32   what `train.strategy: auto` or `ddp` runs: float32 weights under bf16 autocast
                   (Lightning's bf16-mixed)
The optimiser, parameter groups and LR schedule are those of RWKVModule.configure_optimizers (fused
torch AdamW on the float32 weights), the gradient is clipped to optim.grad_clip, and the loss is read
back every step, as the trainer does. Batches are uniformly random token ids.

--compile loss compiles the whole training loss with torch.compile; --compile blocks compiles the call
of each block, gradient checkpointing included, as `train.compile: true` does (one graph for layer 0,
one shared by the others; the embedding, the head and its fused loss stay eager). Both use
rwkv_train.compiling's inductor settings. --compile blocks-autotune adds inductor's max_autotune: each
matrix product's shape is timed against inductor's own product kernels, which can take the
neighbouring elementwise work (the lerps before, relu^2 after) into the same kernel.

A step is forward + backward on --accumulate micro-batches of micro_batch x ctx_len tokens (default
one), then the optimiser step. With accumulation the gradients are summed in the float32 master
weights' .grad between micro-batches, as DeepSpeed's bf16 mode and Lightning's accumulation do, so the
optimiser's cost (the master update, the clip, the copy back to bf16) is shared by more tokens: what
training with train.accumulate > 1, or a ZeRO run that steps only its share of the optimiser, sees.
Without --micro-batch, the largest of 1, 2, 4, 6, 8, 12, 16 that runs a whole step without running
out of memory is used (tried from the largest down). --micro-batch N (one, or one per config) runs
exactly N; --micro-batch MODE=N (per checkpointing mode, e.g. off=6) starts the search at N instead
of 16, which spares a compiled run the recompilations of sizes that cannot fit. Then --warmup steps,
then --steps timed steps.

tokens/s is of this one GPU; MFU is tokens/s x training FLOPs per token (rwkv_train.flops: 6 x matrix
parameters + the WKV recurrence, gradient-checkpoint recomputation not counted) over the GPU's dense
bf16 peak. --profile then runs two more steps under torch.profiler and says where a step's time goes:
its GPU kernels' time by kind (matrix products, the WKV kernels, inductor's fused elementwise kernels,
the optimiser, every other kernel) and the rest of the step's wall time, when the GPU ran nothing
(launch gaps, host work, the loss read back). On the CPU it sorts the operators' own times the same way.
The table is printed and written to --out as bench_train.md and bench_train.csv, which are rewritten
after every row: a run stopped part-way keeps the rows it finished.

--device cpu runs the same steps on the CPU with the PyTorch WKV, to check the script and a config
without a GPU (no peak memory or MFU there), e.g.
    python scripts/bench_train.py --device cpu --configs configs/demo.yaml --ctx-len 64 --micro-batch 2 --steps 1
"""

from __future__ import annotations

import argparse
import copy
import csv
import gc
import re
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO))

DEFAULT_CONFIGS = ["configs/rwkv7-0.1b.yaml", "configs/rwkv7-1.5b.yaml"]
MICRO_BATCHES = (16, 12, 8, 6, 4, 2, 1)  # tried in this order when --micro-batch is not given


@dataclass
class Result:
    config: str
    params: int
    micro_batch: int | None  # None: not even 1 fits
    ctx_len: int
    accumulate: int
    grad_cp: bool | str
    kernel: str
    weights: str
    compiled: str
    tokens_per_s: float | None = None
    step_s: float | None = None
    peak_mem_gib: float | None = None
    gflop_per_token: float = 0.0
    mfu: float | None = None  # a fraction; None when the GPU's peak is unknown
    device: str = ""
    profile_ms: dict[str, float] = field(default_factory=dict)  # --profile: ms per step by PARTS


# --profile's parts of a step, in table order; "idle" is the step's wall time the kernels do not fill
PARTS = ("products", "wkv", "fused", "optimiser", "other", "idle")
PART_TITLES = {"products": "matrix products", "wkv": "WKV kernels", "fused": "fused elementwise",
               "optimiser": "optimiser", "other": "other kernels", "idle": "GPU idle"}


def part_of(name: str) -> str:
    """Which part of a step a GPU kernel (or, on the CPU, an operator) belongs to, by its name."""
    lowered = name.lower()
    if "wkv" in lowered:  # this project's kernels (wkv7c::..., wkv::...) and ops (rwkv_train::wkv7_...)
        return "wkv"
    if lowered.startswith("triton_tem"):  # inductor's templated product with its fused epilogue (max_autotune)
        return "products"
    if "triton" in lowered or "cpp_fused" in lowered:  # inductor's fused kernels (Triton; C++ on the CPU)
        return "fused"
    if re.search(r"gemm|gemv|splitk|xmma|nvjet|cutlass|s16816|aten::(mm|addmm|bmm|baddbmm)$", lowered):
        return "products"
    if re.search(r"adam|multi_tensor_apply|optimizer|_foreach_", lowered):
        return "optimiser"
    return "other"


def profile_step(bench: "Bench", micro_batch: int, accumulate: int, steps: int = 2) -> dict[str, float]:
    """Milliseconds per step by PARTS, from `steps` steps under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    cuda = bench.device == "cuda"
    synchronize(bench.device)
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            bench.step(micro_batch, accumulate)
        synchronize(bench.device)
        wall_ms = (time.perf_counter() - start) * 1000 / steps
    parts = dict.fromkeys(PARTS, 0.0)
    for event in prof.key_averages():
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us > 0 and (not cuda or event.device_type == torch.autograd.DeviceType.CUDA):
            parts[part_of(event.key)] += us / 1000 / steps
    parts["idle"] = max(0.0, wall_ms - sum(parts.values()))
    return parts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="training configs (YAML) to benchmark")
    p.add_argument("--ctx-len", type=int, default=4096, help="tokens per window (default 4096)")
    p.add_argument("--micro-batch", nargs="+", default=None, metavar="N|MODE=N",
                   help="micro-batch per config, in --configs order (one value: for all), or MODE=N per "
                        "checkpointing mode: the largest to try for that mode (the smaller defaults follow); "
                        f"default: the largest of {', '.join(map(str, sorted(MICRO_BATCHES)))} that fits")
    p.add_argument("--accumulate", type=int, default=1,
                   help="micro-batches per optimiser step, their gradients summed in float32 (default 1)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per config (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing (default 3)")
    p.add_argument("--kernel", choices=("cuda", "cuda-chunked", "torch"), default=None,
                   help="WKV backend (model.kernel); for RWKV-7, cuda is the sequential kernel (model.wkv7_chunked=false) "
                        "and cuda-chunked the chunked one (model.kernel=cuda, model.wkv7_chunked=true). "
                        "Default: cuda, and torch with --device cpu")
    p.add_argument("--grad-cp", choices=("on", "off", "selective", "selective-wkv"), nargs="+", default=[None],
                   help="gradient checkpointing per block: on, off, selective (keep the projections' outputs, "
                        "recompute the rest) or selective-wkv (and keep the WKV kernel's outputs); several: each "
                        "config once per mode. Default: each config's train.grad_cp")
    p.add_argument("--weights", choices=("bf16", "fp32"), default="bf16",
                   help="bf16: bf16 model with float32 master weights (DeepSpeed bf16, the presets' strategy); "
                        "fp32: float32 weights under bf16 autocast (Lightning bf16-mixed). Default bf16")
    p.add_argument("--compile", choices=("off", "loss", "blocks", "blocks-autotune"), default="off",
                   help="torch.compile the whole training loss, or each block (blocks-autotune: with inductor's "
                        "max_autotune, its own matrix-product kernels with the elementwise work fused in where they "
                        "are faster); default off")
    p.add_argument("--profile", action="store_true",
                   help="also profile two steps per row: GPU time by kind (products, WKV, fused elementwise, "
                        "optimiser, other) and GPU idle time, as a second table")
    p.add_argument("--out", type=Path, default=REPO / "out" / "bench_train", help="folder for bench_train.md/.csv")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: check the script and a config without a GPU (the PyTorch WKV; no memory or MFU)")
    args = p.parse_args(argv)
    args.micro_batch, args.mode_micro_batch = parse_micro_batches(p, args.micro_batch, args.configs, args.grad_cp)
    if args.steps < 1 or args.warmup < 0 or args.ctx_len < 1 or args.accumulate < 1:
        p.error("--steps, --accumulate and --ctx-len must be positive, --warmup 0 or more")
    if args.kernel is None:
        args.kernel = "torch" if args.device == "cpu" else "cuda"
    if args.device == "cpu" and args.kernel != "torch":
        p.error(f"--device cpu runs the PyTorch WKV: pass --kernel torch (got --kernel {args.kernel})")
    return args


def parse_micro_batches(p: argparse.ArgumentParser, values: list[str] | None, configs: list[str],
                        modes: list[str | None]) -> tuple[list[int] | None, dict[str, int]]:
    """--micro-batch's values: one per config (or one for all), or MODE=N caps per checkpointing mode."""
    if values is None:
        return None, {}
    per_mode = [v for v in values if "=" in v]
    if per_mode and len(per_mode) != len(values):
        p.error("--micro-batch takes numbers (per config) or MODE=N pairs (per checkpointing mode), not both")

    def count(text: str, what: str) -> int:
        if not text.isdigit() or int(text) < 1:
            p.error(f"--micro-batch {what}: {text!r} is not a positive whole number")
        return int(text)

    if not per_mode:
        if len(values) not in (1, len(configs)):
            p.error(f"--micro-batch takes one value or one per config ({len(configs)}), got {len(values)}")
        return [count(v, "value") for v in values], {}
    caps = {}
    for value in per_mode:
        mode, _, number = value.partition("=")
        if mode not in modes:
            named = " ".join(m for m in modes if m)
            p.error(f"--micro-batch {value}: {mode!r} is not among the --grad-cp modes run "
                    f"({named or 'none given'}): add --grad-cp {mode}, or name one of those")
        caps[mode] = count(number, value)
    return None, caps


def candidates(fixed: int | None, cap: int | None) -> list[int]:
    """The micro-batches to try, largest first: exactly `fixed`, or the defaults from `cap` down."""
    if fixed is not None:
        return [fixed]
    if cap is None:
        return list(MICRO_BATCHES)
    return [cap, *(b for b in MICRO_BATCHES if b < cap)]


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA allocation failures: torch's own, and cuBLAS failing to get a workspace."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and ("out of memory" in str(err) or "ALLOC_FAILED" in str(err))


class Bench:
    """One config's model, optimiser and step function on the GPU (or the CPU, to check the script)."""

    def __init__(self, cfg, weights: str, compile_mode: str, device: str = "cuda"):
        from rwkv_train.compiling import compile_fn
        from rwkv_train.models import build_model
        from rwkv_train.module import RWKVModule

        self.cfg, self.device = cfg, device
        self.model = build_model(cfg.model, device=device)  # float32: the weights the optimiser steps
        # The real optimiser: parameter groups, fused AdamW and LR schedule of the training module.
        optimizers = RWKVModule(cfg, self.model, total_steps=1000).configure_optimizers()
        self.optimizer = optimizers["optimizer"]
        self.schedule = optimizers["lr_scheduler"]["scheduler"]
        # The model forward and backward run on: a bf16 copy, or the float32 model itself under autocast.
        self.compute = copy.deepcopy(self.model).to(torch.bfloat16) if weights == "bf16" else self.model
        self.masters = list(self.model.parameters())
        self.copies = list(self.compute.parameters())
        self.autocast = torch.autocast(device, dtype=torch.bfloat16) if weights == "fp32" else nullcontext()
        self.compute.grad_cp = cfg.train.grad_cp
        self.compute.train()
        if compile_mode.startswith("blocks"):
            self.compute.compile_blocks(autotune=compile_mode == "blocks-autotune")  # train.compile runs "blocks"
        self.loss_fn: Callable = compile_fn(self.compute.loss) if compile_mode == "loss" else self.compute.loss
        self.params = sum(p.numel() for p in self.model.parameters())

    def step(self, micro_batch: int, accumulate: int = 1) -> float:
        """Forward + backward on `accumulate` micro-batches of random tokens, then the optimiser step;
        returns the summed loss (a sync, as in training)."""
        ctx_len, vocab = self.cfg.data.ctx_len, self.cfg.model.vocab_size
        losses = []
        for _ in range(accumulate):
            tokens = torch.randint(0, vocab, (micro_batch, ctx_len + 1), device=self.device)
            idx, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
            with self.autocast:
                loss = self.loss_fn(idx, targets) / accumulate
            loss.backward()
            losses.append(loss.detach())
            if self.compute is not self.model:  # the bf16 gradients summed into the float32 master weights'
                for master, copy_ in zip(self.masters, self.copies):
                    if copy_.grad is not None:
                        master.grad = copy_.grad.float() if master.grad is None else master.grad.add_(copy_.grad)
                        copy_.grad = None
        if self.cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.masters, self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        if self.compute is not self.model:
            with torch.no_grad():
                torch._foreach_copy_(self.copies, self.masters)
        return torch.stack(losses).sum().item()

    def fits(self, micro_batch: int, accumulate: int = 1) -> bool:
        """Whether one whole step runs at this micro-batch; memory is released after a failure."""
        try:
            self.step(micro_batch, accumulate)
            return True
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not is_out_of_memory(err):
                raise
        # outside the except block: the traceback, and the activations its frames hold, are gone
        self.optimizer.zero_grad(set_to_none=True)
        self.compute.zero_grad(set_to_none=True)
        release_memory()
        return False

    def close(self) -> None:
        del self.model, self.compute, self.masters, self.copies, self.optimizer, self.schedule, self.loss_fn
        release_memory()


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def load_bench_config(path: str, ctx_len: int, kernel: str, grad_cp: str | None):
    """The config as training would load it, with the benchmark's settings as dotted overrides."""
    from rwkv_train.config import load_config

    overrides = [f"data.ctx_len={ctx_len}", f"model.kernel={kernel.removesuffix('-chunked')}", "train.strategy=auto",
                 "train.devices=1", "train.num_nodes=1"]
    if kernel.startswith("cuda"):  # name the RWKV-7 kernel rather than take the config's choice
        overrides.append(f"model.wkv7_chunked={'true' if kernel == 'cuda-chunked' else 'false'}")
    if grad_cp is not None:
        overrides.append("train.grad_cp=" + {"on": "true", "off": "false"}.get(grad_cp, grad_cp))
    return load_config(resolve(path), overrides)


def resolve(path: str) -> Path:
    """A config path as given, or relative to the repository (the defaults work from any directory)."""
    given = Path(path)
    return given if given.exists() or given.is_absolute() else REPO / given


def bench_config(path: str, tries: list[int], grad_cp: str | None, args: argparse.Namespace) -> Result:
    from rwkv_train.flops import flops_per_token, mfu, peak_flops

    cfg = load_bench_config(path, args.ctx_len, args.kernel, grad_cp)
    per_token = flops_per_token(cfg.model, cfg.data.ctx_len)
    cuda = args.device == "cuda"
    bench = Bench(cfg, args.weights, args.compile, args.device)
    result = Result(config=Path(path).stem, params=bench.params, micro_batch=None, ctx_len=cfg.data.ctx_len,
                    accumulate=args.accumulate, grad_cp=cfg.train.grad_cp, kernel=args.kernel, weights=args.weights,
                    compiled=args.compile,
                    gflop_per_token=round(per_token / 1e9, 6), device=torch.cuda.get_device_name() if cuda else "cpu")
    try:
        chosen = next((b for b in tries if bench.fits(b, args.accumulate)), None)
        if chosen is None:
            print(f"{result.config}: out of memory at micro-batch {tries[-1]}", file=sys.stderr)
            return result
        result.micro_batch = chosen
        print(f"{result.config}: micro-batch {chosen} x {cfg.data.ctx_len}, {args.accumulate} per step, "
              f"timing {args.steps} steps", flush=True)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.warmup):
            bench.step(chosen, args.accumulate)
        synchronize(args.device)
        start = time.perf_counter()
        for _ in range(args.steps):
            bench.step(chosen, args.accumulate)
        synchronize(args.device)
        elapsed = time.perf_counter() - start
        if args.profile:
            result.profile_ms = profile_step(bench, chosen, args.accumulate)
    finally:
        bench.close()
    tokens_per_s = chosen * args.accumulate * cfg.data.ctx_len * args.steps / elapsed
    achieved = mfu(tokens_per_s, per_token, peak_flops(torch.cuda.current_device())) if cuda else None
    result.tokens_per_s = round(tokens_per_s, 1)
    result.step_s = round(elapsed / args.steps, 4)
    result.peak_mem_gib = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
    result.mfu = None if achieved is None else round(achieved, 4)
    return result


HEADER = ("config", "params", "micro-batch", "ctx", "accumulate", "grad-cp", "tokens/s", "peak mem GiB", "MFU %")


def table_rows(results: list[Result]) -> list[tuple[str, ...]]:
    rows = []
    for r in results:
        ran = r.tokens_per_s is not None
        rows.append((
            r.config,
            f"{r.params / 1e9:.2f}B" if r.params >= 1e9 else f"{r.params / 1e6:.1f}M",
            str(r.micro_batch) if r.micro_batch else "OOM",
            str(r.ctx_len),
            str(r.accumulate),
            {True: "on", False: "off"}.get(r.grad_cp, r.grad_cp),
            f"{r.tokens_per_s:,.0f}" if ran else "-",
            f"{r.peak_mem_gib:.1f}" if r.peak_mem_gib is not None else "-",
            f"{100 * r.mfu:.1f}" if r.mfu is not None else "-",
        ))
    return rows


def format_text(rows: list[tuple[str, ...]]) -> str:
    """A plain-text table: the first column left-aligned, the numbers right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADER)]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(HEADER), *(line(r) for r in rows)])


def format_markdown(rows: list[tuple[str, ...]], notes: str, results: list[Result] = ()) -> str:
    out = [notes, "", "| " + " | ".join(HEADER) + " |", "|" + "|".join(["---"] + ["---:"] * (len(HEADER) - 1)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    profiled = [r for r in results if r.profile_ms]
    if profiled:
        out += ["", "Where a step goes (--profile, two steps under torch.profiler): ms per step and share of it", "",
                "| config | grad-cp | micro-batch | step ms | " + " | ".join(PART_TITLES[p] for p in PARTS) + " |",
                "|---|---|---:|---:|" + "---:|" * len(PARTS)]
        for r in profiled:
            total = sum(r.profile_ms.values())
            cells = [f"{r.profile_ms[p]:.1f} ({100 * r.profile_ms[p] / total:.0f}%)" for p in PARTS]
            mode = {True: "on", False: "off"}.get(r.grad_cp, r.grad_cp)
            out.append(f"| {r.config} | {mode} | {r.micro_batch} | {total:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: bench_train.py measures GPU training and needs a CUDA device, but torch.cuda.is_available() "
              "is False: run it on a machine with an NVIDIA GPU and a CUDA build of torch "
              "(for CPU throughput use scripts/bench_generations_cpu.py; --device cpu checks this script)",
              file=sys.stderr)
        return 1
    from rwkv_train.errors import UserError

    torch.manual_seed(0)
    weights = ("bf16 weights, float32 master weights" if args.weights == "bf16"
               else "float32 weights under bf16 autocast")
    compiled = {"off": "", "loss": ", torch.compile of the loss", "blocks": ", torch.compile of each block",
                "blocks-autotune": ", torch.compile of each block with max_autotune"}
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (a check of the script, not a benchmark)"
    optimiser = "fused AdamW" if args.device == "cuda" else "AdamW"
    notes = (f"{where}, torch {torch.__version__}, {weights}, {optimiser}, "
             f"WKV kernel {args.kernel}{compiled[args.compile]}; "
             f"{args.warmup} warm-up + {args.steps} timed steps per config, "
             f"{args.accumulate} micro-batch{'es' if args.accumulate > 1 else ''} per optimiser step")
    print(notes, flush=True)
    results = []
    for i, path in enumerate(args.configs):
        fixed = None if args.micro_batch is None else args.micro_batch[min(i, len(args.micro_batch) - 1)]
        for grad_cp in args.grad_cp:
            try:
                results.append(bench_config(path, candidates(fixed, args.mode_micro_batch.get(grad_cp)), grad_cp, args))
            except UserError as err:
                print(f"error: {path}: {err}", file=sys.stderr)
                return 1
            write_tables(results, notes, args.out)  # after every row: a run stopped part-way keeps them

    print()
    print(format_text(table_rows(results)))
    print(f"\nwritten: {args.out / 'bench_train.md'}, {args.out / 'bench_train.csv'}")
    return 0 if all(r.tokens_per_s is not None for r in results) else 1


def csv_row(result: Result) -> dict:
    """A result as one CSV row: its fields, the profile as one column per part (empty without --profile)."""
    row = asdict(result)
    profile = row.pop("profile_ms")
    return row | {f"{part}_ms": round(profile[part], 3) if profile else None for part in PARTS}


def write_tables(results: list[Result], notes: str, out: Path) -> None:
    """bench_train.md and bench_train.csv in `out`, each written whole under a temporary name first."""
    out.mkdir(parents=True, exist_ok=True)
    md, table = out / "bench_train.md", out / "bench_train.csv"
    md.with_suffix(".md.tmp").write_text(format_markdown(table_rows(results), notes, results))
    with table.with_suffix(".csv.tmp").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(csv_row(results[0])))
        writer.writeheader()
        writer.writerows(csv_row(r) for r in results)
    md.with_suffix(".md.tmp").replace(md)
    table.with_suffix(".csv.tmp").replace(table)


if __name__ == "__main__":
    sys.exit(main())
