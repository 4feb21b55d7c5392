"""Gradient checkpointing per block (train.grad_cp): the same loss and gradients as without, and what
each mode recomputes, counted in matrix products run during the backward."""

from __future__ import annotations

import gc

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from rwkv_train.config import ModelConfig
from rwkv_train.models import build_model, common
from rwkv_train.models.common import PRODUCTS


class CountProducts(TorchDispatchMode):
    """Counts the matrix products (aten mm, addmm, bmm) run inside it whose inner dimension is in
    [min_inner, max_inner)."""

    def __init__(self, min_inner: int = 0, max_inner: float = float("inf"), ops=PRODUCTS):
        super().__init__()
        self.count = 0
        self.min_inner, self.max_inner, self.ops = min_inner, max_inner, ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.ops:
            inner = (args[1] if func is torch.ops.aten.addmm.default else args[0]).shape[-1]
            self.count += self.min_inner <= inner < self.max_inner
        return func(*args, **(kwargs or {}))


def run(version: str, grad_cp) -> tuple[torch.Tensor, list[torch.Tensor], int, int]:
    """Loss, gradients, and the products over at least C / 2 terms (the projections; LoRA widths are 32
    here, so theirs too) run in the forward and in the backward of a 3-layer model."""
    C = 64
    cfg = ModelConfig(version=version, n_layer=3, n_embd=C, head_size=16, vocab_size=61, kernel="torch")
    torch.manual_seed(0)
    model = build_model(cfg).double()
    model.train()
    model.grad_cp = grad_cp
    idx, targets = torch.randint(0, 61, (2, 2, 21), generator=torch.Generator().manual_seed(1))
    with CountProducts(min_inner=C // 2) as forward:
        loss = model.loss(idx, targets)
    with CountProducts(min_inner=C // 2) as backward:
        loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()], forward.count, backward.count


@pytest.mark.parametrize("version", ["v4", "v5", "v6", "v7"])
def test_checkpointing_modes_give_the_same_gradients_and_recompute_what_they_say(version):
    loss, grads, fwd_products, bwd_products = run(version, False)
    for mode in (True, "selective"):
        got_loss, got_grads, got_fwd, got_bwd = run(version, mode)
        torch.testing.assert_close(got_loss, loss, rtol=1e-12, atol=0)
        for got, want in zip(got_grads, grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        assert got_fwd == fwd_products
        # full: every block's forward products run again in the backward (the head's do not: it is not
        # checkpointed); selective: they are kept, so the backward runs only the gradients' products (the
        # WKV's own, over head_size or chunk_len terms, are recomputed, as every other part of it)
        recomputed = got_bwd - bwd_products
        if mode is True:
            assert 0 < recomputed < fwd_products
        else:
            assert recomputed == 0


class LiveStorages(TorchDispatchMode):
    """Remembers the storage of every tensor made inside it; `bytes_alive()` is what is still held."""

    def __init__(self):
        super().__init__()
        self.made: list[tuple[StorageWeakRef, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                self.made.append((StorageWeakRef(s), s.data_ptr(), s.nbytes()))
        return out

    def bytes_alive(self) -> int:
        gc.collect()
        alive = {ptr: nbytes for ref, ptr, nbytes in self.made if not ref.expired()}
        return sum(alive.values())


def saved_by_forward(model, idx: torch.Tensor) -> int:
    """Bytes the blocks' forward leaves alive for the backward (the blocks' input is made outside)."""
    x = model.emb(idx).detach().requires_grad_()
    with LiveStorages() as live:
        v_first = None
        for block in model.blocks:
            x, v_first, state = model.run_block(block, x, v_first, None)
        del state  # the final state a block returns is no part of what training keeps
    held = live.bytes_alive()
    del x, v_first
    return held


def test_selective_recomputes_the_low_rank_up_projections(monkeypatch):
    """At C = 512 the LoRA widths (64, 64, 32, 128) are under C / 2: their up-projections, whose outputs
    are C wide, are recomputed (one product per LoRA and layer; layer 0 has no value LoRA) and not kept."""
    cfg = ModelConfig(version="v7", n_layer=2, n_embd=512, head_size=32, vocab_size=61, kernel="torch")
    B, T = 2, 40
    idx = torch.randint(0, 61, (B, T), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    lora_ups = [p for name, p in model.named_parameters() if name.split(".")[-1] in ("w2", "a2", "v2", "g2")]
    assert len(lora_ups) == 4 * cfg.n_layer - 1 and all(p.shape[0] < cfg.n_embd // 2 for p in lora_ups)

    def narrow_products_in_backward(grad_cp) -> int:  # 2-D ones: the WKV's are batched (bmm)
        model.grad_cp = grad_cp
        model.zero_grad()
        loss = model.loss(idx, idx)
        with CountProducts(max_inner=cfg.n_embd // 2, ops={torch.ops.aten.mm.default}) as backward:
            loss.backward()
        return backward.count

    assert narrow_products_in_backward("selective") - narrow_products_in_backward(False) == len(lora_ups)

    model.grad_cp = "selective"
    saved = saved_by_forward(model, idx)
    rule = common.kept_product

    def every_2d_product_too(op, args, min_inner):
        return rule(op, args, min_inner) or op is torch.ops.aten.mm.default

    monkeypatch.setattr(common, "kept_product", every_2d_product_too)
    saved_keeping_them = saved_by_forward(model, idx)
    assert saved_keeping_them - saved == len(lora_ups) * B * T * cfg.n_embd * 4  # float32 outputs, C wide
