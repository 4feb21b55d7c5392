"""RWKV-4 WKV recurrence in pure PyTorch.

Per batch b and channel c (no heads: every channel has its own scalar state), with the per-step
log-decay w = -exp(time_decay) <= 0 and the bonus u = time_first:

    wkv_t = (sum_{i<t} e^{(t-1-i) w + k_i} v_i  +  e^{u + k_t} v_t) / (sum_{i<t} e^{(t-1-i) w + k_i}  +  e^{u + k_t})

The running sums are kept as the official runtime keeps them, numerator and denominator scaled by
their largest exponent: state (aa, bb, pp) stands for (aa * e^pp, bb * e^pp). After token t,
pp_t = max_{i<=t} ((t-i) w + k_i) (the initial state's pp counts as a term decayed by t+1 steps),
so aa and bb never overflow whatever k and w are, and bb >= 1 once a token has been seen. The
zero state is aa = bb = 0, pp = EMPTY_LOG.

Two implementations with one contract (k, v [B, T, C]; w, u [C]; state (aa, bb, pp) each [B, C]):
  wkv4_recurrent  token by token, exactly the runtime's update; the test oracle and the RNN step.
  wkv4_chunked    chunk-parallel, with a hand-written backward; the CPU training path.
`wkv4` is the single entry point the model calls; it picks a backend by name.

How the chunked form works. A run of tokens summarises to a scaled pair (p, (a, b)): its numerator
and denominator as seen at its last token. Two summaries add with a log-sum-exp (`_merge`) once the
earlier one is decayed to the later one's time (p + n w after n steps). The sequence is cut into
chunks of L tokens; each chunk's summary is one reduction over its tokens, a Hillis-Steele scan over
the summaries (decay L w per chunk) gives the state at every chunk start, and then all chunks advance
together token by token: L sequential steps on [B, T/L, C] slices, O(B T C) work in all. Every merge
subtracts the larger exponent before exp, so nothing overflows for any k, and strong decays only
underflow terms that are negligible next to the largest one. The final pp is the largest exponent,
as in the runtime, so the state returned is the recurrent one, not merely an equivalent one.
The backward runs the same machinery backwards in time on the adjoints (see `_Wkv4Scan`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from rwkv_train.ops import kernels

__all__ = ["BACKENDS", "EMPTY_LOG", "wkv4", "wkv4_chunked", "wkv4_recurrent", "zero_wkv4_state"]

BACKENDS = ("torch", "cuda", "auto")

# pp of the empty state: a term e^EMPTY_LOG is exactly 0 next to any real one, and EMPTY_LOG + t * w
# stays finite (the reference kernel starts from -1e38 too).
EMPTY_LOG = -1e38

Wkv4State = tuple[Tensor, Tensor, Tensor]  # (aa, bb, pp), each [B, C]


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def zero_wkv4_state(batch: int, channels: int, device=None, dtype: torch.dtype = torch.float32) -> Wkv4State:
    """The empty state: aa = bb = 0, pp = EMPTY_LOG, each [batch, channels]."""
    zeros = torch.zeros(batch, channels, device=device, dtype=dtype)
    return zeros, zeros.clone(), torch.full((batch, channels), EMPTY_LOG, device=device, dtype=dtype)


def _check_inputs(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: Wkv4State | None) -> None:
    if k.dim() != 3:
        raise ValueError(f"wkv4 expects k and v shaped [B, T, C], got k with shape {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"wkv4: v has shape {tuple(v.shape)}, expected {tuple(k.shape)} like k")
    B, _, C = k.shape
    for name, x in (("w", w), ("u", u)):
        if x.shape != (C,):
            raise ValueError(f"wkv4: {name} has shape {tuple(x.shape)}, expected ({C},) = [C]")
    if state is not None:
        if len(state) != 3:
            raise ValueError(f"wkv4: state must be a tuple (aa, bb, pp), got {len(state)} tensors")
        for name, x in zip(("aa", "bb", "pp"), state):
            if x.shape != (B, C):
                raise ValueError(f"wkv4: state {name} has shape {tuple(x.shape)}, expected {(B, C)} = [B, C]")


def _initial_state(state: Wkv4State | None, B: int, C: int, dt: torch.dtype, device) -> Wkv4State:
    if state is None:
        return zero_wkv4_state(B, C, device, dt)
    aa, bb, pp = (x.to(dt) for x in state)
    return aa, bb, pp


def wkv4_recurrent(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: Wkv4State | None = None) -> tuple[Tensor, Wkv4State]:
    """Token-by-token WKV-4, the runtime's update. w (log-decay <= 0), u: [C]; k, v: [B, T, C].

    Returns y [B, T, C] in k's dtype and the final (aa, bb, pp), each [B, C], in float32 (float64
    for float64 inputs). This is the oracle for the chunked form and the RNN-mode step (T = 1).
    """
    _check_inputs(w, u, k, v, state)
    B, _, C = k.shape
    dt = _compute_dtype(k)
    w, u = w.to(dt), u.to(dt)
    aa, bb, pp = _initial_state(state, B, C, dt, k.device)
    ys = []
    # unbind, not k[:, t]: its backward is one stack, where T index-backwards would cost O(T^2).
    for k_t, v_t in zip(k.to(dt).unbind(1), v.to(dt).unbind(1)):  # (B, C) each
        ww = u + k_t  # the current token, with its bonus
        p = torch.maximum(pp, ww)
        e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
        ys.append((e1 * aa + e2 * v_t) / (e1 * bb + e2))
        ww = pp + w  # the state decays one step, then takes the token in
        p = torch.maximum(ww, k_t)
        e1, e2 = torch.exp(ww - p), torch.exp(k_t - p)
        aa, bb, pp = e1 * aa + e2 * v_t, e1 * bb + e2, p
    y = torch.stack(ys, dim=1) if ys else k.new_zeros(B, 0, C, dtype=dt)
    return y.to(k.dtype), (aa, bb, pp)


def _merge(p1: Tensor, ab1: Tensor, p2: Tensor, ab2: Tensor) -> tuple[Tensor, Tensor]:
    """(p1, ab1) + (p2, ab2) for scaled sums ab * e^p on a common time base; ab has a leading (a, b) dim."""
    p = torch.maximum(p1, p2)
    return p, torch.exp(p1 - p) * ab1 + torch.exp(p2 - p) * ab2


def _scan(p: Tensor, ab: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Inclusive prefix sums along dim -2 of segments whose summaries decay by w per position.

    p [..., n, C], ab [2, ..., n, C]. Hillis-Steele: after the step with shift s, entry t holds the
    segment (t - 2s, t]; its left part (t - 2s, t - s] is decayed by the s positions that follow it.
    """
    n = p.shape[-2]
    s = 1
    while s < n:
        p_new, ab_new = _merge(p[..., :-s, :] + s * w, ab[..., :-s, :], p[..., s:, :], ab[..., s:, :])
        p = torch.cat([p[..., :s, :], p_new], dim=-2)
        ab = torch.cat([ab[..., :s, :], ab_new], dim=-2)
        s *= 2
    return p, ab


