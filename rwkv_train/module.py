"""The LightningModule: next-token loss with L2Wrap, optimiser groups, LR schedule, run state."""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch
from torch import nn

from rwkv_train.config import Config
from rwkv_train.errors import UserError
from rwkv_train.optim import param_groups
from rwkv_train.schedule import lr_at


class NonFiniteLoss(UserError):
    """The training loss became NaN or infinite."""


class RWKVModule(L.LightningModule):
    """Wraps an RWKV model (`self.model`, whose state-dict keys are the official ones) for training."""

    def __init__(self, cfg: Config, model: nn.Module, total_steps: int):
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.total_steps = total_steps
        self.step_losses: list[float] = []  # losses of the micro-batches of the current optimiser step
        self.grad_norm = float("nan")
        self._val_sum = torch.zeros(2, dtype=torch.float64)  # (summed token loss, token count)
        self.val_loss: float | None = None

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)[0]

    # --- training ------------------------------------------------------------------------------

    def training_step(self, batch, batch_idx):
        idx, targets = batch
        loss = self.model.loss(idx, targets)
        mean = self.trainer.strategy.reduce(loss.detach(), reduce_op="mean")  # same value on every rank
        if not torch.isfinite(mean):
            raise NonFiniteLoss(
                f"the training loss became {mean.item()} at step {self.global_step}: the run stops here and the "
                f"last good checkpoint in {self.cfg.train.out_dir} is kept. Try a lower optim.lr_init, "
                "a smaller optim.grad_clip, precision bf16 instead of fp16, or resume from that checkpoint"
            )
        self.step_losses.append(mean.item())
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:  # ZeRO keeps gradients in its own partitions; the trainer reads its norm instead
            self.grad_norm = torch.nn.utils.get_total_norm(grads).item()

    def configure_optimizers(self):
        opt_cfg = self.cfg.optim
        groups = param_groups(self.model, opt_cfg.weight_decay, self.cfg.model.version)
        for g in groups:
            g["lr"] = opt_cfg.lr_init * g["lr_scale"]
        optimizer = self._make_optimizer(groups)
        base = opt_cfg.lr_init
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_at(step, self.total_steps, opt_cfg) / base
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _make_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        opt_cfg, train_cfg = self.cfg.optim, self.cfg.train
        kwargs = dict(betas=opt_cfg.betas, eps=opt_cfg.eps)
        if train_cfg.strategy == "deepspeed":
            for g in groups:  # DeepSpeed's optimisers want only tensors and numbers in a group
                g.pop("param_names", None)
            if train_cfg.offload != "none":
                from deepspeed.ops.adam import DeepSpeedCPUAdam

                return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(groups, adam_w_mode=True, **kwargs)
        fused = torch.cuda.is_available() and train_cfg.accelerator != "cpu"
        return torch.optim.AdamW(groups, fused=fused or None, **kwargs)

    # --- validation: mean loss per token over the validation windows -----------------------------

    def on_validation_epoch_start(self) -> None:
        self._val_sum.zero_()

    def validation_step(self, batch, batch_idx):
        idx, targets = batch
        logits = self(idx)
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
        self._val_sum += torch.tensor([loss.item(), targets.numel()], dtype=torch.float64)

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._val_sum.to(self.device), reduce_op="sum")
        self.val_loss = (total[0] / total[1]).item()
        self.log("val_loss", self.val_loss, prog_bar=True, rank_zero_only=True)

    # --- run state saved beside the weights --------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rwkv_run"] = {
            "config": self.cfg.to_dict(),
            "step": self.global_step,
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": _numpy_rng_state(),
                "python": list(random.getstate()[1]),
            },
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        run = checkpoint.get("rwkv_run")
        if run is None:
            return
        rng = run["rng"]
        torch.set_rng_state(rng["torch"])
        name, keys, pos, has_gauss, gauss = rng["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
        random.setstate((3, tuple(rng["python"]), None))


def _numpy_rng_state() -> list:
    """numpy's global RNG state as plain Python values, so the checkpoint loads with weights_only=True."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]
