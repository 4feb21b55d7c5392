"""RWKV-6 "Finch" (x060), in plain PyTorch.

Features:
  - parameter names, shapes and initialisation of the reference trainer (RWKV-v5, `--my_testing x060`),
    so checkpoints load in the official runtime (detected there as v6.0) and official ones load here;
  - one forward for GPT mode (whole sequences) and RNN mode (any T with a carried state): state in,
    state out, differentiable through both;
  - the WKV recurrence behind `rwkv_train.ops.wkv_diag.wkv6`, whose pure-PyTorch backend is chunked.

RWKV-6 is RWKV-5 with data-dependent token shift and decay:
  - token shift: x_* = x + (x_prev - x) * (time_maa_* + lora_*(x)), the five low-rank terms (for w, k, v,
    r, g) computed together from x + (x_prev - x) * time_maa_x through time_maa_w1 / time_maa_w2;
  - decay per token and channel: w_t = exp(-exp(time_decay + tanh(x_w @ time_decay_w1) @ time_decay_w2));
  - per head: S_t = diag(w_t) S_{t-1} + k_t^T v_t, y_t = r_t (S_{t-1} + diag(u) k_t^T v_t), u = time_faaaa;
    out = output(GroupNorm(y, eps 64e-5) * silu(gate)).

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
from rwkv_train.ops.wkv_diag import wkv6

N_MIX = 5  # data-dependent token-shift terms, in the reference's order: w, k, v, r, g
D_MIX_LORA = 32  # the reference's low-rank widths (x060); checkpoints may differ, see from_state_dict
D_DECAY_LORA = 64


def default_dim_ffn(n_embd: int) -> int:
    """The reference's channel-mix width for x052/x060: 3.5 C rounded down to a multiple of 32."""
    return int(3.5 * n_embd) // 32 * 32


@dataclass(frozen=True)
class RWKV6Dims:
    """Every dimension of an RWKV-6 model. Low-rank widths vary between reference copies, so they are explicit."""

    n_layer: int
    n_embd: int
    head_size: int
    vocab_size: int
    dim_ffn: int
    d_mix: int  # width of each of the five token-shift low-rank terms
    d_decay: int  # width of the decay low-rank term

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    @classmethod
    def from_config(cls, model_cfg) -> "RWKV6Dims":
        c = model_cfg.n_embd
        return cls(
            n_layer=model_cfg.n_layer,
            n_embd=c,
            head_size=model_cfg.head_size,
            vocab_size=model_cfg.vocab_size,
            dim_ffn=model_cfg.dim_ffn if model_cfg.dim_ffn is not None else default_dim_ffn(c),
            d_mix=D_MIX_LORA,
            d_decay=D_DECAY_LORA,
        )

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> "RWKV6Dims":
        """Read every dimension off an official state dict's keys and shapes."""
        n_head, head_size = state["blocks.0.att.time_faaaa"].shape
        vocab_size, n_embd = state["emb.weight"].shape
        dim_att = state["blocks.0.att.key.weight"].shape[0]
        if dim_att != n_embd or n_head * head_size != n_embd:
            raise ValueError(
                f"this RWKV-6 checkpoint has dim_att={dim_att} ({n_head} heads x {head_size}) but n_embd={n_embd}: "
                "only dim_att == n_embd (the reference default) is supported"
            )
        return cls(
            n_layer=1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks.")),
            n_embd=n_embd,
            head_size=head_size,
            vocab_size=vocab_size,
            dim_ffn=state["blocks.0.ffn.key.weight"].shape[0],
            d_mix=state["blocks.0.att.time_maa_w2"].shape[1],
            d_decay=state["blocks.0.att.time_decay_w1"].shape[1],
        )


