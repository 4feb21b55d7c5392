"""The benchmark's table, its notes, and the markdown and CSV files it writes."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

from kernel_bench.jobs import TITLES, Built, Plan, Result


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
                    text += f" ({best.label.split()[-1].removesuffix('.cu').replace('_for_h100', '')})"
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
            "pre-activation), rwkv7_clampw_v3_for_h100.cu and rwkv7_clampw_v3_for_h100_alt.cu (its two H100 "
            "options), wkv7_cuda.cu (the earlier kernel; takes w = log(-lw)); chunk 16, T % 16 == 0."
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
            "Inputs: see make_inputs in scripts/kernel_bench/variants.py. No initial state and no final-state gradient "
            "anywhere (RWKV-LM's training kernels have neither)."
        ),
    ]
