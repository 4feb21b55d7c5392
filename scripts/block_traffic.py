"""The memory traffic of a compiled RWKV-7 block's elementwise work, estimated on the CPU.

    python scripts/block_traffic.py                          # the 1.5B block (C 2048, head 64), every grad_cp mode
    python scripts/block_traffic.py --n-embd 4096 --grad-cp off
    python scripts/block_traffic.py --kernels                # also each fused kernel's share and what it computes

Outside its matrix products and the WKV, a block's work (token shift, lerps, LoRA activations, norms,
gates, residuals, and all of their gradients) is memory-bound on a GPU: its time is its bytes over the
memory bandwidth, and at 1.5B it is a large share of a training step. torch.compile fuses that work
into kernels, and inductor estimates the bytes each kernel reads and writes. This script compiles one
block (layer 1: what layers 1..n-1 run) for the CPU, runs a forward and a backward, and reports per
token, in C bf16 values (2 C bytes):

  kept       what the forward leaves for the backward (the block's input excluded)
  forward    the fused kernels' traffic in the forward
  backward   the same in the backward (recomputation included)

and what that comes to per training step (--step-tokens tokens over --layers layers) at --bandwidth.
The WKV runs as a stand-in op that does no work (the CUDA kernel is opaque to the compiler too) but
keeps the chunk start states and sa the chunked kernel keeps, so `kept` is the real block's.

The CPU's code generation fuses a little differently from the GPU's (Triton): the figures are an
estimate for comparing formulations and checkpointing modes, not a measurement of the GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO))

from rwkv_train.ops.wkv7_chunked_cuda import CHUNK_LEN  # noqa: E402

MODES = {"off": False, "on": True, "selective": "selective", "selective-wkv": "selective-wkv"}


def _outputs(r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """y, the chunk start states (one per CHUNK_LEN steps) and sa, uninitialised, shaped as the chunked
    kernel's."""
    B, T, H, N = r.shape
    return torch.empty_like(r), r.new_empty((B, H, (T + CHUNK_LEN - 1) // CHUNK_LEN, N, N)), torch.empty_like(r)


# Named as the CUDA kernels' ops are (rwkv_train::*_forward), so grad_cp "selective-wkv" keeps its outputs.
@torch.library.custom_op("rwkv_train::block_traffic_wkv7_forward", mutates_args=())
def wkv7_stand_in(r: Tensor, lw: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The chunked kernel's outputs without its work."""
    return _outputs(r)


@wkv7_stand_in.register_fake
def _(r, lw, k, v, a, b):
    return _outputs(r)


@torch.library.custom_op("rwkv_train::block_traffic_wkv7_backward", mutates_args=())
def wkv7_stand_in_backward(
    r: Tensor, lw: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, states: Tensor, sa: Tensor, dy: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(torch.empty_like(x) for x in (r, lw, k, v, a, b))


@wkv7_stand_in_backward.register_fake
def _(r, lw, k, v, a, b, states, sa, dy):
    return tuple(torch.empty_like(x) for x in (r, lw, k, v, a, b))


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs, *output[1:])


def _backward(ctx, dy, _dstates, _dsa):
    return wkv7_stand_in_backward(*ctx.saved_tensors, dy)


wkv7_stand_in.register_autograd(_backward, setup_context=_setup_context)


def stand_in_wkv7(r, lw, k, v, a, b, state, backend, chunked):
    """`rwkv_train.ops.wkv7.wkv7`'s signature, on the stand-in op (inputs as the CUDA op wrapper passes them)."""
    r, k, v, a, b = (x.to(torch.bfloat16) for x in (r, k, v, a, b))
    y, *_ = wkv7_stand_in(r, lw.float(), k, v, a, b)
    return y, None


@contextlib.contextmanager
def inductor_byte_counts() -> Iterator[None]:
    """Inductor counts each compiled graph's kernel bytes only while its metrics log is on: turn it on, quietly,
    with its caches off (a cached graph is not counted)."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor import compile_fx

    log = compile_fx.inductor_metrics_log
    saved = (log.level, log.propagate, inductor_config.fx_graph_cache, functorch_config.enable_autograd_cache)
    log.setLevel(logging.INFO)
    log.propagate = False
    inductor_config.fx_graph_cache = False
    functorch_config.enable_autograd_cache = False
    try:
        yield
    finally:
        log.level, log.propagate, inductor_config.fx_graph_cache, functorch_config.enable_autograd_cache = saved


def kernel_bytes(run, *args) -> tuple[list, list]:
    """Run run(*args) and its backward (a random output gradient) with inductor's byte counts on: the
    (scheduler node, bytes) of each fused kernel of the forward, then of the backward (library kernels,
    the matrix products, left out)."""
    from torch._inductor import metrics

    with inductor_byte_counts():
        metrics.reset()
        out = run(*args)
        forward = list(metrics.nodes_num_elem)
        out.backward(torch.randn_like(out))
        backward = list(metrics.nodes_num_elem[len(forward):])

    def fused(nodes) -> list:  # inductor records each kernel's bytes // 4
        return [(node, 4 * n) for node, n in nodes if not node.is_extern()]

    return fused(forward), fused(backward)


def origins(node) -> str:
    """The traced ops a scheduler node computes (for --kernels)."""
    names = []
    for inner in node.get_nodes():
        names += sorted(o.name for o in getattr(getattr(inner, "node", None), "origins", ()))
    return ",".join(dict.fromkeys(names))


def measure(n_embd: int, head_size: int, tokens: int, grad_cp) -> dict:
    """Compile layer 1 of a 2-layer RWKV-7 model with this checkpointing, run it forward and backward once."""
    from rwkv_train.compiling import compile_fn
    from rwkv_train.config import ModelConfig
    from rwkv_train.models import build_model
    from rwkv_train.models import v7 as v7_model

    torch._dynamo.reset()
    cfg = ModelConfig(version="v7", n_layer=2, n_embd=n_embd, head_size=head_size, vocab_size=256, kernel="torch")
    model = build_model(cfg).to(torch.bfloat16)
    model.train()
    model.grad_cp = grad_cp
    block = model.blocks[1]
    x = torch.randn(1, tokens, n_embd, dtype=torch.bfloat16, requires_grad=True)
    v_first = torch.randn(1, tokens, n_embd, dtype=torch.bfloat16, requires_grad=True)
    run = compile_fn(lambda x, v_first: model.run_block(block, x, v_first, None)[0])

    kept: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def keeping(x: Tensor, v_first: Tensor) -> Tensor:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return run(x, v_first)

    real_wkv7, v7_model.wkv7 = v7_model.wkv7, stand_in_wkv7
    try:
        forward, backward = kernel_bytes(keeping, x, v_first)
    finally:
        v7_model.wkv7 = real_wkv7
    outside = {t.untyped_storage().data_ptr() for t in (x, v_first, *model.parameters())}
    unit = tokens * n_embd * 2  # one bf16 C-vector per token
    return {
        "kept": sum(b for ptr, b in kept.items() if ptr not in outside) / unit,
        "forward": [(n / unit, origins(node)) for node, n in forward],
        "backward": [(n / unit, origins(node)) for node, n in backward],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-embd", type=int, default=2048, help="model width C (default 2048, the 1.5B preset's)")
    p.add_argument("--head-size", type=int, default=64, help="head size (default 64)")
    p.add_argument("--tokens", type=int, default=256,
                   help="tokens compiled for (the figures are per token; default 256)")
    p.add_argument("--grad-cp", nargs="+", choices=tuple(MODES), default=list(MODES), help="checkpointing modes")
    p.add_argument("--layers", type=int, default=24, help="layers per step, for the per-step column (default 24)")
    p.add_argument("--step-tokens", type=int, default=8 * 4096, help="tokens per step (default 8 x 4096)")
    p.add_argument("--bandwidth", type=float, default=3.35e12, help="bytes/s for the time column (default H100 SXM)")
    p.add_argument("--kernels", action="store_true", help="also list each fused kernel's traffic and ops")
    args = p.parse_args(argv)
    if args.n_embd % args.head_size or min(args.n_embd, args.head_size, args.tokens, args.layers, args.step_tokens) < 1:
        p.error("--n-embd must be a positive multiple of --head-size, and the counts positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    header = ("grad_cp", "kept", "forward", "backward", "kernels", "GB per step", "ms per step")
    rows = []
    for mode in args.grad_cp:
        got = measure(args.n_embd, args.head_size, args.tokens, MODES[mode])
        fwd, bwd = (sum(b for b, _ in got[k]) for k in ("forward", "backward"))
        gb = (fwd + bwd) * 2 * args.n_embd * args.step_tokens * args.layers / 1e9
        kernels = f"{len(got['forward'])} + {len(got['backward'])}"
        ms = 1e12 * gb / args.bandwidth
        rows.append((mode, f"{got['kept']:.1f}", f"{fwd:.1f}", f"{bwd:.1f}", kernels, f"{gb:.0f}", f"{ms:.0f}"))
        if args.kernels:
            for phase in ("forward", "backward"):
                print(f"{mode}, {phase}:")
                for share, ops in got[phase]:
                    print(f"  {share:6.2f}  {ops[:140]}")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"RWKV-7 block, C={args.n_embd}, head {args.head_size}, compiled for the CPU; per token in C bf16 values; "
          f"per step: {args.step_tokens} tokens x {args.layers} layers at {args.bandwidth / 1e12:.2f} TB/s")
    for r in (header, *rows):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
