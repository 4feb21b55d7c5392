"""RWKV-7 "Goose" (x070), in plain PyTorch.

Features:
  - parameter names, shapes and initialisation of the reference trainer, so checkpoints load in the
    official runtime and official checkpoints load here;
  - one forward for GPT mode (whole sequences) and RNN mode (any T with a carried state): state in,
    state out, differentiable through both;
  - the WKV recurrence behind `rwkv_train.ops.wkv7.wkv7`, whose pure-PyTorch backend is chunked.

Shapes: B batch, T time, C = n_embd, H heads, N = head_size (C = H * N), V vocab.
State per layer: (att_x_prev (B, C), wkv (B, H, N, N) float32 in [value, key] layout, ffn_x_prev (B, C)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from rwkv_train.models.common import LayerState, RWKVModel, channel_ramp, layer_ramps, orthogonal_
from rwkv_train.ops.token_mix import token_mix
from rwkv_train.ops.wkv7 import wkv7

DECAY_SCALE = math.exp(-0.5)  # decay = exp(-e^-0.5 * sigmoid(z)): every channel keeps >= 54.5% per step


def _lora_width(n_embd: int, factor: float) -> int:
    """The reference's suggested low-rank width: factor * sqrt(C), rounded to a multiple of 32, at least 32."""
    return max(32, int(round(factor * n_embd**0.5 / 32) * 32))


def head_norm(y: Tensor, norm: nn.GroupNorm) -> Tensor:
    """`norm` (a GroupNorm with one group per head) over y (..., H, N), in at least float32 (as GroupNorm
    computes).

    The same as norm(y.reshape(-1, H * N)), written as a reduction over each head's last dimension so
    that compiled code computes a head's mean and variance in the kernels that use them, beside the
    bonus term's sum over the same dimension. With GroupNorm a compiled RWKV-7 block's forward moves 8
    more bf16 values per channel and token (inductor's count, scripts/block_traffic.py).
    """
    H, N = y.shape[-2:]
    yf = y.to(torch.promote_types(y.dtype, torch.float32))
    var, mean = torch.var_mean(yf, dim=-1, keepdim=True, correction=0)
    return (yf - mean) * torch.rsqrt(var + norm.eps) * norm.weight.view(H, N) + norm.bias.view(H, N)


class _LogDecay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w0: Tensor, lora: Tensor) -> Tensor:
        z = w0 + lora
        ctx.save_for_backward(z)
        ctx.w0_shape = w0.shape
        return -DECAY_SCALE * torch.sigmoid(z.to(torch.promote_types(z.dtype, torch.float32)))

    @staticmethod
    def backward(ctx, dlw: Tensor) -> tuple[Tensor, Tensor]:
        (z,) = ctx.saved_tensors
        s = torch.sigmoid(z.to(dlw.dtype))
        dz = (dlw * (-DECAY_SCALE * s * (1 - s))).to(z.dtype)
        # w0's gradient, the sum of dz over tokens, as a product with a row of ones: it reads dz as the
        # low-rank product's backward stored it, where a compiled sum recomputes dz from dlw (float32)
        rows = dz.reshape(-1, dz.shape[-1])
        dw0 = torch.ones(1, rows.shape[0], dtype=rows.dtype, device=rows.device) @ rows
        return dw0.reshape(ctx.w0_shape), dz


def log_decay(w0: Tensor, lora: Tensor) -> Tensor:
    """The log decay -e^-0.5 sigmoid(w0 + lora), in at least float32 (even under autocast).

    w0 (1, 1, C) and the low-rank term (B, T, C). The same values as the expression; the backward forms
    the gradient of w0 + lora once, in lora's dtype, and reads it again for w0's gradient: compiled, a
    1.5B block's backward then moves 4 C-values per token fewer by inductor's count (3 with the product
    that sums it), where autograd's derivative recomputes it from the float32 dlw for the sum over tokens.
    """
    return _LogDecay.apply(w0, lora)


