"""RWKV-7 (x070) WKV recurrence in pure PyTorch.

Per batch b and head h, with head size N and the state S laid out as S[v_index, k_index]:

    S_t = S_{t-1} (diag(w_t) + a_t b_t^T) + v_t k_t^T
    y_t = S_t r_t

w_t = exp(lw_t) is the per-channel decay (the op takes the log-decay lw <= 0). In the model
a = -kk and b = kk * a_gate, but any a, b are accepted.

Two implementations with one contract (inputs [B, T, H, N], state [B, H, N, N]):
  wkv7_recurrent  token by token; the test oracle and the RNN-mode step (T = 1).
  wkv7_chunked    chunk by chunk, parallel inside each chunk; the CPU training path.
`wkv7` is the single entry point the model calls; it picks a backend by name.

How the chunked form works (one chunk of L steps starting from state S0; c_t is the cumulative
log-decay from the chunk start, c_0 = 0). Write x_t = S_{t-1} a_t. After x_t and v_t are injected
at step s, only the diagonal decay acts on them, so with the pairwise factor e_{ts} = exp(c_t - c_s):

    x_t = S0 (a_t * e^{c_{t-1}}) + sum_{s<t}  x_s (a_t*e^{c_{t-1}-c_s}) . b_s + v_s (a_t*e^{c_{t-1}-c_s}) . k_s
    y_t = S0 (r_t * e^{c_t})     + sum_{s<=t} x_s (r_t*e^{c_t-c_s}) . b_s     + v_s (r_t*e^{c_t-c_s}) . k_s
    S_L = S0 diag(e^{c_L})       + sum_{s<=L} x_s (b_s*e^{c_L-c_s})^T         + v_s (k_s*e^{c_L-c_s})^T

The pairwise factors are split as e^{c_t - c_ref} * e^{c_ref - c_s} around c_ref = c_L / 2 (the
log-space middle of the chunk, per channel), so every factor stays within exp(+-|c_L| / 2) and
every product that survives the causal mask is <= 1. Stacking x_t into X (L x N) gives the unit
lower-triangular system (I - M_ab) X = A_hat S0^T + M_ak V. Splitting off the S0 part,
X = U S0^T + X_v, turns each chunk into an affine map of its initial state,

    Y   = Q S0^T + Y_v                with Q = R_hat + M_rb U,   Y_v = M_rb X_v + M_rk V
    S_L = S0 G + D                    with G = diag(e^{c_L}) + U^T B_bar,   D = X_v^T B_bar + V^T K_bar

All of U, X_v, Q, Y_v, G, D are computed for every chunk at once; only S_{c+1} = S_c G_c + D_c
(one N x N x N product per chunk) runs sequentially, in a small custom autograd function.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from rwkv_train.ops import kernels
from rwkv_train.ops.constants import cached

__all__ = ["wkv7", "wkv7_chunked", "wkv7_recurrent", "BACKENDS"]

BACKENDS = ("torch", "cuda", "auto")

# Largest per-chunk, per-channel total log-decay |c_L| the chunked form accepts. Its factors reach
# exp(|c_L| / 2): e^60 (float32, max ~e^88) and e^600 (float64, max ~e^709) leave headroom for
# the magnitudes of a, b, r, k. Steps with lw below -budget are clamped there: exp(-budget)
# already underflows to zero, so the clamp changes nothing in that precision.
_LOG_DECAY_BUDGET = {torch.float32: 120.0, torch.float64: 1200.0}


def _check_inputs(r: Tensor, lw: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor | None) -> None:
    if r.dim() != 4:
        raise ValueError(f"wkv7 expects inputs shaped [B, T, H, N], got r with shape {tuple(r.shape)}")
    for name, x in (("lw", lw), ("k", k), ("v", v), ("a", a), ("b", b)):
        if x.shape != r.shape:
            raise ValueError(f"wkv7: {name} has shape {tuple(x.shape)}, expected {tuple(r.shape)} like r")
    B, _, H, N = r.shape
    if state is not None and state.shape != (B, H, N, N):
        raise ValueError(f"wkv7: state has shape {tuple(state.shape)}, expected {(B, H, N, N)} = [B, H, N, N]")


def wkv7_recurrent(
    r: Tensor, lw: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Token-by-token WKV-7. Inputs [B, T, H, N]; state [B, H, N, N] (None = zeros).

    Returns y [B, T, H, N] and the final state [B, H, N, N], both in the inputs' dtype. This is
    the oracle for the chunked form and the RNN-mode step (T = 1).
    """
    _check_inputs(r, lw, k, v, a, b, state)
    B, T, H, N = r.shape
    S = r.new_zeros(B, H, N, N) if state is None else state.to(r.dtype)
    w = torch.exp(lw)
    ys = []
    # unbind, not x[:, t]: its backward is one stack, where T index-backwards would cost O(T^2).
    for r_t, w_t, k_t, v_t, a_t, b_t in zip(*(x.unbind(1) for x in (r, w, k, v, a, b))):  # (B, H, N) each
        sa = (S @ a_t.unsqueeze(-1)).squeeze(-1)  # S_{t-1} a_t: (B, H, N_v)
        S = S * w_t.unsqueeze(-2) + sa.unsqueeze(-1) * b_t.unsqueeze(-2) + v_t.unsqueeze(-1) * k_t.unsqueeze(-2)
        ys.append((S @ r_t.unsqueeze(-1)).squeeze(-1))  # (B, H, N_v)
    y = torch.stack(ys, dim=1) if ys else r.new_zeros(B, 0, H, N)
    return y, S