def _prefix_states(
    p_tok: Tensor, ab_tok: Tensor, w: Tensor, p0: Tensor, ab0: Tensor, chunk_len: int
) -> tuple[Tensor, Tensor]:
    """The state after every token, S_t = e^w S_{t-1} + token_t from S_{-1} = (p0, ab0).

    Tokens p_tok [B, T, C], ab_tok [2, B, T, C]; the initial state p0 [B, C], ab0 [2, B, C]. Every chunk
    of L = chunk_len tokens is summarised at once (its sum decayed to its last token), a scan over those
    summaries gives each chunk's start state, and then all chunks advance together, token by token:
    O(B T C) work in L sequential steps over [B, T / L, C] slices.
    """
    B, T, C = p_tok.shape
    L = min(chunk_len, T)
    n = math.ceil(T / L)
    pad = n * L - T  # empty tokens at the very end: they never reach a real position
    if pad:
        p_tok, ab_tok = F.pad(p_tok, (0, 0, 0, pad), value=EMPTY_LOG), F.pad(ab_tok, (0, 0, 0, pad))
    p_tok, ab_tok = p_tok.view(B, n, L, C), ab_tok.view(2, B, n, L, C)

    start_p, start_ab = p0[:, None], ab0[:, :, None]  # the state before chunk 0: (B, 1, C), (2, B, 1, C)
    if n > 1:
        # chunks 0 .. n-2 summed from a zero start, each scaled by its largest exponent
        age = torch.arange(L - 1, -1, -1, device=p_tok.device, dtype=p_tok.dtype)[:, None]  # (L, 1)
        g = p_tok[:, :-1] + age * w  # (B, n-1, L, C): each token's exponent at its chunk's end
        end_p = g.amax(dim=2)
        end_ab = (torch.exp(g - end_p[:, :, None]) * ab_tok[:, :, :-1]).sum(dim=3)  # (2, B, n-1, C)
        end_p, end_ab = _scan(end_p, end_ab, L * w)  # after chunks 0 .. n-2, from zero
        since_start = torch.arange(1, n, device=p_tok.device, dtype=p_tok.dtype)[:, None] * L  # (n-1, 1)
        later_p, later_ab = _merge(p0[:, None] + since_start * w, ab0[:, :, None], end_p, end_ab)
        start_p = torch.cat([start_p, later_p], dim=1)  # (B, n, C)
        start_ab = torch.cat([start_ab, later_ab], dim=2)  # (2, B, n, C)

    out_p, out_ab = torch.empty_like(p_tok), torch.empty_like(ab_tok)
    p, ab = start_p, start_ab
    for i in range(L):  # every chunk takes its i-th token
        p, ab = _merge(p + w, ab, p_tok[:, :, i], ab_tok[:, :, :, i])
        out_p[:, :, i], out_ab[:, :, :, i] = p, ab
    return out_p.view(B, n * L, C)[:, :T], out_ab.view(2, B, n * L, C)[:, :, :T]


