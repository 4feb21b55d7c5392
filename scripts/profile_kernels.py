"""Per-kernel GPU time of one forward + backward of each WKV CUDA op (where the time goes).

    python scripts/profile_kernels.py                  # v4, v6, v7, v7-chunked at B=8, T=4096, C=4096, head 64
    python scripts/profile_kernels.py --shape 1 32768 4096 --generations v7

The op gets what the model hands it in bf16 training (r, k, v, a, b in bf16 requiring gradients; the
decays and bonus in float32) and y's gradient directly, so every kernel in the table is the op's own:
its WKV kernels and whatever its wrapper adds (conversions, fills). Runs it a few times under
torch.profiler and prints one table (generation, kernel, calls, mean GPU time per call in ms), then
per generation one line: the median time of a whole forward + backward (CUDA events, outside the
profiler) against the sum of its kernels, the difference being launch gaps and host work the GPU waited
for. Inputs are random and shaped like the models' (never zeros).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkv_train.models.v7 import DECAY_SCALE  # noqa: E402
from rwkv_train.ops import kernels  # noqa: E402


def _inputs(generation: str, B: int, T: int, C: int, N: int) -> tuple[list[torch.Tensor], Callable]:
    dev, H = "cuda", C // N
    g = torch.Generator(device=dev).manual_seed(0)

    def leaf(x: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
        return x.to(dtype).requires_grad_()

    def randn(*shape, scale=1.0, dtype=torch.bfloat16):
        return leaf(torch.randn(*shape, device=dev, generator=g) * scale, dtype)

    if generation == "v4":
        from rwkv_train.ops.wkv4_cuda import wkv4_cuda

        w = leaf(-torch.exp(torch.randn(C, device=dev, generator=g) * 0.5 - 1), torch.float32)
        xs = [w, randn(C, scale=0.5, dtype=torch.float32), randn(B, T, C), randn(B, T, C)]
        return xs, lambda w, u, k, v: wkv4_cuda(w, u, k, v)[0]
    if generation in ("v5", "v6", "v6-chunked"):
        from rwkv_train.ops.wkv_diag_cuda import wkv6_cuda

        chunked = generation == "v6-chunked"
        lw = leaf(-torch.exp((torch.randn(B, T, H, N, device=dev, generator=g) - 1).clamp(-8, 2)), torch.float32)
        xs = [randn(B, T, H, N, scale=0.5), lw, randn(B, T, H, N, scale=0.5), randn(B, T, H, N),
              randn(H, N, scale=0.5, dtype=torch.float32)]
        return xs, lambda r, lw, k, v, u: wkv6_cuda(r, lw, k, v, u, chunked=chunked)[0]
    from rwkv_train.ops.wkv7_chunked_cuda import wkv7_chunked_cuda
    from rwkv_train.ops.wkv7_cuda import wkv7_cuda

    op = wkv7_chunked_cuda if generation == "v7-chunked" else wkv7_cuda
    lw = leaf(-DECAY_SCALE * torch.sigmoid(torch.randn(B, T, H, N, device=dev, generator=g)), torch.float32)
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, device=dev, generator=g), dim=-1)
    xs = [randn(B, T, H, N, scale=0.5), lw, randn(B, T, H, N, scale=0.5), randn(B, T, H, N), leaf(-kk), leaf(0.5 * kk)]
    return xs, lambda r, lw, k, v, a, b: op(r, lw, k, v, a, b)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generations", nargs="+", default=["v4", "v6", "v6-chunked", "v7", "v7-chunked"],
                        choices=["v4", "v5", "v6", "v6-chunked", "v7", "v7-chunked"])
    parser.add_argument("--shape", nargs=3, type=int, default=[8, 4096, 4096], metavar=("B", "T", "C"))
    parser.add_argument("--head-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="profiled and timed runs each (default 5)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if not torch.cuda.is_available():
        print("profile_kernels: needs a CUDA device", file=sys.stderr)
        return 1
    from torch.profiler import ProfilerActivity, profile

    B, T, C = args.shape
    print(f"{'gen':<10} {'kernel':<34} {'calls':>5} {'ms/call':>9}")
    steps = []
    for generation in args.generations:
        xs, op = _inputs(generation, B, T, C, args.head_size)
        dy = torch.randn_like(op(*xs).detach())

        def step() -> None:
            for x in xs:
                x.grad = None
            op(*xs).backward(dy)

        for _ in range(2):  # warm-up (and the build, on first use)
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.repeats):
                step()
            torch.cuda.synchronize()
        rows = [e for e in prof.key_averages() if e.device_time_total > 0 and "kernel" in e.key]
        for e in sorted(rows, key=lambda e: -e.device_time_total):
            name = e.key.split("(")[0].replace("wkv::", "").replace("wkv7c::", "").replace("(anonymous namespace)::", "")[:34]
            print(f"{generation:<10} {name:<34} {e.count:>5} {e.device_time_total / e.count / 1000:>9.3f}")
        kernels_ms = sum(e.device_time_total for e in rows) / args.repeats / 1000
        steps.append((generation, kernels.median_cuda_ms(step, args.repeats), kernels_ms))
    print()
    for generation, step_ms, kernels_ms in steps:
        print(f"{generation:<10} forward + backward {step_ms:.3f} ms: kernels {kernels_ms:.3f} ms, "
              f"launch gaps and host waits {step_ms - kernels_ms:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