class _StateScan(torch.autograd.Function):
    """S_{c+1} = S_c G_c + D_c over chunks c, batched over (B*H).

    Inputs S0 [BH, N, N], G [C, BH, N, N], D [C, BH, N, N]. Returns the state at the start of
    every chunk [C, BH, N, N] and the final state [BH, N, N]. A custom backward keeps only the
    dS recursion sequential; dG for all chunks is one batched product afterwards.
    """

    @staticmethod
    def forward(ctx, S0: Tensor, G: Tensor, D: Tensor) -> tuple[Tensor, Tensor]:
        C = G.shape[0]
        starts = torch.empty_like(D)
        S = S0
        for c in range(C):
            starts[c] = S
            S = torch.baddbmm(D[c], S, G[c])
        ctx.save_for_backward(starts, G)
        return starts, S

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_starts: Tensor | None, d_final: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        starts, G = ctx.saved_tensors
        C = G.shape[0]
        d_next = torch.empty_like(starts)  # d_next[c] = dL/dS_{c+1}
        dS = torch.zeros_like(starts[0]) if d_final is None else d_final
        for c in range(C - 1, -1, -1):
            d_next[c] = dS
            dS = dS @ G[c].transpose(-1, -2)
            if d_starts is not None:
                dS = dS + d_starts[c]
        dG = starts.transpose(-1, -2) @ d_next
        return dS, dG, d_next


