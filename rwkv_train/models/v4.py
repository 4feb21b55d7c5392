"""RWKV-4 (the v4neo trainer), in plain PyTorch.

Features:
  - parameter names, shapes and initialisation of the reference trainer (RWKV-v4neo, without
    TINY_ATT, pos_emb or head_qk), so checkpoints load in the official runtime and official RWKV-4
    checkpoints (Pile, Raven, World) load here;
  - one forward for GPT mode (whole sequences) and RNN mode (any T with a carried state): state in,
    state out, differentiable through both;
  - the WKV recurrence behind `rwkv_train.ops.wkv4.wkv4`, whose pure-PyTorch backend is a parallel scan.

Shapes: B batch, T time, C = n_embd, A = dim_att (= C in every released model), F = dim_ffn, V vocab.
State per layer, in the runtime's order: att_x_prev (B, C), aa, bb, pp (B, A) float32, ffn_x_prev (B, C);
(aa, bb, pp) stand for the running numerator and denominator aa * e^pp and bb * e^pp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from rwkv_train.models.common import RWKVModel, channel_ramp, layer_ramps, orthogonal_
from rwkv_train.ops.token_mix import token_shift
from rwkv_train.ops.wkv4 import wkv4, zero_wkv4_state

# The reference draws emb uniformly in +-lr_init; its train.py default lr_init is 6e-4. The embedding is
# layer-normed (ln0) at once, so this range only sets how fast the embedding moves at the start.
DEFAULT_EMB_RANGE = 6e-4


@dataclass(frozen=True)
class RWKV4Dims:
    """Every dimension of an RWKV-4 model. RWKV-4 has no heads: the config's head_size is not used."""

    n_layer: int
    n_embd: int
    vocab_size: int
    dim_ffn: int
    dim_att: int

    @classmethod
    def from_config(cls, model_cfg) -> RWKV4Dims:
        return cls(
            n_layer=model_cfg.n_layer,
            n_embd=model_cfg.n_embd,
            vocab_size=model_cfg.vocab_size,
            dim_ffn=model_cfg.ffn_width,
            dim_att=model_cfg.n_embd,
        )

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> RWKV4Dims:
        """Read every dimension off an official state dict's keys and shapes."""
        vocab_size, n_embd = state["emb.weight"].shape
        n_layer = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        return cls(
            n_layer=n_layer,
            n_embd=n_embd,
            vocab_size=vocab_size,
            dim_ffn=state["blocks.0.ffn.key.weight"].shape[0],
            dim_att=state["blocks.0.att.key.weight"].shape[0],
        )


class LayerState(NamedTuple):
    att_x_prev: Tensor  # (B, C): last normed input of the time-mix
    aa: Tensor  # (B, A) float32: numerator / e^pp
    bb: Tensor  # (B, A) float32: denominator / e^pp
    pp: Tensor  # (B, A) float32: the largest exponent in the sums
    ffn_x_prev: Tensor  # (B, C): last normed input of the channel-mix


def _mix(x: Tensor, shifted: Tensor, mix: Tensor) -> Tensor:
    """The reference's interpolation between the current and the previous token, written as it writes it."""
    return x * mix + shifted * (1 - mix)


