"""Pieces every RWKV generation shares: init helpers, the L2Wrap loss term, running a block (checkpointed
or compiled)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rwkv_train.compiling import compile_fn


def layer_ramps(layer_id: int, n_layer: int) -> tuple[float, float]:
    """(ratio_0_to_1, ratio_1_to_almost0): the per-layer ramps the reference init is written in."""
    ratio_0_to_1 = layer_id / (n_layer - 1) if n_layer > 1 else 0.0
    ratio_1_to_almost0 = 1.0 - layer_id / n_layer
    return ratio_0_to_1, ratio_1_to_almost0


def channel_ramp(n: int) -> Tensor:
    """i / n for i in 0..n-1, shaped (1, 1, n) like the mixing coefficients."""
    return (torch.arange(n, dtype=torch.float32) / n).view(1, 1, n)


@torch.no_grad()
def orthogonal_(w: Tensor, scale: float) -> Tensor:
    """Orthogonal init of a 2-D matrix, gain `scale` times sqrt(rows/cols) when it is taller than wide."""
    rows, cols = w.shape
    gain = (rows / cols) ** 0.5 if rows > cols else 1.0
    return torch.nn.init.orthogonal_(w, gain=gain * scale)


L2WRAP_FACTOR = 1e-4  # scaled by 1 / (number of tokens), as in the reference


def _rows(n: int, chunk: int):
    for start in range(0, n, chunk):
        yield slice(start, min(start + chunk, n))


class _HeadLoss(torch.autograd.Function):
    """Mean cross-entropy of `x @ weight.T` against targets, plus L2Wrap, without materialising all logits.

    L2Wrap adds L2WRAP_FACTOR / n * max_logit at each row's argmax to the logits' gradient, keeping logits
    from drifting upward. Gradients are computed chunk by chunk in the forward pass (the loss is a scalar,
    so they only need scaling by grad_output later); scaling the L2Wrap term too keeps it right under loss
    scaling and gradient accumulation, where grad_output != 1.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> Tensor:
        n = x.shape[0]
        w = weight.to(x.dtype)
        acc = torch.promote_types(x.dtype, torch.float32)  # float32 accumulation for bf16/fp16 inputs
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        dx = torch.empty_like(x) if need_grad else None
        dw = torch.zeros(weight.shape, dtype=acc, device=x.device) if need_grad else None
        total = torch.zeros((), dtype=acc, device=x.device)
        for rows in _rows(n, chunk):
            logits = (x[rows] @ w.T).to(acc)  # (rows, V)
            tgt = targets[rows, None]
            maxx, ids = logits.max(dim=-1, keepdim=True)
            picked = logits.gather(-1, tgt)
            probs = logits.sub_(maxx).exp_()  # in place: one (rows, V) buffer for the whole chunk
            sumexp = probs.sum(dim=-1, keepdim=True)
            total += (maxx + sumexp.log() - picked).sum()
            if need_grad:
                g = probs.div_(sumexp * n)  # softmax / n
                g.scatter_add_(-1, tgt, torch.full_like(maxx, -1.0 / n))
                g.scatter_add_(-1, ids, maxx * (L2WRAP_FACTOR / n))
                dx[rows] = g.to(x.dtype) @ w
                dw.addmm_(g.T, x[rows].to(acc))
        ctx.save_for_backward(dx, dw)
        ctx.weight_dtype = weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        dx, dw = ctx.saved_tensors
        return dx * grad_output.to(dx.dtype), (dw * grad_output).to(ctx.weight_dtype), None, None


class Head(nn.Linear):
    """The output projection. `forward(x)` gives logits; `loss(x, targets)` the fused training loss.

    Both go through this module's own call, so DeepSpeed ZeRO-3 gathers the weight for either.
    """

    def forward(self, x: Tensor, targets: Tensor | None = None, chunk: int = 1024) -> Tensor:
        if targets is None:
            return super().forward(x)
        return _HeadLoss.apply(x.reshape(-1, x.shape[-1]), self.weight, targets.reshape(-1), chunk)


