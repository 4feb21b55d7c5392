"""Gradient checkpointing per block (train.grad_cp): the same loss and gradients as without, and what
each mode recomputes, counted in matrix products run during the backward."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rwkv_train.config import ModelConfig
from rwkv_train.models import build_model
from rwkv_train.models.common import PRODUCTS


class CountProducts(TorchDispatchMode):
    """Counts the matrix products (aten mm, addmm, bmm) run inside it."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in PRODUCTS
        return func(*args, **(kwargs or {}))


def run(version: str, grad_cp) -> tuple[torch.Tensor, list[torch.Tensor], int, int]:
    """Loss, gradients, and the products run in the forward and in the backward of a 3-layer model."""
    cfg = ModelConfig(version=version, n_layer=3, n_embd=64, head_size=16, vocab_size=61, kernel="torch")
    torch.manual_seed(0)
    model = build_model(cfg).double()
    model.train()
    model.grad_cp = grad_cp
    idx, targets = torch.randint(0, 61, (2, 2, 21), generator=torch.Generator().manual_seed(1))
    with CountProducts() as forward:
        loss = model.loss(idx, targets)
    with CountProducts() as backward:
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
        # checkpointed); selective: they are kept, so the backward runs only the gradients' products
        recomputed = got_bwd - bwd_products
        if mode is True:
            assert 0 < recomputed < fwd_products
        else:
            assert recomputed == 0