class TimeMix(nn.Module):
    """The RWKV-4 attention replacement: per-channel exponentially decaying averages of v weighted by e^k."""

    def __init__(self, dims: RWKV4Dims, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        C, A = dims.n_embd, dims.dim_att
        self.time_decay = nn.Parameter(torch.empty(A))  # w = -exp(time_decay): log-decay per step
        self.time_first = nn.Parameter(torch.empty(A))  # u: the current token's bonus
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_v = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, C))
        self.key = nn.Linear(C, A, bias=False)
        self.value = nn.Linear(C, A, bias=False)
        self.receptance = nn.Linear(C, A, bias=False)
        self.output = nn.Linear(A, C, bias=False)

    @torch.no_grad()
    def reset_parameters(self, n_layer: int) -> None:
        """The reference init (RWKV-v4neo: RWKV_TimeMix.__init__ and generate_init_weight)."""
        A = self.time_decay.shape[0]
        ratio_0_to_1, ratio_1_to_almost0 = layer_ramps(self.layer_id, n_layer)
        ddd = channel_ramp(self.time_mix_k.shape[-1])

        # decay speeds from -5 (slow: e^-e^-5 per step) to 3 (fast), more fast channels in deeper layers
        h = torch.arange(A, dtype=torch.float64) / max(A - 1, 1)
        self.time_decay.copy_(-5 + 8 * h ** (0.7 + 1.3 * ratio_0_to_1))
        zigzag = torch.tensor([(i + 1) % 3 - 1 for i in range(A)]) * 0.5  # 0, 0.5, -0.5, 0, ...
        self.time_first.copy_(torch.ones(A) * math.log(0.3) + zigzag)

        self.time_mix_k.copy_(ddd.pow(ratio_1_to_almost0))
        self.time_mix_v.copy_(ddd.pow(ratio_1_to_almost0) + 0.3 * ratio_0_to_1)
        self.time_mix_r.copy_(ddd.pow(0.5 * ratio_1_to_almost0))

        # generate_init_weight: key, receptance and output start at zero, value orthogonal
        self.key.weight.zero_()
        self.receptance.weight.zero_()
        orthogonal_(self.value.weight, 1.0)
        self.output.weight.zero_()

    def forward(
        self, x: Tensor, x_prev: Tensor | None, wkv_state: tuple[Tensor, Tensor, Tensor] | None
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]:
        """x: (B, T, C) normed input. Returns (out, last x, final (aa, bb, pp))."""
        xx = token_shift(x, x_prev)
        k = self.key(_mix(x, xx, self.time_mix_k))  # (B, T, A)
        v = self.value(_mix(x, xx, self.time_mix_v))
        r = self.receptance(_mix(x, xx, self.time_mix_r))
        at_least_fp32 = torch.promote_types(self.time_decay.dtype, torch.float32)  # even when the weights are bf16
        w = -torch.exp(self.time_decay.to(at_least_fp32))
        y, wkv_state = wkv4(w, self.time_first.to(at_least_fp32), k, v, wkv_state, backend=self.kernel)
        return self.output(torch.sigmoid(r) * y), x[:, -1], wkv_state


class ChannelMix(nn.Module):
    """The RWKV-4 feed-forward: token-shifted input, squared ReLU, sigmoid receptance gate."""

    def __init__(self, dims: RWKV4Dims, layer_id: int):
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
        """RWKV_ChannelMix.__init__ and generate_init_weight: key orthogonal (gain sqrt(F/C)), the rest zero."""
        _, ratio_1_to_almost0 = layer_ramps(self.layer_id, n_layer)
        ddd = channel_ramp(self.time_mix_k.shape[-1])
        self.time_mix_k.copy_(ddd.pow(ratio_1_to_almost0))
        self.time_mix_r.copy_(ddd.pow(ratio_1_to_almost0))
        orthogonal_(self.key.weight, 1.0)
        self.receptance.weight.zero_()
        self.value.weight.zero_()

    def forward(self, x: Tensor, x_prev: Tensor | None) -> tuple[Tensor, Tensor]:
        xx = token_shift(x, x_prev)
        k = torch.relu(self.key(_mix(x, xx, self.time_mix_k))) ** 2  # (B, T, F)
        r = torch.sigmoid(self.receptance(_mix(x, xx, self.time_mix_r)))
        return r * self.value(k), x[:, -1]


class Block(nn.Module):
    def __init__(self, dims: RWKV4Dims, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.is_first = layer_id == 0  # branched on instead of layer_id: layers 1..n-1 share a compiled graph
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(dims.n_embd)
        self.ln1 = nn.LayerNorm(dims.n_embd)
        self.ln2 = nn.LayerNorm(dims.n_embd)
        self.att = TimeMix(dims, layer_id)
        self.ffn = ChannelMix(dims, layer_id)

    def forward(self, x: Tensor, state: LayerState | None) -> tuple[Tensor, LayerState]:
        if self.is_first:
            x = self.ln0(x)
        if state is None:
            att_prev, wkv_prev, ffn_prev = None, None, None
        else:
            att_prev, aa, bb, pp, ffn_prev = state  # a LayerState, or any sequence in its order
            wkv_prev = (aa, bb, pp)
        dx, att_last, (aa, bb, pp) = self.att(self.ln1(x), att_prev, wkv_prev)
        x = x + dx
        dx, ffn_last = self.ffn(self.ln2(x), ffn_prev)
        return x + dx, LayerState(att_last, aa, bb, pp, ffn_last)


class RWKV4(RWKVModel):
    """An RWKV-4 language model: embedding, n_layer blocks (ln0 in the first), ln_out, head."""

    version = "v4"

    EMB_RANGE = DEFAULT_EMB_RANGE  # the reference draws emb in +-lr_init; its default lr_init

    def __init__(self, dims: RWKV4Dims):
        super().__init__(dims, Block)

    def zero_state(self, batch: int, device=None) -> list[LayerState]:
        d = self.dims
        dev = device or self.emb.weight.device
        return [
            LayerState(
                torch.zeros(batch, d.n_embd, device=dev),
                *zero_wkv4_state(batch, d.dim_att, dev),
                torch.zeros(batch, d.n_embd, device=dev),
            )
            for _ in range(d.n_layer)
        ]