def cross_entropy_l2wrap(logits: Tensor, targets: Tensor) -> Tensor:
    """Unfused reference of the training loss (tests compare the fused head against it): mean cross-entropy
    whose gradient also gets L2WRAP_FACTOR / n * max_logit at each row's argmax, scaled by grad_output."""
    n = targets.numel()
    flat = logits.to(torch.promote_types(logits.dtype, torch.float32)).reshape(n, -1)
    loss = F.cross_entropy(flat, targets.reshape(-1))
    maxx, ids = flat.detach().max(dim=-1, keepdim=True)
    # d/dlogits of this term is exactly the L2Wrap addition; its value is zero.
    wrap = (flat.gather(-1, ids) * maxx * (L2WRAP_FACTOR / n)).sum()
    return loss + wrap - wrap.detach()


def decay_speed_init(dim: int, ratio_0_to_1: float) -> Tensor:
    """RWKV-5/6 `time_decay` init: -6 + 5 (n / (dim - 1))^(0.7 + 1.3 ratio_0_to_1), n = 0..dim-1 (float32).

    Computed in float64 and rounded once, as the reference computes it in Python floats.
    """
    n = torch.arange(dim, dtype=torch.float64)
    return (-6 + 5 * (n / (dim - 1)) ** (0.7 + 1.3 * ratio_0_to_1)).float()


def bonus_init(dim: int, ratio_0_to_1: float) -> Tensor:
    """RWKV-5/6 `time_faaaa` (bonus u) init: ratio_0_to_1 (1 - n / (dim - 1)) + zigzag, zigzag in {0, 0.1, -0.1}."""
    n = torch.arange(dim, dtype=torch.float64)
    zigzag = ((n + 1) % 3 - 1) * 0.1
    return (ratio_0_to_1 * (1 - n / (dim - 1)) + zigzag).float()


class LayerState(NamedTuple):
    """Per-layer state of the generations with a matrix state per head (v5, v6, v7)."""

    att_x_prev: Tensor  # (B, C): last normed input of the time-mix
    wkv: Tensor  # (B, H, N, N) float32: [key, value] layout in v5/v6, [value, key] in v7
    ffn_x_prev: Tensor  # (B, C): last normed input of the channel-mix


class RWKVModel(nn.Module):
    """What every generation shares: emb -> blocks -> ln_out -> head, GPT and RNN mode, the fused loss.

    A generation subclasses it with `version`, `EMB_RANGE`, its `Block` (each `block(x, state)` returns
    `(x, new_state)`; layer 0 applies ln0) and `zero_state`; blocks' att and ffn have
    `reset_parameters(n_layer)`.
    """

    version = ""
    EMB_RANGE = 1e-4  # emb init: uniform in +-EMB_RANGE

    def __init__(self, dims, block_cls: type[nn.Module]):
        super().__init__()
        self.dims = dims
        self.emb = nn.Embedding(dims.vocab_size, dims.n_embd)
        self.blocks = nn.ModuleList(block_cls(dims, i) for i in range(dims.n_layer))
        self.ln_out = nn.LayerNorm(dims.n_embd)
        self.head = Head(dims.n_embd, dims.vocab_size, bias=False)
        self.grad_cp: bool | str = False  # gradient checkpointing per block (TrainConfig.grad_cp), set by the trainer
        self.set_kernel("auto")

    def set_kernel(self, kernel: str, wkv7_chunked: bool | str = "auto", wkv_diag_chunked: bool | str = False) -> None:
        """Choose the WKV backend of every block: "auto", "cuda" or "torch" (see ModelConfig.kernel), and
        which CUDA kernel for RWKV-7 (ModelConfig.wkv7_chunked) and RWKV-5/6 (ModelConfig.wkv_diag_chunked)."""
        for block in self.blocks:
            block.att.kernel = kernel
            block.att.wkv7_chunked = wkv7_chunked
            block.att.wkv_diag_chunked = wkv_diag_chunked

    @torch.no_grad()
    def reset_parameters(self, emb_range: float | None = None) -> None:
        """The reference initialisation. Call after construction (it is not run on the meta device)."""
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        for block in self.blocks:
            block.att.reset_parameters(self.dims.n_layer)
            block.ffn.reset_parameters(self.dims.n_layer)
        r = self.EMB_RANGE if emb_range is None else emb_range
        nn.init.uniform_(self.emb.weight, -r, r)
        orthogonal_(self.head.weight, 0.5)  # gain 0.5 * sqrt(V / C) when V > C

    def zero_state(self, batch: int, device=None) -> list:
        """An all-zero state (what state=None means), for the matrix-state generations; v4 overrides it."""
        d = self.dims
        dev = device or self.emb.weight.device
        return [
            LayerState(
                torch.zeros(batch, d.n_embd, device=dev),
                torch.zeros(batch, d.n_head, d.head_size, d.head_size, device=dev),
                torch.zeros(batch, d.n_embd, device=dev),
            )
            for _ in range(d.n_layer)
        ]

    def forward(self, idx: Tensor, state: list | None = None) -> tuple[Tensor, list]:
        """idx: (B, T) token ids. Returns logits (B, T, V) and the state after the last token.

        With state=None the sequence starts from zeros (GPT mode); pass the returned state back in to
        continue the same sequence (RNN mode, any T per call).
        """
        x, new_state = self.features(idx, state)
        return self.head(x), new_state

    def loss(self, idx: Tensor, targets: Tensor) -> Tensor:
        """Training loss from a zero state: mean cross-entropy with L2Wrap, logits never all in memory."""
        return self.head(self.features(idx, None)[0], targets)

    def features(self, idx: Tensor, state: list | None) -> tuple[Tensor, list]:
        """Normed hidden states before the head (B, T, C), and the new state."""
        x = self.emb(idx)
        new_state = []
        for i, block in enumerate(self.blocks):
            x, s = self.run_block(block, x, state[i] if state is not None else None)
            new_state.append(s)
        return self.ln_out(x), new_state

    def compile_blocks(self, backend: str = "inductor", autotune: bool = False) -> None:
        """torch.compile each block's call, gradient checkpointing included, so the recomputation in
        backward runs compiled code too. Blocks branch on `is_first`, not on their index, so layer 0
        gets one graph and layers 1..n-1 share another. The embedding and the head stay eager.
        `autotune`: see `rwkv_train.compiling.compile_fn`."""
        self.run_block = compile_fn(type(self).run_block.__get__(self), backend, autotune)

    def run_block(self, block: nn.Module, *args):
        """block(*args), recomputed in backward instead of stored when gradient checkpointing is on
        (grad_cp True), or all of it but the full-width matrix products (grad_cp "selective"), or but
        those and the WKV kernel's outputs (grad_cp "selective-wkv")."""
        if self.grad_cp and self.training and torch.is_grad_enabled():
            if self.grad_cp in ("selective", "selective-wkv"):
                keep = functools.partial(
                    keep_products, min_inner=self.dims.n_embd // 2, keep_wkv=self.grad_cp == "selective-wkv"
                )
                return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False, context_fn=keep)
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)