@dataclass(frozen=True)
class RWKV7Dims:
    """Every dimension of an RWKV-7 model. Low-rank widths vary between reference copies, so they are explicit."""

    n_layer: int
    n_embd: int
    head_size: int
    vocab_size: int
    dim_ffn: int
    d_decay: int
    d_aaa: int
    d_mv: int
    d_gate: int

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    @classmethod
    def from_config(cls, model_cfg) -> "RWKV7Dims":
        c = model_cfg.n_embd
        return cls(
            n_layer=model_cfg.n_layer,
            n_embd=c,
            head_size=model_cfg.head_size,
            vocab_size=model_cfg.vocab_size,
            dim_ffn=model_cfg.ffn_width,
            d_decay=_lora_width(c, 2.5),
            d_aaa=_lora_width(c, 2.5),
            d_mv=_lora_width(c, 1.7),
            d_gate=_lora_width(c, 5.0),
        )


    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> "RWKV7Dims":
        """Read every dimension off an official state dict's keys and shapes."""
        n_head, head_size = state["blocks.0.att.r_k"].shape
        vocab_size, n_embd = state["emb.weight"].shape
        n_layer = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        mv_key = "blocks.1.att.v1" if n_layer > 1 else "blocks.0.att.v1"
        return cls(
            n_layer=n_layer,
            n_embd=n_embd,
            head_size=head_size,
            vocab_size=vocab_size,
            dim_ffn=state["blocks.0.ffn.key.weight"].shape[0],
            d_decay=state["blocks.0.att.w1"].shape[1],
            d_aaa=state["blocks.0.att.a1"].shape[1],
            d_mv=state[mv_key].shape[1] if mv_key in state else _lora_width(n_embd, 1.7),
            d_gate=state["blocks.0.att.g1"].shape[1],
        )


class TimeMix(nn.Module):
    """The RWKV-7 attention replacement: a delta-rule state per head with data-dependent decay."""

    def __init__(self, dims: RWKV7Dims, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        # forward branches on this, not on layer_id, so every later layer runs the same code: a compiled
        # block's graph is then shared by layers 1..n-1 instead of being rebuilt for each layer_id
        self.is_first = layer_id == 0
        C, H, N = dims.n_embd, dims.n_head, dims.head_size
        self.n_head, self.head_size = H, N

        self.x_r = nn.Parameter(torch.empty(1, 1, C))
        self.x_w = nn.Parameter(torch.empty(1, 1, C))
        self.x_k = nn.Parameter(torch.empty(1, 1, C))
        self.x_v = nn.Parameter(torch.empty(1, 1, C))
        self.x_a = nn.Parameter(torch.empty(1, 1, C))
        self.x_g = nn.Parameter(torch.empty(1, 1, C))

        self.w0 = nn.Parameter(torch.empty(1, 1, C))  # decay: w0 + tanh(xw @ w1) @ w2
        self.w1 = nn.Parameter(torch.empty(C, dims.d_decay))
        self.w2 = nn.Parameter(torch.empty(dims.d_decay, C))
        self.a0 = nn.Parameter(torch.empty(1, 1, C))  # in-context learning rate: sigmoid(a0 + xa @ a1 @ a2)
        self.a1 = nn.Parameter(torch.empty(C, dims.d_aaa))
        self.a2 = nn.Parameter(torch.empty(dims.d_aaa, C))
        if layer_id > 0:  # value residual towards the first layer's v; layer 0 has none
            self.v0 = nn.Parameter(torch.empty(1, 1, C))
            self.v1 = nn.Parameter(torch.empty(C, dims.d_mv))
            self.v2 = nn.Parameter(torch.empty(dims.d_mv, C))
        self.g1 = nn.Parameter(torch.empty(C, dims.d_gate))  # output gate: sigmoid(xg @ g1) @ g2
        self.g2 = nn.Parameter(torch.empty(dims.d_gate, C))
        self.k_k = nn.Parameter(torch.empty(1, 1, C))
        self.k_a = nn.Parameter(torch.empty(1, 1, C))
        self.r_k = nn.Parameter(torch.empty(H, N))

        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=64e-5)

    @torch.no_grad()
    def reset_parameters(self, n_layer: int) -> None:
        """The reference init (RWKV-v7/train_temp: RWKV_Tmix_x070 and generate_init_weight)."""
        C, N = self.x_r.shape[-1], self.head_size
        ratio_0_to_1, ratio_1_to_almost0 = layer_ramps(self.layer_id, n_layer)
        ddd = channel_ramp(C)
        for name, power in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
            getattr(self, name).copy_(1.0 - ddd.pow(power * ratio_1_to_almost0))

        n = torch.arange(C, dtype=torch.float32)
        linear = n / (C - 1) - 0.5
        zigzag = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
        zigzag = zigzag * zigzag.abs()
        www = -6 + 6 * (n / (C - 1)) ** (1 + ratio_0_to_1**0.3)

        self.w0.copy_((www + 0.5 + zigzag * 2.5).view(1, 1, C))
        self.a0.copy_((-0.19 + zigzag * 0.3 + linear * 0.4).view(1, 1, C))
        self.k_k.copy_((0.71 - linear * 0.1).view(1, 1, C))
        self.k_a.fill_(1.02)
        self.r_k.fill_(-0.04)
        lora = [("w1", "w2"), ("a1", "a2"), ("g1", "g2")]
        if self.layer_id > 0:
            self.v0.copy_((0.73 - linear * 0.4).view(1, 1, C))
            lora.append(("v1", "v2"))
        for first, second in lora:  # down-projection zero, up-projection orthogonal 0.1
            getattr(self, first).zero_()
            orthogonal_(getattr(self, second), 0.1)

        orthogonal_(self.receptance.weight, 1.0)
        orthogonal_(self.key.weight, 0.1)
        orthogonal_(self.value.weight, 1.0)
        self.output.weight.zero_()
        self.ln_x.weight.fill_(((1 + self.layer_id) / n_layer) ** 0.7)
        self.ln_x.bias.zero_()

    def forward(
        self, x: Tensor, v_first: Optional[Tensor], x_prev: Optional[Tensor], wkv_state: Optional[Tensor]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x: (B, T, C) normed input. Returns (out, v_first, last x, final wkv state)."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        xr, xw, xk, xv, xa, xg = token_mix(x, x_prev, self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g)

        r = self.receptance(xr)
        k = self.key(xk)
        v = self.value(xv)
        # log decay in (-e^-0.5, 0), the decay itself being exp(lw); at least float32 even under autocast
        lw = log_decay(self.w0, torch.tanh(xw @ self.w1) @ self.w2)
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        if self.is_first:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)

        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0)  # (B, T, H, N)
        k = k * (1 + (a - 1) * self.k_a)
        shape = (B, T, H, N)
        y, wkv_state = wkv7(
            r.view(shape), lw.view(shape), k.view(shape), v.view(shape), -kk, kk * a.view(shape), wkv_state, self.kernel,
            chunked=self.wkv7_chunked,
        )
        y = head_norm(y.reshape(shape), self.ln_x).to(x.dtype)
        bonus = (r.view(shape) * k.view(shape) * self.r_k).sum(dim=-1, keepdim=True) * v.view(shape)
        out = self.output(((y + bonus) * g.view(shape)).reshape(B, T, C))
        return out, v_first, x[:, -1], wkv_state


