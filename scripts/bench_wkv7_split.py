"""Time the chunked WKV kernels at each split of a head's values over blocks, shape by shape.

    python scripts/bench_wkv7_split.py                        # B x T = 32768 tokens at C = 4096, head 64
    python scripts/bench_wkv7_split.py --shapes 1x32768 8x4096 --channels 2048 --head-size 32
    python scripts/bench_wkv7_split.py --kernels v6-chunked   # the chunked RWKV-5/6 kernel alone

One block per (batch, head) leaves multiprocessors idle where B * H is small (B = 1, long T); the ops
then split each head's values (RWKV-7: the state's value rows; RWKV-6: its value columns) over 2 or
4 blocks (`value_split` picks how many). This prints, per kernel, shape and split, the median forward
and forward + backward time (CUDA events) and marks the split the op picks by itself, so the rule can
be checked against what is fastest on this GPU. Needs sm_90 or later for splits above 1 (the
backward runs each head as a thread block cluster).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkv_train.models.v7 import DECAY_SCALE  # noqa: E402
from rwkv_train.ops import kernels  # noqa: E402
from rwkv_train.ops.wkv7_chunked_cuda import value_split, wkv7_chunked_cuda  # noqa: E402
from rwkv_train.ops.wkv_diag_cuda import wkv6_cuda  # noqa: E402

KERNELS = {"v7-chunked": "Chunked WKV-7", "v6-chunked": "Chunked WKV-6"}


def parse_shape(text: str) -> tuple[int, int]:
    try:
        B, T = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not BxT, e.g. 1x32768") from None
    if B < 1 or T < 1:
        raise argparse.ArgumentTypeError(f"shape {text!r}: B and T must be at least 1")
    return B, T


def inputs(kernel: str, B: int, T: int, C: int, N: int) -> list[torch.Tensor]:
    """The op's inputs as the model makes them, never zeros: RWKV-7's r, lw, k, v, a, b (bf16 leaves, lw
    float32 in (-0.61, 0)); RWKV-6's r, lw, k, v, u (lw = -exp(x), x ~ N(-1, 0.5) clipped to [-2.5, 0.5])."""
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (B, T, C // N, N)

    def randn(scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", generator=g) * scale

    if kernel == "v6-chunked":
        lw = -torch.exp((0.5 * randn() - 1).clamp(-2.5, 0.5))
        u = 0.5 * torch.randn(C // N, N, device="cuda", generator=g)
        xs = [randn(0.5), lw, randn(0.5), randn(), u]
        return [x.to(torch.float32 if i in (1, 4) else torch.bfloat16).requires_grad_() for i, x in enumerate(xs)]
    kk = torch.nn.functional.normalize(randn(), dim=-1)
    lw = -DECAY_SCALE * torch.sigmoid(randn())
    xs = [randn(0.5), lw, randn(0.5), randn(), -kk, 0.5 * kk]
    return [x.to(torch.float32 if i == 1 else torch.bfloat16).requires_grad_() for i, x in enumerate(xs)]


def op(kernel: str, xs: list[torch.Tensor], split: int) -> torch.Tensor:
    """y of one call of the kernel's op at `split` blocks per head."""
    if kernel == "v6-chunked":
        return wkv6_cuda(*xs, chunked=True, split=split)[0]
    return wkv7_chunked_cuda(*xs, split=split)[0]


def time_shape(kernel: str, B: int, T: int, C: int, N: int, splits: list[int], chosen: int,
               repeats: int) -> list[str]:
    """The table's rows for one kernel and shape, one per split (printed as they come); `chosen` is marked."""
    xs = inputs(kernel, B, T, C, N)
    dy = torch.randn(B, T, C // N, N, device="cuda", dtype=torch.bfloat16)
    rows = []
    for split in splits:
        def forward(split=split) -> None:
            with torch.no_grad():
                op(kernel, xs, split)

        def both(split=split) -> None:
            for x in xs:
                x.grad = None
            op(kernel, xs, split).backward(dy)

        forward_ms = kernels.median_cuda_ms(forward, repeats, warmup=2)
        both_ms = kernels.median_cuda_ms(both, repeats, warmup=2)
        mark = " *" if split == chosen else ""
        blocks = B * C // N * split
        rows.append(f"| {kernel} | {B} | {T} | {split}{mark} | {blocks} | {forward_ms:.2f} | {both_ms:.2f} |")
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[(1, 32768), (2, 16384), (4, 8192), (8, 4096)],
                        metavar="BxT", help="batch x sequence length (default: 1x32768 2x16384 4x8192 8x4096)")
    parser.add_argument("--channels", type=int, default=4096, help="C = H x head size (default 4096)")
    parser.add_argument("--head-size", type=int, default=64, choices=kernels.head_sizes("v7-chunked"))
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS),
                        help="the chunked kernels to time (default: both)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per cell (default 10)")
    parser.add_argument("--out", type=Path, help="also write the table to OUT/bench_wkv7_split.md")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.channels % args.head_size:
        parser.error(f"--channels {args.channels} is not a multiple of --head-size {args.head_size}")
    if not torch.cuda.is_available():
        print("bench_wkv7_split: needs a CUDA device", file=sys.stderr)
        return 1
    clusters = torch.cuda.get_device_capability()[0] >= 9
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    C, N = args.channels, args.head_size

    title = (f"{', '.join(KERNELS[k] for k in args.kernels)}, C={C}, head {N}, {torch.cuda.get_device_name()} "
             f"({sms} multiprocessors); median of {args.repeats}, ms; * the op's own choice (value_split)")
    lines = [title, "", "| kernel | B | T | blocks per head | blocks | forward | forward + backward |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for kernel in args.kernels:
        splits = list(kernels.load(kernel, args.head_size).splits) if clusters else [1]
        for B, T in args.shapes:
            lines += time_shape(kernel, B, T, C, N, splits, value_split(B * C // N, splits, sms), args.repeats)
            torch.cuda.empty_cache()
    if not clusters:
        print("(compute capability below 9.0: no thread block clusters, so only one block per head)")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_wkv7_split.md").write_text("\n".join(lines) + "\n")
        print(f"written: {args.out / 'bench_wkv7_split.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