class _Wkv4Scan(torch.autograd.Function):
    """y and the final (aa, bb) by the parallel scan; the backward is one more scan, backwards in time.

    Inputs (one compute dtype): w, u [C]; k, v [B, T, C]; aa0, bb0, pp0 [B, C]; ppT [B, C], the final
    state's exponent, computed by the caller with autograd (so its gradient reaches the argmax term).

    Backward, in true (unscaled) terms: y_t reads S_t (the state before token t) through
    dy_t/dA = 1/D_t and dy_t/dB = -y_t/D_t with D_t its denominator; the final state adds (g_aa, g_bb) e^-ppT
    to S_T. The total adjoint M_t = mu_t + e^w M_{t+1} is a prefix sum over reversed time with the
    same decay, so it reuses `_prefix_states`, scaled by a running max like the forward. Then
    dL/dv_t = e^k_t M^a_{t+1}, dL/dk_t = e^k_t (v_t M^a_{t+1} + M^b_{t+1}), dL/dw = sum_t e^w M_{t+1} . S_t,
    and dL/dS_0 = M_0, plus the bonus terms of the current token. Every exponent used is <= ~0.
    """

    @staticmethod
    def forward(ctx, w, u, k, v, aa0, bb0, pp0, ppT, chunk_len: int):
        ab0 = torch.stack([aa0, bb0])
        p, ab = _prefix_states(k, torch.stack([v, torch.ones_like(v)]), w, pp0, ab0, chunk_len)
        prev_p = torch.cat([pp0[:, None], p[:, :-1]], dim=1)  # S_t, the state before token t: (B, T, C)
        prev_ab = torch.cat([ab0[:, :, None], ab[:, :, :-1]], dim=2)  # (2, B, T, C)
        ww = u + k  # the current token, with its bonus
        q = torch.maximum(prev_p, ww)
        e1, e2 = torch.exp(prev_p - q), torch.exp(ww - q)
        y = (e1 * prev_ab[0] + e2 * v) / (e1 * prev_ab[1] + e2)
        to_final = torch.exp(p[:, -1] - ppT)  # 1 up to rounding: rescale the final sums to ppT
        aa, bb = ab[0, :, -1] * to_final, ab[1, :, -1] * to_final
        ctx.save_for_backward(w, u, k, v, prev_p, prev_ab, y, pp0, ppT, aa, bb)
        ctx.chunk_len = chunk_len
        return y, aa, bb

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy: Tensor, g_aa: Tensor, g_bb: Tensor):
        w, u, k, v, prev_p, prev_ab, y, pp0, ppT, aa, bb = ctx.saved_tensors
        ww = u + k
        q = torch.maximum(prev_p, ww)
        e1, e2 = torch.exp(prev_p - q), torch.exp(ww - q)
        g_over_d = gy / (e1 * prev_ab[1] + e2)  # gy / D_t, scaled by e^q_t

        # the current token's direct terms
        gv = g_over_d * e2
        g_bonus = gv * (v - y)  # d/dk_t and d/du through e^{u + k_t}

        # adjoints of S_0 .. S_{T-1} (scale e^-q_t) and S_T (scale e^-ppT), summed backwards in time
        mu_ab = torch.stack([g_over_d, -g_over_d * y]).flip(2)  # (2, B, T, C), reversed time
        m_p, m_ab = _prefix_states((-q).flip(1), mu_ab, w, -ppT, torch.stack([g_aa, g_bb]), ctx.chunk_len)
        m_p, m_ab = m_p.flip(1), m_ab.flip(2)  # M_t for t = 0 .. T-1
        next_p = torch.cat([m_p[:, 1:], -ppT[:, None]], dim=1)  # M_{t+1}: the adjoint of the state after token t
        next_ab = torch.cat([m_ab[:, :, 1:], torch.stack([g_aa, g_bb])[:, :, None]], dim=2)

        into_state = torch.exp(k + next_p)  # e^k_t with M_{t+1}'s scale
        gv = gv + into_state * next_ab[0]
        gk = g_bonus + into_state * (v * next_ab[0] + next_ab[1])
        decayed = torch.exp(w + prev_p + next_p) * (next_ab[0] * prev_ab[0] + next_ab[1] * prev_ab[1])
        gw = decayed.sum(dim=(0, 1))
        gu = g_bonus.sum(dim=(0, 1))

        to_initial = torch.exp(m_p[:, 0] + pp0)  # M_0 = dL/dS_0, in terms of (aa0, bb0, pp0)
        g_aa0, g_bb0 = m_ab[0, :, 0] * to_initial, m_ab[1, :, 0] * to_initial
        g_pp0 = g_aa0 * prev_ab[0, :, 0] + g_bb0 * prev_ab[1, :, 0]
        g_ppT = -(g_aa * aa + g_bb * bb)
        return gw, gu, gk, gv, g_aa0, g_bb0, g_pp0, g_ppT, None


