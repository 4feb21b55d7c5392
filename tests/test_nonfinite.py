"""A non-finite loss stops the run with a clear error and keeps the last good checkpoint."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from rwkv_train.checkpoint import load_weights
from rwkv_train.config import load_config
from rwkv_train.module import NonFiniteLoss
from rwkv_train.trainer import run
from tests.conftest import tiny_config


class Poison(L.Callback):
    """Corrupts the weights after step 2 (and after that step's checkpoint was written)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 2:
            with torch.no_grad():
                pl_module.model.blocks[0].att.key.weight.fill_(float("inf"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, corpus):
    cfg = load_config(tiny_config(tmp_path, corpus, train={"max_steps": 6, "save_every": 2}))
    with pytest.raises(NonFiniteLoss, match=r"became nan at step 2.*last good checkpoint"):
        run(cfg, callbacks=[Poison()])
    out = tmp_path / "run"
    assert not (out / "rwkv-final.pth").exists()
    good = load_weights(out / "rwkv-2.pth")
    assert all(torch.isfinite(v).all() for v in good.values())
    resume = torch.load(out / "resume.ckpt", weights_only=True)
    assert resume["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in resume["state_dict"].values())
