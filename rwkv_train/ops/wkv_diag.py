"""WKV with a diagonal decay: the RWKV-5 (x052) and RWKV-6 (x060) recurrence, in pure PyTorch.

Per batch b and head h, with head size N and the state S laid out as S[k_index, v_index] (the
reference's layout):

    y_t = r_t (S_{t-1} + diag(u) k_t^T v_t)
    S_t = diag(w_t) S_{t-1} + k_t^T v_t

r_t, k_t, v_t are row vectors; u is the per-channel "bonus" of the current token (time_faaaa);
w_t = exp(lw_t) is the per-key-channel decay, and the op takes the log-decay lw <= 0. RWKV-6 has
lw_t = -exp(time_decay + lora(x_t)) per token; RWKV-5 has one lw = -exp(time_decay) for all t.

Two implementations with one contract (r, lw, k, v [B, T, H, N]; u [H, N]; state [B, H, N, N]):
  wkv_diag_recurrent  token by token; the test oracle and the RNN-mode step (T = 1).
  wkv_diag_chunked    chunk by chunk, parallel inside each chunk; the CPU training path.
`wkv5` and `wkv6` are the interfaces the models call; they pick a backend by name.

How the chunked form works (one chunk of L steps from state S0; c_t is the cumulative log-decay
from the chunk start through step t, c_0 = 0, so the decay from step s to step t is exp(c_t - c_s)):

    y_t = (r_t * e^{c_{t-1}}) S0 + sum_{s<t} A_ts v_s + (r_t . (u * k_t)) v_t,
          A_ts = sum_n r_tn k_sn exp(c_{t-1,n} - c_{s,n})
    S_L = diag(e^{c_L}) S0 + sum_s (k_s * e^{c_L - c_s})^T v_s

Every exponent above is <= 0. The only question is how to form A:
  factorised  exp(c_{t-1} - c_s) = exp(c_{t-1} - m) exp(m - c_s) around the chunk's log-space middle
              m = c_L / 2 turns A into one matmul; the factors reach exp(|c_L| / 2), so this is used
              while every chunk's decay stays within a budget (shrinking the chunk down to 8 steps
              if need be; RWKV-5/6 decays at init are far inside it).
  explicit    for stronger decays (RWKV-6 decays can be as strong as exp(-exp(x)) per token), the
              (L, L, N) pairwise decays themselves, all <= 1, formed slice by slice in
              `_IntraChunk` and rebuilt in backward instead of stored. Exact for any decay, about
              three times as slow (forward + backward, head size 64, on the CPU).
The carry S_{c+1} = diag(e^{c_L}) S_c + D_c is elementwise (the decay is diagonal), so it is a cheap
sequential loop over chunks (`_DiagScan`); the inter-chunk outputs are one batched product with the
chunk-start states afterwards.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from rwkv_train.ops import kernels
from rwkv_train.ops.constants import cached

__all__ = ["BACKENDS", "wkv5", "wkv6", "wkv_diag_chunked", "wkv_diag_recurrent"]

BACKENDS = ("torch", "cuda", "auto")
_FORMS = ("auto", "factorised", "explicit")

# Per-step log-decays are clamped at -budget: exp(-120) underflows float32 and exp(-1200) float64,
# so this changes nothing in that precision, and keeps -inf (w = 0) from making inf - inf = NaN.
_LOG_DECAY_FLOOR = {torch.float32: 120.0, torch.float64: 1200.0}

# Largest |total log-decay of a chunk| for which the intra-chunk decays are factorised into two matmul
# operands: the factors reach exp(budget / 2), e^40 (float32, max ~e^88) and e^300 (float64, max
# ~e^709), leaving headroom for the magnitudes of r and k.
_FACTOR_BUDGET = {torch.float32: 80.0, torch.float64: 600.0}

# Chunk length of the explicit form (the fastest there), and the shortest chunk worth factorising.
_EXPLICIT_CHUNK = 8

# Largest number of elements of one (slice, L, L, N) pairwise-decay block formed at once.
_PAIR_BLOCK_ELEMENTS = 1 << 22


def _check_inputs(r: Tensor, lw: Tensor, k: Tensor, v: Tensor, u: Tensor, state: Tensor | None) -> None:
    if r.dim() != 4:
        raise ValueError(f"wkv: expects r, k, v shaped [B, T, H, N], got r with shape {tuple(r.shape)}")
    for name, x in (("lw", lw), ("k", k), ("v", v)):
        if x.shape != r.shape:
            raise ValueError(f"wkv: {name} has shape {tuple(x.shape)}, expected {tuple(r.shape)} like r")
    B, _, H, N = r.shape
    if u.shape != (H, N):
        raise ValueError(f"wkv: u has shape {tuple(u.shape)}, expected {(H, N)} = [H, N]")
    if state is not None and state.shape != (B, H, N, N):
        raise ValueError(f"wkv: state has shape {tuple(state.shape)}, expected {(B, H, N, N)} = [B, H, N, N]")


def wkv_diag_recurrent(
    r: Tensor, lw: Tensor, k: Tensor, v: Tensor, u: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Token-by-token WKV-5/6. r, lw, k, v [B, T, H, N]; u [H, N]; state [B, H, N, N] (None = zeros).

    Returns y [B, T, H, N] and the final state [B, H, N, N] ([key, value] layout), both in r's dtype.
    """
    _check_inputs(r, lw, k, v, u, state)
    B, _, H, N = r.shape
    S = r.new_zeros(B, H, N, N) if state is None else state.to(r.dtype)
    w = torch.exp(lw).unsqueeze(-1)  # (B, T, H, N_k, 1)
    u = u.to(r.dtype).unsqueeze(-1)  # (H, N_k, 1)
    ys = []
    # unbind, not x[:, t]: its backward is one stack, where T index-backwards would cost O(T^2).
    for r_t, w_t, k_t, v_t in zip(r.unbind(1), w.unbind(1), k.unbind(1), v.unbind(1)):
        kv = k_t.unsqueeze(-1) * v_t.unsqueeze(-2)  # k_t^T v_t: (B, H, N_k, N_v)
        ys.append((r_t.unsqueeze(-2) @ (S + u * kv)).squeeze(-2))  # (B, H, N_v)
        S = w_t * S + kv
    y = torch.stack(ys, dim=1) if ys else r.new_zeros(B, 0, H, N)
    return y, S


