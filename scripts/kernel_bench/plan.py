"""The benchmark's plan: which builds and which variants each (generation, shape) row runs."""

from __future__ import annotations

from pathlib import Path

from kernel_bench.jobs import BuildSpec, Job, Plan, Row, Shape, Variant
from kernel_bench.reference import reference_variants


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
                # Both kernels of a generation that has a chunked one; the cell names the faster.
                chunked = {"v7": "v7-chunked", "v6": "v6-chunked", "v5": "v6-chunked"}.get(g)
                if chunked and s.N in kernels.head_sizes(chunked):
                    spec = ours_build(chunked, s.N)
                    builds[spec.key] = spec
                    label = "wkv7_chunked_cuda" if g == "v7" else f"wkv{g[1]}_cuda chunked"
                    jobs.append(Job(row, Variant(f"{g}:ours-cuda-chunked", column, label, spec.key)))
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
