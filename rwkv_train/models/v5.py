"""RWKV-5 "Eagle" (x052), in plain PyTorch.

Features:
  - parameter names, shapes and initialisation of the reference trainer (RWKV-v5, `--my_testing x052`),
    so checkpoints load in the official runtime (detected there as v5.2) and official ones load here;
  - one forward for GPT mode (whole sequences) and RNN mode (any T with a carried state): state in,
    state out, differentiable through both;
  - the WKV recurrence behind `rwkv_train.ops.wkv_diag.wkv5`, whose pure-PyTorch backend is chunked.

RWKV-5 in one line per head: S_t = diag(w) S_{t-1} + k_t^T v_t, y_t = r_t (S_{t-1} + diag(u) k_t^T v_t),
with a learned per-channel decay w = exp(-exp(time_decay)) constant over time and bonus u = time_faaaa;
out = output(GroupNorm(y / 8) * silu(gate)). Token shift mixes each input with the previous one by a
learned per-channel lerp (time_mix_*: 1 keeps the current token, 0 takes the previous one).

Shapes: B batch, T time, C = n_embd, H heads, N = head_size (C = H * N), V vocab.
State per layer: (att_x_prev (B, C), wkv (B, H, N, N) float32 in [key, value] layout, ffn_x_prev (B, C)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from rwkv_train.models.common import LayerState, RWKVModel, bonus_init, channel_ramp, decay_speed_init, layer_ramps
from rwkv_train.ops.token_mix import token_shift
from rwkv_train.ops.wkv_diag import wkv5

# The reference divides the WKV output by this before ln_x (GroupNorm, eps 1e-5); the official runtime
# folds it into the norm as eps = 1e-5 * 8^2 = 64e-5. Part of the checkpoint format, so not a setting.
HEAD_SIZE_DIVISOR = 8


def default_dim_ffn(n_embd: int) -> int:
    """The reference's channel-mix width for x052/x060: 3.5 C rounded down to a multiple of 32."""
    return int(3.5 * n_embd) // 32 * 32


@dataclass(frozen=True)
class RWKV5Dims:
    """Every dimension of an RWKV-5 model."""

    n_layer: int
    n_embd: int
    head_size: int
    vocab_size: int
    dim_ffn: int

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    @classmethod
    def from_config(cls, model_cfg) -> "RWKV5Dims":
        c = model_cfg.n_embd
        return cls(
            n_layer=model_cfg.n_layer,
            n_embd=c,
            head_size=model_cfg.head_size,
            vocab_size=model_cfg.vocab_size,
            dim_ffn=model_cfg.dim_ffn if model_cfg.dim_ffn is not None else default_dim_ffn(c),
        )

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> "RWKV5Dims":
        """Read every dimension off an official state dict's keys and shapes."""
        decay = state["blocks.0.att.time_decay"]
        if decay.dim() != 2 or decay.shape[1] == 1 or "blocks.0.att.time_faaaa" not in state:
            raise ValueError(
                f"blocks.0.att.time_decay has shape {tuple(decay.shape)} and time_faaaa is "
                f"{'present' if 'blocks.0.att.time_faaaa' in state else 'missing'}: this looks like an RWKV-5.0/5.1 "
                "checkpoint; only RWKV-5.2 (x052: time_decay [H, N], time_faaaa [H, N]) is supported"
            )
        n_head, head_size = state["blocks.0.att.time_faaaa"].shape
        vocab_size, n_embd = state["emb.weight"].shape
        dim_att = state["blocks.0.att.key.weight"].shape[0]
        if dim_att != n_embd or n_head * head_size != n_embd:
            raise ValueError(
                f"this RWKV-5 checkpoint has dim_att={dim_att} ({n_head} heads x {head_size}) but n_embd={n_embd}: "
                "only dim_att == n_embd (the reference default) is supported"
            )
        return cls(
            n_layer=1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks.")),
            n_embd=n_embd,
            head_size=head_size,
            vocab_size=vocab_size,
            dim_ffn=state["blocks.0.ffn.key.weight"].shape[0],
        )