def _pair_decay(c_ex: Tensor, c_in: Tensor) -> Tensor:
    """exp(c_ex[t] - c_in[s]) for s < t, 0 elsewhere: (X, L, N) each -> (X, L_t, L_s, N)."""
    L = c_ex.shape[-2]
    diff = c_ex.unsqueeze(-2) - c_in.unsqueeze(-3)  # (X, L_t, L_s, N), <= 0 where s < t
    return diff.masked_fill_(~_strict_lower(L, c_ex.device).unsqueeze(-1), -math.inf).exp_()


_STRICT: dict[tuple[int, str], Tensor] = {}


def _strict_lower(L: int, device: torch.device) -> Tensor:
    """(L, L) bool mask of s < t."""
    return cached(_STRICT, (L, str(device)), lambda: torch.ones(L, L, dtype=torch.bool, device=device).tril(-1))


def _plan(lw: Tensor, chunk_len: int, budget: float) -> tuple[int, bool]:
    """(chunk length, factorised?) for these log-decays: the factorised form at the longest chunk whose
    total log-decay provably stays within `budget`, the explicit form when that would be under 8 steps."""
    if torch.compiler.is_compiling() or lw.numel() == 0:
        return min(chunk_len, _EXPLICIT_CHUNK), False  # no data-dependent branching when compiled
    strongest = float(-lw.detach().min())
    if not strongest * chunk_len > budget:  # also true for NaN input, which should just propagate
        return chunk_len, True
    longest = int(budget // strongest)
    if longest >= _EXPLICIT_CHUNK:
        return longest, True
    return min(chunk_len, _EXPLICIT_CHUNK), False


def _slices(total: int, per_row: int):
    step = max(1, _PAIR_BLOCK_ELEMENTS // max(per_row, 1))
    for start in range(0, total, step):
        yield slice(start, min(start + step, total))


class _IntraChunk(torch.autograd.Function):
    """A[x, t, s] = sum_n r[x,t,n] k[x,s,n] exp(c_ex[x,t,n] - c_in[x,s,n]) for s < t, else 0.

    Inputs (X, L, N); output (X, L, L). The (L, L, N) pairwise decays are formed a slice of X at a
    time and rebuilt in backward, so memory stays O(X L N) plus one bounded block.
    """

    @staticmethod
    def forward(ctx, r: Tensor, k: Tensor, c_ex: Tensor, c_in: Tensor) -> Tensor:
        X, L, N = r.shape
        A = r.new_empty(X, L, L)
        for sl in _slices(X, L * L * N):
            e = _pair_decay(c_ex[sl], c_in[sl])  # (x, L_t, L_s, N)
            A[sl] = e.mul_(r[sl].unsqueeze(-2)).mul_(k[sl].unsqueeze(-3)).sum(-1)
        ctx.save_for_backward(r, k, c_ex, c_in)
        return A

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dA: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        r, k, c_ex, c_in = ctx.saved_tensors
        X, L, N = r.shape
        dr, dk, dc_ex, dc_in = (torch.empty_like(x) for x in (r, k, c_ex, c_in))
        for sl in _slices(X, L * L * N):
            G = _pair_decay(c_ex[sl], c_in[sl]).mul_(dA[sl].unsqueeze(-1))  # dA_ts * e_ts
            rs, ks = r[sl].unsqueeze(-2), k[sl].unsqueeze(-3)  # (x, L_t, 1, N), (x, 1, L_s, N)
            dr[sl] = (G * ks).sum(-2)
            G.mul_(rs)
            dk[sl] = G.sum(-3)
            G.mul_(ks)  # dA_ts * (d A_ts / d c_ex_t) = dA_ts r_t k_s e_ts
            dc_ex[sl] = G.sum(-2)
            dc_in[sl] = -G.sum(-3)
        return dr, dk, dc_ex, dc_in


class _DiagScan(torch.autograd.Function):
    """S_{c+1} = w_c * S_c + D_c over chunks c (w scales the key rows), batched over (B*H).

    Inputs S0 [BH, N, N], w [C, BH, N], D [C, BH, N, N]. Returns the state at the start of every
    chunk [C, BH, N, N] and the final state [BH, N, N]. Only the elementwise dS recursion runs
    sequentially in backward; dw for all chunks is one batched reduction afterwards.
    """

    @staticmethod
    def forward(ctx, S0: Tensor, w: Tensor, D: Tensor) -> tuple[Tensor, Tensor]:
        starts = torch.empty_like(D)
        S = S0
        for c in range(D.shape[0]):
            starts[c] = S
            S = torch.addcmul(D[c], w[c].unsqueeze(-1), S)
        ctx.save_for_backward(starts, w)
        return starts, S

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_starts: Tensor | None, d_final: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        starts, w = ctx.saved_tensors
        d_next = torch.empty_like(starts)  # d_next[c] = dL/dS_{c+1}
        dS = torch.zeros_like(starts[0]) if d_final is None else d_final
        for c in range(starts.shape[0] - 1, -1, -1):
            d_next[c] = dS
            dS = w[c].unsqueeze(-1) * dS
            if d_starts is not None:
                dS = dS + d_starts[c]
        dw = (starts * d_next).sum(-1)
        return dS, dw, d_next


def wkv_diag_chunked(
    r: Tensor,
    lw: Tensor,
    k: Tensor,
    v: Tensor,
    u: Tensor,
    state: Tensor | None = None,
    chunk_len: int = 32,
    form: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Chunked WKV-5/6, same contract as `wkv_diag_recurrent` (parallel inside each chunk).

    Any T works (padded internally with lw = 0 and r = k = v = 0, which leaves the state untouched).
    Computes in float32, or float64 for float64 inputs; y comes back in r's dtype and the final state
    in the compute dtype. Differentiable w.r.t. every input and the initial state. Exact for any
    lw <= 0 (see the module docstring for how strong decays are handled). Decay exponents are
    differences of in-chunk cumulative sums, so their absolute error is ~eps * |sum of lw over the
    chunk|: negligible unless a chunk holds decays near the float32 underflow. chunk_len 32 is the
    fastest on a 2-core CPU for head size 64.

    form: "auto" picks the factorised or the explicit intra-chunk form from the decays (see the module
    docstring); "explicit" forces the explicit form at chunk_len; "factorised" forces the factorised
    form at chunk_len, which overflows if a chunk's total log-decay exceeds ~2 x 88 in float32.
    """
    _check_inputs(r, lw, k, v, u, state)
    if chunk_len < 1:
        raise ValueError(f"wkv_diag_chunked: chunk_len must be >= 1, got {chunk_len}")
    if form not in _FORMS:
        raise ValueError(f"wkv_diag_chunked: form must be one of {', '.join(map(repr, _FORMS))}, got {form!r}")
    B, T, H, N = r.shape
    out_dtype = r.dtype
    dt = torch.float64 if r.dtype == torch.float64 else torch.float32
    S0 = r.new_zeros(B, H, N, N, dtype=dt) if state is None else state.to(dt)
    if T == 0:
        return r.new_zeros(B, 0, H, N), S0

    lw = lw.to(dt).clamp(min=-_LOG_DECAY_FLOOR[dt])
    if form == "auto":
        L, factorised = _plan(lw, chunk_len, _FACTOR_BUDGET[dt])
    else:
        L, factorised = chunk_len, form == "factorised"
    L = min(L, T)
    C = math.ceil(T / L)
    pad = C * L - T

    def chunked(x: Tensor) -> Tensor:  # (B, T, H, N) -> (B*H*C, L, N)
        x = x.to(dt)
        if pad:
            x = F.pad(x, (0, 0, 0, 0, 0, pad))
        return x.view(B, C, L, H, N).permute(0, 3, 1, 2, 4).reshape(B * H * C, L, N)

    r, lw, k, v = (chunked(x) for x in (r, lw, k, v))
    u = u.to(dt).view(1, H, 1, 1, N).expand(B, H, C, 1, N).reshape(B * H * C, 1, N)

    c_in = lw.cumsum(dim=-2)  # log-decay from the chunk start through step t: (X, L, N)
    c_ex = F.pad(c_in[:, :-1], (0, 0, 1, 0))  # ... through step t-1: c_ex[t] = c_in[t-1] exactly
    c_end = c_in[:, -1:]  # the whole chunk's log-decay, (X, 1, N)

    if factorised:
        # exp(c_ex[t] - c_in[s]) = exp(c_ex[t] - mid) * exp(mid - c_in[s]) around the chunk's log-space
        # middle: each factor within exp(+-|c_L| / 2), and the pairs kept by the mask are <= 1.
        mid = 0.5 * c_end
        A = (r * torch.exp(c_ex - mid)) @ (k * torch.exp(mid - c_in)).transpose(-1, -2)  # (X, L_t, L_s)
        # Select, never multiply: the discarded upper entries can overflow.
        A = torch.where(_strict_lower(L, A.device), A, A.new_zeros(()))
    elif torch.compiler.is_compiling():
        # Plain ops for the compiler, which fuses the pairwise products into one reduction (and fails
        # to trace _IntraChunk next to _DiagScan inside a checkpointed block).
        A = (_pair_decay(c_ex, c_in) * r.unsqueeze(-2) * k.unsqueeze(-3)).sum(-1)
    else:
        A = _IntraChunk.apply(r, k, c_ex, c_in)  # (X, L_t, L_s), strictly lower
    A = A + torch.diag_embed((r * u * k).sum(-1))  # the current token's bonus on the diagonal
    y = A @ v  # (X, L, N_v)

    r_dec = r * torch.exp(c_ex)  # r_t decayed from the chunk start to step t-1
    k_end = k * torch.exp(c_end - c_in)  # k_s decayed from step s to the chunk end
    D = k_end.transpose(-1, -2) @ v  # the chunk's own contribution to its end state: (X, N_k, N_v)

    def scan_layout(x: Tensor) -> Tensor:  # (B*H*C, ...) -> (C, B*H, ...)
        return x.view(B * H, C, *x.shape[1:]).transpose(0, 1)

    starts, S_final = _DiagScan.apply(
        S0.reshape(B * H, N, N), scan_layout(torch.exp(c_end.squeeze(-2))), scan_layout(D)
    )
    starts = starts.transpose(0, 1).reshape(B * H * C, N, N)  # state at each chunk's start
    y = y + r_dec @ starts  # (X, L, N_v)

    y = y.view(B, H, C * L, N).transpose(1, 2)[:, :T]  # (B, T, H, N)
    return y.to(out_dtype), S_final.view(B, H, N, N)


def _run(
    r: Tensor, lw: Tensor, k: Tensor, v: Tensor, u: Tensor, state: Tensor | None, backend: str, who: str,
    chunked: bool | str,
) -> tuple[Tensor, Tensor]:
    if backend not in BACKENDS:
        raise ValueError(f"{who}: unknown backend {backend!r}; valid choices: {', '.join(repr(x) for x in BACKENDS)}")
    if chunked not in (True, False, "auto"):
        raise ValueError(f"{who}: chunked must be True, False or 'auto', got {chunked!r}")
    if backend != "torch":
        if chunked == "auto":
            chunked = r.shape[-1] in kernels.head_sizes("v6-chunked")
        # The tensor-core kernel where asked for, else (or where "auto" cannot build it) the sequential one.
        for generation in ("v6-chunked", "v" + who[-1]) if chunked else ("v" + who[-1],):
            if kernels.use_cuda(backend, generation, r, r.shape[-1]):
                from rwkv_train.ops.wkv_diag_cuda import wkv5_cuda, wkv6_cuda

                op = wkv5_cuda if who == "wkv5" else wkv6_cuda
                y, s_final = op(r, lw, k, v, u, state, chunked=generation == "v6-chunked")
                return y.to(r.dtype), s_final
    if who == "wkv5":
        lw = lw.expand_as(r)
    # The recurrence runs in float32 or better whatever autocast region the model is in: bf16 state
    # updates would drift.
    with torch.autocast(device_type=r.device.type, enabled=False):
        if r.shape[1] == 1 and r.dtype in (torch.float32, torch.float64):  # one RNN step: no chunk padding
            return wkv_diag_recurrent(r, lw, k, v, u, state)
        return wkv_diag_chunked(r, lw, k, v, u, state)


def wkv5(
    r: Tensor, lw: Tensor, k: Tensor, v: Tensor, u: Tensor, state: Tensor | None = None, backend: str = "torch",
    chunked: bool | str = False,
) -> tuple[Tensor, Tensor]:
    """The WKV-5 interface the RWKV-5 model calls: one log-decay lw [H, N] for every step.

    r, k, v [B, T, H, N]; u [H, N]; state [B, H, N, N] or None. backend: "torch" (chunked pure
    PyTorch), "cuda" (a bf16 kernel) or "auto" (the kernel for CUDA inputs where it builds). The
    kernel is the sequential one (`rwkv_train.ops.wkv_diag_cuda`) with chunked=False, the tensor-core
    one (`rwkv_train.ops.wkv_diag_chunked_cuda`: head sizes 32 and 64, per-step lw >= -8) with
    chunked=True, and with "auto" the tensor-core one where it has the head size (else the sequential
    one). Returns (y, final state).
    """
    if lw.shape != u.shape:
        raise ValueError(f"wkv5: lw has shape {tuple(lw.shape)}, expected {tuple(u.shape)} = [H, N] like u")
    return _run(r, lw, k, v, u, state, backend, "wkv5", chunked)


def wkv6(
    r: Tensor, lw: Tensor, k: Tensor, v: Tensor, u: Tensor, state: Tensor | None = None, backend: str = "torch",
    chunked: bool | str = False,
) -> tuple[Tensor, Tensor]:
    """The WKV-6 interface the RWKV-6 model calls: a log-decay lw [B, T, H, N] per step.

    r, k, v [B, T, H, N]; u [H, N]; state [B, H, N, N] or None. backend and chunked as for `wkv5`.
    Returns (y, final state).
    """
    return _run(r, lw, k, v, u, state, backend, "wkv6", chunked)