def _chunk_len_for(lw: Tensor, chunk_len: int, budget: float) -> int:
    """Shrink the chunk when decays are so strong that a chunk's total log-decay exceeds the budget."""
    if torch.compiler.is_compiling() or lw.numel() == 0:
        return chunk_len  # no data-dependent branching inside a compiled graph
    strongest = float(-lw.detach().min())
    if not strongest * chunk_len > budget:  # also true for NaN input, which should just propagate
        return chunk_len
    return max(1, int(budget // strongest))


_MASKS: dict[tuple[int, str], Tensor] = {}


def _causal_mask(L: int, device: torch.device) -> Tensor:
    """(2L, 2L) bool mask over rows (a; r) and columns (b; k): strict for a rows, inclusive for r rows."""

    def build() -> Tensor:
        t = torch.arange(L, device=device)
        strict = t[:, None] > t[None, :]
        incl = t[:, None] >= t[None, :]
        return torch.cat([torch.cat([strict, strict], 1), torch.cat([incl, incl], 1)], 0)

    return cached(_MASKS, (L, str(device)), build)


def wkv7_chunked(
    r: Tensor,
    lw: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    state: Tensor | None = None,
    chunk_len: int = 32,
) -> tuple[Tensor, Tensor]:
    """Chunked WKV-7, same contract as `wkv7_recurrent` (parallel inside each chunk).

    Any T works (padded internally with lw = 0 and r = k = v = a = b = 0, which leaves the state
    untouched). Computes in float32, or float64 for float64 inputs; y comes back in r's dtype and
    the final state in the compute dtype. Differentiable w.r.t. every input and the initial state.
    Runs as asked for per-step lw >= -120 / chunk_len in float32 (-3.75 at the default 32; RWKV-7
    never goes below -0.61); stronger decays shrink the chunk for that call, so the result stays
    exact for any lw <= 0. chunk_len 32 is the fastest on a 2-core CPU (see
    scripts/bench_wkv7_cpu.py); 16 and 64 are within about 10-20%.
    """
    _check_inputs(r, lw, k, v, a, b, state)
    if chunk_len < 1:
        raise ValueError(f"wkv7_chunked: chunk_len must be >= 1, got {chunk_len}")
    B, T, H, N = r.shape
    out_dtype = r.dtype
    dt = torch.float64 if r.dtype == torch.float64 else torch.float32
    budget = _LOG_DECAY_BUDGET[dt]
    S0 = r.new_zeros(B, H, N, N, dtype=dt) if state is None else state.to(dt)
    if T == 0:
        return r.new_zeros(B, 0, H, N), S0

    lw = lw.to(dt).clamp(min=-budget)
    L = min(_chunk_len_for(lw, chunk_len, budget), T)
    C = math.ceil(T / L)
    pad = C * L - T

    def chunked(x: Tensor) -> Tensor:  # (B, T, H, N) -> (B, H, C, L, N)
        x = x.to(dt)
        if pad:
            x = F.pad(x, (0, 0, 0, 0, 0, pad))
        return x.view(B, C, L, H, N).permute(0, 3, 1, 2, 4)

    r, lw, k, v, a, b = (chunked(x) for x in (r, lw, k, v, a, b))

    c_in = lw.cumsum(dim=-2)  # log-decay from the chunk start through step t, (B, H, C, L, N)
    c_ex = c_in - lw  # ... through step t-1 (what a_t sees)
    c_ref = 0.5 * c_in[..., -1:, :]  # log-space middle of the chunk, (B, H, C, 1, N)
    e_ref = torch.exp(c_ref)  # so e_ref^2 = exp(c_L), the whole chunk's decay
    a_rel = a * torch.exp(c_ex - c_ref)
    r_rel = r * torch.exp(c_in - c_ref)
    to_ref = torch.exp(c_ref - c_in)
    b_rel = b * to_ref
    k_rel = k * to_ref

    # All four intra-chunk interaction matrices from one product: rows (a; r), columns (b; k).
    left = torch.cat([a_rel, r_rel], dim=-2)  # (B, H, C, 2L, N)
    right = torch.cat([b_rel, k_rel], dim=-2)  # (B, H, C, 2L, N)
    M = left @ right.transpose(-1, -2)  # (B, H, C, 2L, 2L)
    # a_t interacts with s < t (it sees S_{t-1}); r_t with s <= t. Select, never multiply: the
    # discarded upper entries can overflow, and selection keeps them out of values and gradients.
    M = torch.where(_causal_mask(L, M.device), M, M.new_zeros(()))
    M_a, M_r = M[..., :L, :], M[..., L:, :]  # (B, H, C, L, 2L) each
    Mv = M[..., L:] @ v  # (M_ak V ; M_rk V): (B, H, C, 2L, N_v)

    # (I - M_ab) [U | X_v] = [A_hat | M_ak V]; unitriangular ignores the (zero) diagonal of -M_ab.
    rhs = torch.cat([a_rel * e_ref, Mv[..., :L, :]], dim=-1)  # (B, H, C, L, N_k + N_v)
    UX = torch.linalg.solve_triangular(-M_a[..., :L], rhs, upper=False, unitriangular=True)
    QY = M_r[..., :L] @ UX + torch.cat([r_rel * e_ref, Mv[..., L:, :]], dim=-1)  # (B, H, C, L, N_k + N_v)
    U, Xv = UX[..., :N], UX[..., N:]
    Q, Yv = QY[..., :N], QY[..., N:]

    b_end, k_end = b_rel * e_ref, k_rel * e_ref  # b_s * exp(c_L - c_s), (B, H, C, L, N_k)
    G = U.transpose(-1, -2) @ b_end + torch.diag_embed(e_ref.squeeze(-2) ** 2)  # (B, H, C, N_k, N_k)
    D = torch.cat([Xv, v], dim=-2).transpose(-1, -2) @ torch.cat([b_end, k_end], dim=-2)  # (B, H, C, N_v, N_k)

    def scan_layout(x: Tensor) -> Tensor:  # (B, H, C, N, N) -> (C, B*H, N, N)
        return x.permute(2, 0, 1, 3, 4).reshape(C, B * H, N, N)

    starts, S_final = _StateScan.apply(S0.reshape(B * H, N, N), scan_layout(G), scan_layout(D))
    starts = starts.view(C, B, H, N, N).permute(1, 2, 0, 3, 4)  # (B, H, C, N_v, N_k)

    y = Q @ starts.transpose(-1, -2) + Yv  # (B, H, C, L, N_v)
    y = y.permute(0, 2, 3, 1, 4).reshape(B, C * L, H, N)[:, :T]
    return y.to(out_dtype), S_final.view(B, H, N, N)


def wkv7(
    r: Tensor,
    lw: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    state: Tensor | None = None,
    backend: str = "torch",
    chunked: bool | str = "auto",
) -> tuple[Tensor, Tensor]:
    """The WKV-7 interface the model calls. Inputs [B, T, H, N], state [B, H, N, N] or None.

    backend "torch" runs `wkv7_chunked` (pure PyTorch, the CPU path); "cuda" a bf16 kernel; "auto" the
    kernel for CUDA inputs where it builds, else "torch". The kernel is the sequential one
    (`rwkv_train.ops.wkv7_cuda`) with chunked=False, the tensor-core one (`rwkv_train.ops.wkv7_chunked_cuda`:
    head sizes 32 and 64, per-step lw >= -5) with chunked=True, and with "auto" the tensor-core one where
    it has the head size. Returns (y in r's dtype, final state).
    """
    if chunked not in (True, False, "auto"):
        raise ValueError(f"wkv7: chunked must be True, False or 'auto', got {chunked!r}")
    if backend in ("cuda", "auto"):
        if chunked == "auto":
            chunked = r.shape[-1] in kernels.head_sizes("v7-chunked")
        if chunked and kernels.use_cuda(backend, "v7-chunked", r, r.shape[-1]):
            from rwkv_train.ops.wkv7_chunked_cuda import wkv7_chunked_cuda

            y, s_final = wkv7_chunked_cuda(r, lw, k, v, a, b, state)
            return y.to(r.dtype), s_final
        if kernels.use_cuda(backend, "v7", r, r.shape[-1]):
            from rwkv_train.ops.wkv7_cuda import wkv7_cuda

            y, s_final = wkv7_cuda(r, lw, k, v, a, b, state)
            return y.to(r.dtype), s_final
    if backend in ("torch", "cuda", "auto"):
        # The recurrence runs in float32 or better whatever autocast region the model is in (bf16 state
        # updates would drift, and CPU autocast would hand bf16 to the triangular solve).
        with torch.autocast(device_type=r.device.type, enabled=False):
            if r.shape[1] == 1 and r.dtype in (torch.float32, torch.float64):  # one RNN step: no chunk padding
                return wkv7_recurrent(r, lw, k, v, a, b, state)
            return wkv7_chunked(r, lw, k, v, a, b, state)
    raise ValueError(f"wkv7: unknown backend {backend!r}; valid choices: {', '.join(repr(x) for x in BACKENDS)}")