# The matrix products, of which "selective" checkpointing keeps the costly ones.
PRODUCTS = frozenset({torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default})


def kept_product(op, args, min_inner: int) -> bool:
    """Whether selective checkpointing keeps this op's output: a matrix product that sums over at least
    min_inner terms. With min_inner = C / 2 that is every projection (inner C or the FFN's 4C). The
    LoRA up-projections (inner d = 32 to 320) are recomputed: they cost as few FLOPs as the
    down-projections (2 C d per token), but their outputs are C wide where the downs' are d wide."""
    if op not in PRODUCTS:
        return False
    left = args[1] if op is torch.ops.aten.addmm.default else args[0]
    return left.shape[-1] >= min_inner


def is_wkv_kernel(op) -> bool:
    """Whether op is a CUDA WKV kernel's forward: the custom ops `rwkv_train::<kernel>_forward` of
    `rwkv_train.ops` (the PyTorch backend is ordinary aten ops, so it has none)."""
    return isinstance(op, torch._ops.OpOverload) and op.namespace == "rwkv_train" and op.name().endswith("_forward")


def _products_policy(
    ctx, op, *args, min_inner: int, keep_wkv: bool = False, **kwargs
) -> torch.utils.checkpoint.CheckpointPolicy:
    policy = torch.utils.checkpoint.CheckpointPolicy
    keep = kept_product(op, args, min_inner) or (keep_wkv and is_wkv_kernel(op))
    return policy.MUST_SAVE if keep else policy.PREFER_RECOMPUTE


def keep_products(min_inner: int, keep_wkv: bool = False):
    """The context_fn of selective checkpointing: keep the products `kept_product` names and, with
    keep_wkv, the outputs of the WKV kernel (`is_wkv_kernel`); recompute the rest."""
    policy = functools.partial(_products_policy, min_inner=min_inner, keep_wkv=keep_wkv)
    return torch.utils.checkpoint.create_selective_checkpoint_contexts(policy)
