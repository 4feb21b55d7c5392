"""Training FLOPs per token, GPU peak throughput, and model FLOPs utilisation (MFU).

What is counted, per token of training (forward + backward, the backward taken as twice the forward):

  6 x (parameters used in matrix products)  +  3 x n_layer x (WKV recurrence's forward FLOPs per token)

- Matrix parameters: every weight that multiplies activations as a matrix: the projections, the
  channel-mix matrices, the low-rank (LoRA-style) matrices of v6 and v7, and the head. The embedding is
  a lookup, so it is left out; so are the per-channel vectors (token-shift mixes, decay biases, bonus u,
  r_k, norms), whose elementwise work is small beside the matrices. Each matrix parameter costs one
  multiply and one add per token in the forward pass (2 FLOPs), so 6 over forward and backward.
- The WKV recurrence, counted in its per-token (recurrent) form, one FLOP per elementwise operation:
    v5, v6: 5 per state element (S = diag(w) S + k^T v: 3; y = r S: 2; the bonus term is O(N));
    v7:     9 per state element (S diag(w): 1; S a: 2; (S a) b^T and v k^T: 1 each; two additions: 2;
            y = S r: 2);
  the state being n_head x head_size^2 per layer. RWKV-4's state is per channel (dim_att = n_embd
  channels): 23 operations per channel (12 for the output, 11 for the state, exponentials counted as one).

Not counted: gradient-checkpoint recomputation (MFU counts the model's FLOPs, not the hardware's),
norms, activations, the softmax of the loss and the optimiser. The cost per token does not depend on the context
length: RWKV has no attention matrix, which is what makes long contexts cheap.
"""

from __future__ import annotations

import re

import torch

from rwkv_train.config import ModelConfig

# Forward FLOPs of the WKV recurrence per token and layer, per state element (see the module docstring).
WKV_FORWARD_FLOPS = {"v4": 23, "v5": 5, "v6": 5, "v7": 9}
TRAIN_OVER_FORWARD = 3  # forward + backward, the backward costing twice the forward

# Dense bf16 tensor-core peak (FLOP/s, no sparsity) by device name, as torch.cuda.get_device_name
# reports it. Patterns are tried in order, the first match wins, so variants come before the plain name.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    (r"\bgh200\b", 989.4e12),
    (r"\bh200 nvl\b", 835e12),
    (r"\bh200\b", 989.4e12),
    (r"\bh100 pcie\b", 756e12),
    (r"\bh100 nvl\b", 835e12),
    (r"\bh100\b", 989.4e12),  # SXM: "NVIDIA H100 80GB HBM3"
    (r"\bh800 pcie\b", 756e12),
    (r"\bh800\b", 989.4e12),
    (r"\bb200\b", 2250e12),
    (r"\ba100\b", 312e12),
    (r"\ba800\b", 312e12),
    (r"\bl40s\b", 362e12),
    (r"\bl40\b", 181e12),
    (r"\bl4\b", 121e12),
    (r"\ba10\b", 125e12),
    (r"\brtx a6000\b", 154.8e12),
)


def matrix_params(model_cfg: ModelConfig) -> int:
    """Parameters used in matrix products (every 2-D weight but the embedding, the head included).

    Counted from the configured dimensions, through the generation's own dims class (which knows the
    low-rank widths); v6's `time_maa_w2` [5, d_mix, C] is five such matrices.
    """
    from rwkv_train.models import model_classes

    _, dims_cls = model_classes(model_cfg.version)
    d = dims_cls.from_config(model_cfg)
    C, F, L = d.n_embd, d.dim_ffn, d.n_layer
    ffn = 2 * C * F  # key [F, C] and value [C, F]
    if model_cfg.version == "v4":
        A = d.dim_att
        per_layer = 4 * C * A + ffn + C * C  # att key, value, receptance, output; ffn receptance
        total = L * per_layer
    elif model_cfg.version in ("v5", "v6"):
        per_layer = 5 * C * C + ffn + C * C  # att r, k, v, output, gate; ffn receptance
        if model_cfg.version == "v6":
            per_layer += 2 * C * 5 * d.d_mix + 2 * C * d.d_decay  # token-shift and decay low-rank pairs
        total = L * per_layer
    else:  # v7
        per_layer = 4 * C * C + ffn + 2 * C * (d.d_decay + d.d_aaa + d.d_gate)  # r, k, v, output; w, a, g pairs
        total = L * per_layer + (L - 1) * 2 * C * d.d_mv  # the value-residual pair, layers >= 1 only
    return total + d.vocab_size * C  # head


def wkv_forward_flops(model_cfg: ModelConfig) -> int:
    """Forward FLOPs of the WKV recurrence per token, over all layers (constants in WKV_FORWARD_FLOPS)."""
    if model_cfg.version == "v4":
        state = model_cfg.n_embd  # one (aa, bb, pp) triple per channel
    else:
        state = model_cfg.n_head * model_cfg.head_size**2
    return model_cfg.n_layer * WKV_FORWARD_FLOPS[model_cfg.version] * state


def flops_per_token(model_cfg: ModelConfig, ctx_len: int) -> float:
    """Training FLOPs per token: 6 x matrix parameters + 3 x the WKV recurrence's forward FLOPs.

    `ctx_len` does not change the result (RWKV's cost per token is independent of it); it is taken so
    that callers state the setting the figure is for, and is checked to be positive.
    """
    if ctx_len < 1:
        raise ValueError(f"ctx_len={ctx_len}: expected a positive number of tokens per window")
    return float(2 * TRAIN_OVER_FORWARD * matrix_params(model_cfg) + TRAIN_OVER_FORWARD * wkv_forward_flops(model_cfg))


def peak_flops_by_name(name: str) -> float | None:
    """Dense bf16 tensor-core peak (FLOP/s) of a GPU named like torch.cuda.get_device_name, or None."""
    lowered = name.lower()
    for pattern, peak in PEAK_BF16_FLOPS:
        if re.search(pattern, lowered):
            return peak
    return None


def peak_flops(device: torch.device | str | int | None = None) -> float | None:
    """Dense bf16 tensor-core peak (FLOP/s) of a CUDA device; None on CPU or for a GPU not in the table.

    The bf16 peak is the reference whatever the training precision (fp16 peaks are the same on these
    GPUs; an fp32/tf32 run simply shows a low MFU).
    """
    if isinstance(device, int):
        device = torch.device("cuda", device)
    elif device is None or isinstance(device, str):
        device = torch.device(device or "cuda")
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_by_name(torch.cuda.get_device_name(device))


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation, a fraction: achieved FLOP/s over peak, None when the peak is unknown.

    `tokens_per_s` and `peak` must refer to the same hardware: tokens per second of one GPU against
    that GPU's peak.
    """
    if peak is None or peak <= 0:
        return None
    return tokens_per_s * flops_per_token / peak
