"""Time WKV-7 forward + backward on the CPU: per-token recurrence vs the chunked form.

    python scripts/bench_wkv7_cpu.py                      # demo-sized and 0.1B-sized shapes
    python scripts/bench_wkv7_cpu.py --chunk-lens 8 16 32 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import rwkv_train  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rwkv_train.ops.wkv7 import wkv7_chunked, wkv7_recurrent


def make_inputs(B: int, T: int, H: int, N: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Inputs shaped like the model produces them, all requiring grad."""
    r, k, v = (torch.randn(B, T, H, N, dtype=dtype) for _ in range(3))
    kk = F.normalize(torch.randn(B, T, H, N, dtype=dtype), dim=-1)
    a, b = -kk, kk * torch.sigmoid(torch.randn(B, T, H, N, dtype=dtype))
    lw = -torch.exp(torch.tensor(-0.5, dtype=dtype)) * torch.sigmoid(torch.randn(B, T, H, N, dtype=dtype))
    state = 0.1 * torch.randn(B, H, N, N, dtype=dtype)
    return [x.requires_grad_() for x in (r, lw, k, v, a, b, state)]


def time_fwd_bwd(fn, inputs: list[torch.Tensor], repeats: int) -> tuple[float, float]:
    """Best-of-`repeats` seconds for forward alone and for forward + backward."""
    fwd, both = float("inf"), float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        y, s = fn(*inputs[:6], state=inputs[6])
        t1 = time.perf_counter()
        (y.float().square().sum() + s.float().square().sum()).backward()
        t2 = time.perf_counter()
        fwd, both = min(fwd, t1 - t0), min(both, t2 - t0)
        for x in inputs:
            x.grad = None
    return fwd, both


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["8,512,2,64", "1,2048,12,64"], help="B,T,H,N")
    p.add_argument("--chunk-lens", nargs="+", type=int, default=[8, 16, 32, 64])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-recurrent", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, best of {args.repeats}")
    print(f"{'shape B,T,H,N':>16} {'impl':>14} {'fwd ms':>9} {'fwd+bwd ms':>11} {'speed-up':>9}")
    for shape in args.shapes:
        B, T, H, N = (int(x) for x in shape.split(","))
        inputs = make_inputs(B, T, H, N, torch.float32)
        base = None
        if not args.skip_recurrent:
            fwd, both = time_fwd_bwd(wkv7_recurrent, inputs, args.repeats)
            base = both
            print(f"{shape:>16} {'recurrent':>14} {fwd * 1e3:9.1f} {both * 1e3:11.1f} {'1.0x':>9}")
        for L in args.chunk_lens:
            fn = lambda *x, state, L=L: wkv7_chunked(*x, state=state, chunk_len=L)  # noqa: E731
            time_fwd_bwd(fn, inputs, 1)  # warm-up
            fwd, both = time_fwd_bwd(fn, inputs, args.repeats)
            speed = f"{base / both:.1f}x" if base else "-"
            print(f"{shape:>16} {f'chunked L={L}':>14} {fwd * 1e3:9.1f} {both * 1e3:11.1f} {speed:>9}")


if __name__ == "__main__":
    main()