def _default_chunk_len(T: int) -> int:
    """About sqrt(T), a power of two in [8, 64]: balances the L sequential steps against the chunk scan.

    On a 2-core CPU (B=8, C=128) this is within 10% of the best choice at T = 256, 1024 and 4096.
    """
    return min(64, max(8, 2 ** round(math.log2(max(T, 1)) / 2)))


def wkv4_chunked(
    w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: Wkv4State | None = None, chunk_len: int | None = None
) -> tuple[Tensor, Wkv4State]:
    """Chunk-parallel WKV-4, same contract as `wkv4_recurrent`.

    Any T works. Computes in float32, or float64 for float64 inputs; y comes back in k's dtype, the
    state in the compute dtype. Differentiable w.r.t. w, u, k, v and the initial state, for any k and
    any w <= 0 (once: the backward is written out, not itself differentiable). chunk_len: tokens per
    chunk (default about sqrt(T)); any value gives the same result up to rounding.
    """
    _check_inputs(w, u, k, v, state)
    if chunk_len is not None and chunk_len < 1:
        raise ValueError(f"wkv4_chunked: chunk_len must be >= 1, got {chunk_len}")
    B, T, C = k.shape
    chunk_len = chunk_len or _default_chunk_len(T)
    dt = _compute_dtype(k)
    w, u = w.to(dt), u.to(dt)
    aa0, bb0, pp0 = _initial_state(state, B, C, dt, k.device)
    if T == 0:
        return k.new_zeros(B, 0, C), (aa0, bb0, pp0)
    kf, vf = k.to(dt), v.to(dt)
    # The final state's exponent, the largest of its terms (as the runtime keeps it), by autograd: its
    # gradient goes to the one term that attains it.
    age = torch.arange(T - 1, -1, -1, device=k.device, dtype=dt)[:, None]  # steps since token t
    ppT = torch.maximum(pp0 + T * w, (kf + age * w).amax(dim=1))
    y, aa, bb = _Wkv4Scan.apply(w, u, kf, vf, aa0, bb0, pp0, ppT, chunk_len)
    return y.to(k.dtype), (aa, bb, ppT)


def wkv4(
    w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: Wkv4State | None = None, backend: str = "torch"
) -> tuple[Tensor, Wkv4State]:
    """The WKV-4 interface the model calls. w = -exp(time_decay), u = time_first: [C]; k, v: [B, T, C].

    state: (aa, bb, pp) [B, C] each, or None for the zero state. backend "torch" runs the parallel
    `wkv4_chunked` (one-token calls take the recurrent step), "cuda" the bf16 kernel
    (`rwkv_train.ops.wkv4_cuda`), "auto" the kernel for CUDA inputs where it builds, else "torch".
    Returns (y in k's dtype, final state).
    """
    if backend in ("cuda", "auto") and kernels.use_cuda(backend, "v4", k):
        from rwkv_train.ops.wkv4_cuda import wkv4_cuda

        y, state = wkv4_cuda(w, u, k, v, state)
        return y.to(k.dtype), state
    if backend in BACKENDS:
        # The recurrence runs in float32 or better whatever autocast region the model is in: bf16
        # would round the running sums and their exponents.
        with torch.autocast(device_type=k.device.type, enabled=False):
            if k.shape[1] == 1:  # one RNN step: no scan to set up
                return wkv4_recurrent(w, u, k, v, state)
            return wkv4_chunked(w, u, k, v, state)
    raise ValueError(f"wkv4: unknown backend {backend!r}; valid choices: {', '.join(repr(x) for x in BACKENDS)}")
