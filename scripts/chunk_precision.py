"""How the chunked RWKV-7 kernel's bf16 operands move its outputs, simulated in float64 on the CPU.

    python scripts/chunk_precision.py                      # head size 64, T = 1024, one head
    python scripts/chunk_precision.py --T 256 --head-size 32 --seed 3

Replays the forward of cuda/wkv7_chunked.cu chunk by chunk (16 steps) in float64, rounding where the
kernel rounds: the factor tiles and the state's copy for the products to bf16, the products' float32
accumulators to float32. The chunk's triangular system for x and its output y are formed in each of
the ways below, and the table gives y's and the final state's relative error against the exact
float64 recurrence of the same (bf16) inputs:

  recurrence      x and y as float32 recurrences over M (the kernel up to version 8)
  y, M in bf16    y = P_r + M_r [X; V] on tensor cores, M_r rounded to bf16
  y, M hi + lo    the same with M_r as two bf16 parts, its rounding and the rounding of the rest
                  (the kernel's forward since version 9)
  solve, T        x = T (P_a + M_ak V), T = (I - M_ab)^-1, on tensor cores with T and M_ak as two bf16
                  parts and the right-hand side in bf16; y as above (the backward's x in version 10;
                  since version 11 the backward reads the forward's X)

In every row the state update takes X in bf16, as the kernel does. Inputs are drawn as the model makes
them (a = -kk, b = kk * sigmoid, lw in (-0.61, 0)).
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

L = 16  # steps per chunk, as the kernel
MODES = ("recurrence", "y, M in bf16", "y, M hi + lo", "solve, T")


def bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).double()


def f32(x: torch.Tensor) -> torch.Tensor:
    return x.float().double()


def hi_lo(x: torch.Tensor) -> torch.Tensor:
    """x as the sum of its bf16 rounding and the bf16 rounding of the rest: what two bf16 operands carry."""
    return bf16(x) + bf16(x - bf16(x))


def model_like_inputs(T: int, N: int, seed: int) -> list[torch.Tensor]:
    """r, lw, k, v, a, b for one head, [T, N] float64 holding bf16 values (lw float32)."""
    g = torch.Generator().manual_seed(seed)

    def randn() -> torch.Tensor:
        return torch.randn(T, N, generator=g, dtype=torch.float64)

    r, k, v = bf16(randn()), bf16(randn()), bf16(randn())
    kk = F.normalize(randn(), dim=-1)
    a, b = bf16(-kk), bf16(kk * torch.sigmoid(randn()))
    lw = f32(-math.exp(-0.5) * torch.sigmoid(randn()))
    return [r, lw, k, v, a, b]


def exact(r, lw, k, v, a, b) -> tuple[torch.Tensor, torch.Tensor]:
    """The token-by-token recurrence in float64: S' = S diag(w) + (S a) b^T + v k^T, y = S' r."""
    N = r.shape[1]
    S, ys = torch.zeros(N, N, dtype=torch.float64), []
    for t in range(r.shape[0]):
        S = S * lw[t].exp()[None, :] + (S @ a[t])[:, None] * b[t][None, :] + v[t][:, None] * k[t][None, :]
        ys.append(S @ r[t])
    return torch.stack(ys), S


def chunked(r, lw, k, v, a, b, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's chunked forward with x and y formed as `mode` says (one of MODES); T a multiple of L."""
    N = r.shape[1]
    S, ys = torch.zeros(N, N, dtype=torch.float64), []
    strict = torch.tril(torch.ones(L, L, dtype=torch.float64), -1)
    causal = torch.tril(torch.ones(L, L, dtype=torch.float64))
    for t0 in range(0, r.shape[0], L):
        chunk = slice(t0, t0 + L)
        c = lw[chunk].cumsum(0)
        c_ex = torch.cat([torch.zeros(1, N, dtype=torch.float64), c[:-1]])
        c_L, c_ref = c[-1], c[-1] / 2
        A, R, B, K, V = a[chunk], r[chunk], b[chunk], k[chunk], v[chunk]
        left = bf16(torch.cat([A * (c_ex - c_ref).exp(), R * (c - c_ref).exp()]))
        right = bf16(torch.cat([B * (c_ref - c).exp(), K * (c_ref - c).exp()]))
        hat = bf16(torch.cat([A * c_ex.exp(), R * c.exp()]))
        ends = bf16(torch.cat([B * (c_L - c).exp(), K * (c_L - c).exp()]))
        M = f32(left @ right.T)
        P = f32(hat @ bf16(S).T)
        M_ab, M_ak = M[:L, :L] * strict, M[:L, L:] * strict
        M_r = torch.cat([M[L:, :L] * causal, M[L:, L:] * causal], dim=1)
        if mode == "solve, T":
            T = f32(torch.linalg.inv(torch.eye(L, dtype=torch.float64) - M_ab))
            X = f32(hi_lo(T) @ bf16(f32(P[:L] + hi_lo(M_ak) @ V)))
        else:
            X = torch.zeros(L, N, dtype=torch.float64)
            for t in range(L):
                X[t] = P[t] + M_ab[t] @ X + M_ak[t] @ V
            X = f32(X)
        XV = torch.cat([X, V])
        if mode == "recurrence":
            Y = f32(P[L:] + M_r @ XV)
        else:
            M_r = bf16(M_r) if mode == "y, M in bf16" else hi_lo(M_r)
            Y = f32(P[L:] + M_r @ torch.cat([bf16(X), V]))
        ys.append(Y)
        S = f32(S * c_L.exp()[None, :] + bf16(XV).T @ ends)
    return torch.cat(ys), S


def errors(T: int, N: int, seed: int) -> dict[str, tuple[float, float]]:
    """mode -> (y's relative error, the final state's) against the exact recurrence."""
    inputs = model_like_inputs(T, N, seed)
    y_ref, s_ref = exact(*inputs)

    def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
        return ((x - ref).norm() / ref.norm()).item()

    out = {}
    for mode in MODES:
        y, s = chunked(*inputs, mode)
        out[mode] = (rel(y, y_ref), rel(s, s_ref))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=int, default=1024, help="steps, a multiple of 16 (default 1024)")
    parser.add_argument("--head-size", type=int, default=64, help="N (default 64)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.T <= 0 or args.T % L:
        parser.error(f"--T must be a positive multiple of {L}, got {args.T}")
    if args.head_size <= 0:
        parser.error(f"--head-size must be positive, got {args.head_size}")
    print(f"chunked RWKV-7 forward, simulated: T = {args.T}, head size {args.head_size}, seed {args.seed}")
    print(f"| {'x and y':<14} | {'y error':>8} | {'state error':>11} |")
    print(f"|{'-' * 16}|{'-' * 9}:|{'-' * 12}:|")
    for mode, (y_err, s_err) in errors(args.T, args.head_size, args.seed).items():
        print(f"| {mode:<14} | {y_err:8.2e} | {s_err:11.2e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