class TimeMix(nn.Module):
    """The RWKV-5 attention replacement: a matrix state per head with a learned constant decay."""

    def __init__(self, dims: RWKV5Dims, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        C, H, N = dims.n_embd, dims.n_head, dims.head_size
        self.n_head, self.head_size = H, N

        self.time_mix_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_v = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_g = nn.Parameter(torch.empty(1, 1, C))
        self.time_decay = nn.Parameter(torch.empty(H, N))  # w = exp(-exp(time_decay))
        self.time_faaaa = nn.Parameter(torch.empty(H, N))  # bonus u of the current token

        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.gate = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C)  # eps 1e-5, applied to y / HEAD_SIZE_DIVISOR

    @torch.no_grad()
    def reset_parameters(self, n_layer: int) -> None:
        """The reference init (RWKV-v5/src/model.py: RWKV_Tmix_x052 and generate_init_weight)."""
        C = self.time_mix_k.shape[-1]
        ratio_0_to_1, ratio_1_to_almost0 = layer_ramps(self.layer_id, n_layer)
        ddd = channel_ramp(C)
        self.time_mix_k.copy_(ddd.pow(ratio_1_to_almost0))
        self.time_mix_v.copy_(ddd.pow(ratio_1_to_almost0) + 0.3 * ratio_0_to_1)
        self.time_mix_r.copy_(ddd.pow(0.5 * ratio_1_to_almost0))
        self.time_mix_g.copy_(ddd.pow(0.5 * ratio_1_to_almost0))
        self.time_decay.copy_(decay_speed_init(C, ratio_0_to_1).view_as(self.time_decay))
        self.time_faaaa.copy_(bonus_init(C, ratio_0_to_1).view_as(self.time_faaaa))

        # generate_init_weight: orthogonal with gain = scale (no aspect-ratio factor), output zero
        nn.init.orthogonal_(self.receptance.weight, gain=1.0)
        nn.init.orthogonal_(self.key.weight, gain=0.1)
        nn.init.orthogonal_(self.value.weight, gain=1.0)
        nn.init.orthogonal_(self.gate.weight, gain=0.1)
        self.output.weight.zero_()
        self.ln_x.weight.fill_(((1 + self.layer_id) / n_layer) ** 0.7)
        self.ln_x.bias.zero_()

    def forward(
        self, x: Tensor, x_prev: Optional[Tensor], wkv_state: Optional[Tensor]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, T, C) normed input. Returns (out, last x, final wkv state)."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        xx = token_shift(x, x_prev)
        xk = torch.lerp(xx, x, self.time_mix_k)  # x * mix + xx * (1 - mix)
        xv = torch.lerp(xx, x, self.time_mix_v)
        xr = torch.lerp(xx, x, self.time_mix_r)
        xg = torch.lerp(xx, x, self.time_mix_g)

        r = self.receptance(xr)
        k = self.key(xk)
        v = self.value(xv)
        g = F.silu(self.gate(xg))
        # log decay -exp(time_decay), at least float32 even under autocast
        lw = -torch.exp(self.time_decay.to(torch.promote_types(self.time_decay.dtype, torch.float32)))

        shape = (B, T, H, N)
        y, wkv_state = wkv5(
            r.view(shape), lw, k.view(shape), v.view(shape), self.time_faaaa, wkv_state, self.kernel,
            chunked=self.wkv_diag_chunked,
        )
        y = self.ln_x(y.reshape(B * T, C).to(x.dtype) / HEAD_SIZE_DIVISOR).view(B, T, C)
        return self.output(y * g), x[:, -1], wkv_state


class ChannelMix(nn.Module):
    """The RWKV-5 feed-forward: token-shifted input, squared ReLU, sigmoid receptance gate."""

    def __init__(self, dims: RWKV5Dims, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        C = dims.n_embd
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, C))
        self.key = nn.Linear(C, dims.dim_ffn, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(dims.dim_ffn, C, bias=False)

    @torch.no_grad()
    def reset_parameters(self, n_layer: int) -> None:
        """The reference init (RWKV_CMix_x052 and generate_init_weight)."""
        _, ratio_1_to_almost0 = layer_ramps(self.layer_id, n_layer)
        ddd = channel_ramp(self.time_mix_k.shape[-1])
        self.time_mix_k.copy_(ddd.pow(ratio_1_to_almost0))
        self.time_mix_r.copy_(ddd.pow(ratio_1_to_almost0))
        nn.init.orthogonal_(self.key.weight, gain=1.0)
        self.receptance.weight.zero_()
        self.value.weight.zero_()

    def forward(self, x: Tensor, x_prev: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        xx = token_shift(x, x_prev)
        xk = torch.lerp(xx, x, self.time_mix_k)
        xr = torch.lerp(xx, x, self.time_mix_r)
        kv = self.value(torch.relu(self.key(xk)) ** 2)
        return torch.sigmoid(self.receptance(xr)) * kv, x[:, -1]


class Block(nn.Module):
    def __init__(self, dims: RWKV5Dims, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.is_first = layer_id == 0  # branched on instead of layer_id: layers 1..n-1 share a compiled graph
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(dims.n_embd)
        self.ln1 = nn.LayerNorm(dims.n_embd)
        self.ln2 = nn.LayerNorm(dims.n_embd)
        self.att = TimeMix(dims, layer_id)
        self.ffn = ChannelMix(dims, layer_id)

    def forward(self, x: Tensor, state: Optional[LayerState]) -> tuple[Tensor, LayerState]:
        if self.is_first:
            x = self.ln0(x)
        att_prev, wkv_prev, ffn_prev = state if state is not None else (None, None, None)
        dx, att_last, wkv_state = self.att(self.ln1(x), att_prev, wkv_prev)
        x = x + dx
        dx, ffn_last = self.ffn(self.ln2(x), ffn_prev)
        return x + dx, LayerState(att_last, wkv_state, ffn_last)


class RWKV5(RWKVModel):
    """An RWKV-5 language model: embedding, n_layer blocks, ln_out, head."""

    version = "v5"

    def __init__(self, dims: RWKV5Dims):
        super().__init__(dims, Block)