class TimeMix(nn.Module):
    """The RWKV-6 attention replacement: a matrix state per head with data-dependent decay."""

    def __init__(self, dims: RWKV6Dims, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        C, H, N = dims.n_embd, dims.n_head, dims.head_size
        self.n_head, self.head_size = H, N

        self.time_maa_x = nn.Parameter(torch.empty(1, 1, C))
        self.time_maa_w = nn.Parameter(torch.empty(1, 1, C))
        self.time_maa_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_maa_v = nn.Parameter(torch.empty(1, 1, C))
        self.time_maa_r = nn.Parameter(torch.empty(1, 1, C))
        self.time_maa_g = nn.Parameter(torch.empty(1, 1, C))
        self.time_maa_w1 = nn.Parameter(torch.empty(C, N_MIX * dims.d_mix))
        self.time_maa_w2 = nn.Parameter(torch.empty(N_MIX, dims.d_mix, C))
        self.time_decay = nn.Parameter(torch.empty(1, 1, C))
        self.time_decay_w1 = nn.Parameter(torch.empty(C, dims.d_decay))
        self.time_decay_w2 = nn.Parameter(torch.empty(dims.d_decay, C))
        self.time_faaaa = nn.Parameter(torch.empty(H, N))  # bonus u of the current token

        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.gate = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=64e-5)  # 1e-5 * head_size_divisor^2, divisor 8

    @torch.no_grad()
    def reset_parameters(self, n_layer: int) -> None:
        """The reference init (RWKV-v5/src/model.py: RWKV_Tmix_x060 and generate_init_weight)."""
        C = self.time_maa_x.shape[-1]
        ratio_0_to_1, ratio_1_to_almost0 = layer_ramps(self.layer_id, n_layer)
        ddd = channel_ramp(C)
        self.time_maa_x.copy_(1.0 - ddd.pow(ratio_1_to_almost0))
        self.time_maa_w.copy_(1.0 - ddd.pow(ratio_1_to_almost0))
        self.time_maa_k.copy_(1.0 - ddd.pow(ratio_1_to_almost0))
        self.time_maa_v.copy_(1.0 - (ddd.pow(ratio_1_to_almost0) + 0.3 * ratio_0_to_1))
        self.time_maa_r.copy_(1.0 - ddd.pow(0.5 * ratio_1_to_almost0))
        self.time_maa_g.copy_(1.0 - ddd.pow(0.5 * ratio_1_to_almost0))
        self.time_maa_w1.zero_()  # low rank: down-projection zero, up-projection uniform +-0.01
        self.time_maa_w2.uniform_(-0.01, 0.01)
        self.time_decay.copy_(decay_speed_init(C, ratio_0_to_1).view_as(self.time_decay))
        self.time_decay_w1.zero_()
        self.time_decay_w2.uniform_(-0.01, 0.01)
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
        xx = token_shift(x, x_prev) - x

        # the five data-dependent mixing terms from one low-rank pair: (B, T, 5 * d_mix) -> (5, B*T, C)
        xxx = torch.tanh((x + xx * self.time_maa_x) @ self.time_maa_w1)
        xxx = torch.bmm(xxx.view(B * T, N_MIX, -1).transpose(0, 1), self.time_maa_w2)
        mw, mk, mv, mr, mg = xxx.view(N_MIX, B, T, C).unbind(dim=0)

        xw = x + xx * (self.time_maa_w + mw)
        xk = x + xx * (self.time_maa_k + mk)
        xv = x + xx * (self.time_maa_v + mv)
        xr = x + xx * (self.time_maa_r + mr)
        xg = x + xx * (self.time_maa_g + mg)

        r = self.receptance(xr)
        k = self.key(xk)
        v = self.value(xv)
        g = F.silu(self.gate(xg))
        # log decay -exp(time_decay + lora(xw)), at least float32 even under autocast
        z = self.time_decay + torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2
        lw = -torch.exp(z.to(torch.promote_types(z.dtype, torch.float32)))

        shape = (B, T, H, N)
        y, wkv_state = wkv6(
            r.view(shape), lw.view(shape), k.view(shape), v.view(shape), self.time_faaaa, wkv_state, self.kernel,
            chunked=self.wkv_diag_chunked,
        )
        y = self.ln_x(y.reshape(B * T, C).to(x.dtype)).view(B, T, C)
        return self.output(y * g), x[:, -1], wkv_state


class ChannelMix(nn.Module):
    """The RWKV-6 feed-forward: token-shifted input, squared ReLU, sigmoid receptance gate."""

    def __init__(self, dims: RWKV6Dims, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        C = dims.n_embd
        self.time_maa_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_maa_r = nn.Parameter(torch.empty(1, 1, C))
        self.key = nn.Linear(C, dims.dim_ffn, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(dims.dim_ffn, C, bias=False)

    @torch.no_grad()
    def reset_parameters(self, n_layer: int) -> None:
        """The reference init (RWKV_CMix_x060 and generate_init_weight)."""
        _, ratio_1_to_almost0 = layer_ramps(self.layer_id, n_layer)
        ddd = channel_ramp(self.time_maa_k.shape[-1])
        self.time_maa_k.copy_(1.0 - ddd.pow(ratio_1_to_almost0**3))
        self.time_maa_r.copy_(1.0 - ddd.pow(ratio_1_to_almost0**3))
        nn.init.orthogonal_(self.key.weight, gain=1.0)
        self.receptance.weight.zero_()
        self.value.weight.zero_()

    def forward(self, x: Tensor, x_prev: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        xx = token_shift(x, x_prev) - x
        xk = x + xx * self.time_maa_k
        xr = x + xx * self.time_maa_r
        kv = self.value(torch.relu(self.key(xk)) ** 2)
        return torch.sigmoid(self.receptance(xr)) * kv, x[:, -1]


class Block(nn.Module):
    def __init__(self, dims: RWKV6Dims, layer_id: int):
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


class RWKV6(RWKVModel):
    """An RWKV-6 language model: embedding, n_layer blocks, ln_out, head."""

    version = "v6"

    def __init__(self, dims: RWKV6Dims):
        super().__init__(dims, Block)