class ChannelMix(nn.Module):
    """The RWKV-7 feed-forward: token-shifted input, squared ReLU."""

    def __init__(self, dims: RWKV7Dims, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.x_k = nn.Parameter(torch.empty(1, 1, dims.n_embd))
        self.key = nn.Linear(dims.n_embd, dims.dim_ffn, bias=False)
        self.value = nn.Linear(dims.dim_ffn, dims.n_embd, bias=False)

    @torch.no_grad()
    def reset_parameters(self, n_layer: int) -> None:
        _, ratio_1_to_almost0 = layer_ramps(self.layer_id, n_layer)
        self.x_k.copy_(1.0 - channel_ramp(self.x_k.shape[-1]).pow(ratio_1_to_almost0**4))
        nn.init.orthogonal_(self.key.weight, gain=1.0)  # the reference's plain gain, no aspect-ratio factor
        self.value.weight.zero_()

    def forward(self, x: Tensor, x_prev: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        (k,) = token_mix(x, x_prev, self.x_k)
        return self.value(torch.relu(self.key(k)) ** 2), x[:, -1]


class Block(nn.Module):
    def __init__(self, dims: RWKV7Dims, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.is_first = layer_id == 0  # see TimeMix.is_first
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(dims.n_embd)
        self.ln1 = nn.LayerNorm(dims.n_embd)
        self.ln2 = nn.LayerNorm(dims.n_embd)
        self.att = TimeMix(dims, layer_id)
        self.ffn = ChannelMix(dims, layer_id)

    def forward(
        self, x: Tensor, v_first: Optional[Tensor], state: Optional[LayerState]
    ) -> tuple[Tensor, Tensor, LayerState]:
        if self.is_first:
            x = self.ln0(x)
        att_prev, wkv_prev, ffn_prev = state if state is not None else (None, None, None)
        dx, v_first, att_last, wkv_state = self.att(self.ln1(x), v_first, att_prev, wkv_prev)
        x = x + dx
        dx, ffn_last = self.ffn(self.ln2(x), ffn_prev)
        return x + dx, v_first, LayerState(att_last, wkv_state, ffn_last)


class RWKV7(RWKVModel):
    """An RWKV-7 language model: embedding, n_layer blocks, ln_out, head."""

    version = "v7"

    def __init__(self, dims: RWKV7Dims):
        super().__init__(dims, Block)


    def features(self, idx: Tensor, state: Optional[list[LayerState]]) -> tuple[Tensor, list[LayerState]]:
        """Normed hidden states before the head (B, T, C), and the new state; v_first runs through the blocks."""
        x = self.emb(idx)
        v_first = None
        new_state = []
        for i, block in enumerate(self.blocks):
            x, v_first, s = self.run_block(block, x, v_first, state[i] if state is not None else None)
            new_state.append(s)
        return self.ln_out(x), new_state
