"""Run every CUDA WKV kernel forward and backward once on a tiny case, for compute-sanitizer to watch.

    compute-sanitizer --tool memcheck --error-exitcode 1 python scripts/sanitize_kernels.py
    python scripts/sanitize_kernels.py v7          # one generation, without the sanitizer

One call per generation (B=1, T=33, one head of 64 channels; v4 with C=64 and T=200), from a random
initial state, with every input and the state requiring gradients; T=33 leaves a partial chunk at the
end, and v4's T=200 is cut into several groups of chunks with a partial one last.
The sanitizer reports any out-of-bounds or misaligned access; this script checks that every output
and gradient is finite (outputs start as NaN, so an unwritten element fails) and prints OK.
Needs a CUDA device (the kernels are built on first use).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

try:
    import rwkv_train  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rwkv_train.ops import kernels

GENERATIONS = ("v4", "v5", "v6", "v7", "v7-chunked", "v6-chunked")
B, T, H, N = 1, 33, 1, 64
V4_STEPS = 200  # 13 chunks of 16: the v4 kernel runs them as 3 groups, the last partial


def _leaf(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(device="cuda", dtype=dtype).requires_grad_()


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


def run_v4() -> list[torch.Tensor]:
    from rwkv_train.ops.wkv4_cuda import wkv4_cuda

    C, T = N, V4_STEPS
    w = _leaf(-torch.exp(torch.rand(C) * 8 - 5), torch.float32)
    u = _leaf(0.5 * _randn(C), torch.float32)
    k, v = _leaf((2 * _randn(B, T, C)).clamp(-5, 5), torch.bfloat16), _leaf(_randn(B, T, C), torch.bfloat16)
    bb0 = 1 + torch.rand(B, C, dtype=torch.float64)
    aa0, pp0 = bb0 * 0.5 * _randn(B, C), _randn(B, C)
    state = [_leaf(aa0, torch.float32), _leaf(bb0, torch.float32), _leaf(pp0, torch.float32)]
    y, final = wkv4_cuda(w, u, k, v, tuple(state))
    return _backward([y, *final], [w, u, k, v, *state])


def run_diag(generation: str, split: int | None = None) -> list[torch.Tensor]:
    """RWKV-5 (one lw per channel) or RWKV-6 on the sequential kernel, or with `split` the tensor-core one
    at that many blocks per head."""
    from rwkv_train.ops.wkv_diag_cuda import wkv5_cuda, wkv6_cuda

    r, k, v = (_leaf(_randn(B, T, H, N), torch.bfloat16) for _ in range(3))
    lw_shape = (H, N) if generation == "v5" else (B, T, H, N)
    lw = _leaf(-torch.exp((_randn(*lw_shape) - 1).clamp(-8, 2)), torch.float32)
    u = _leaf(0.5 * _randn(H, N), torch.float32)
    state = _leaf(_randn(B, H, N, N), torch.float32)
    op = wkv5_cuda if generation == "v5" else wkv6_cuda
    y, final = op(r, lw, k, v, u, state) if split is None else op(r, lw, k, v, u, state, chunked=True, split=split)
    return _backward([y, final], [r, lw, k, v, u, state])


def run_v7(split: int | None = None) -> list[torch.Tensor]:
    """The sequential kernel, or with `split` the chunked one at that many blocks per head."""
    from rwkv_train.ops.wkv7_chunked_cuda import wkv7_chunked_cuda
    from rwkv_train.ops.wkv7_cuda import wkv7_cuda

    r, k, v = (_leaf(_randn(B, T, H, N), torch.bfloat16) for _ in range(3))
    lw = _leaf(-0.6 * torch.sigmoid(_randn(B, T, H, N)), torch.float32)
    kk = torch.nn.functional.normalize(_randn(B, T, H, N), dim=-1)
    a, b = _leaf(-kk, torch.bfloat16), _leaf(kk * torch.sigmoid(_randn(B, T, H, N)), torch.bfloat16)
    state = _leaf(_randn(B, H, N, N), torch.float32)
    if split is None:
        y, final = wkv7_cuda(r, lw, k, v, a, b, state)
    else:
        y, final = wkv7_chunked_cuda(r, lw, k, v, a, b, state, split=split)
    return _backward([y, final], [r, lw, k, v, a, b, state])


def _backward(outputs: list[torch.Tensor], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Back-propagate random cotangents into every input; returns the outputs and the gradients."""
    cotangents = [torch.randn_like(o) for o in outputs]
    grads = torch.autograd.grad(outputs, inputs, cotangents)
    return [o.detach() for o in outputs] + list(grads)


def _splits() -> list[int]:
    """One block per head, and where clusters exist (sm_90+) each head split over 4 blocks as a cluster."""
    return [1, 4] if torch.cuda.get_device_capability()[0] >= 9 else [1]


def run_v7_chunked() -> list[torch.Tensor]:
    return [x for split in _splits() for x in run_v7(split=split)]


def run_diag_chunked() -> list[torch.Tensor]:
    return [x for split in _splits() for generation in ("v5", "v6") for x in run_diag(generation, split=split)]


RUNNERS = {"v4": run_v4, "v5": lambda: run_diag("v5"), "v6": lambda: run_diag("v6"), "v7": run_v7,
           "v7-chunked": run_v7_chunked,
           "v6-chunked": run_diag_chunked}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("generations", nargs="*", metavar="GENERATION",
                        help=f"any of {', '.join(GENERATIONS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.generations) - set(GENERATIONS))
    if unknown:
        parser.error(f"unknown generation(s) {', '.join(unknown)}: choose from {', '.join(GENERATIONS)}")
    if not torch.cuda.is_available():
        print("sanitize_kernels: no CUDA device; the kernels need one", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    for generation in args.generations or GENERATIONS:
        # Build (or load from the cache) first, so a compiler problem reads as one, not as a crash below.
        kernels.load(generation, None if generation == "v4" else N)
        with kernels.poisoned_outputs():  # an element a kernel never writes stays NaN and fails below
            results = RUNNERS[generation]()
        torch.cuda.synchronize()
        bad = [i for i, x in enumerate(results) if not torch.isfinite(x.float()).all()]
        if bad:
            print(f"sanitize_kernels: {generation}: non-finite values in result(s) {bad}", file=sys.stderr)
            return 1
        print(f"{generation}: forward and backward ran")
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
