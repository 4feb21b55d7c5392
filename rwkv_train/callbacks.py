"""What happens around each optimiser step: metrics, progress-bar figures, checkpoints."""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

import lightning as L
import torch

from rwkv_train.checkpoint import RESUME_NAME, atomic_torch_save, replace_atomically, weights_state_dict
from rwkv_train.flops import flops_per_token, mfu, peak_flops
from rwkv_train.plan import RunPlan

log = logging.getLogger("rwkv_train")

# tokens_per_s counts every GPU; tokens_per_s_per_gpu and mfu one GPU's share (mfu empty when the
# device's peak is unknown, e.g. on the CPU).
METRIC_FIELDS = ("step", "tokens", "loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_gpu",
                 "mfu")


def weights_dtype(precision: str) -> torch.dtype:
    """Official checkpoints are saved in the training precision, as the reference trainer does."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


class RunMonitor(L.Callback):
    """Writes metrics.csv, feeds the progress bar, saves rwkv-<step>.pth and the resume checkpoint."""

    def __init__(self, plan: RunPlan, out_dir: str, log_every: int, save_every: int, precision: str):
        self.plan = plan
        self.out_dir = Path(out_dir)
        self.log_every = log_every
        self.save_every = save_every
        self.dtype = weights_dtype(precision)
        self.metrics_path = self.out_dir / "metrics.csv"
        self._losses: list[float] = []
        self._last_step = 0
        self._clock = 0.0
        self._clock_step = 0
        self._val_started = 0.0
        self._flops_per_token = 0.0  # set at train start, from the module's model config
        self._peak: float | None = None

    # --- metrics ---------------------------------------------------------------------------------

    def _write_row(self, trainer: L.Trainer, row: dict) -> None:
        if not trainer.is_global_zero:
            return
        new = not self.metrics_path.exists()
        with self.metrics_path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
            if new:
                writer.writeheader()
            writer.writerow({k: row.get(k, "") for k in METRIC_FIELDS})
        if trainer.logger is not None:
            trainer.logger.log_metrics({k: v for k, v in row.items() if k != "step" and v != ""}, step=row["step"])

    def on_train_start(self, trainer, pl_module) -> None:
        self._flops_per_token = flops_per_token(pl_module.cfg.model, self.plan.ctx_len)
        self._peak = peak_flops(pl_module.device)
        if trainer.is_global_zero:
            self._rewind_metrics(trainer.global_step)
            peak = f"{self._peak / 1e12:.1f} TFLOP/s bf16 peak per GPU" if self._peak else "device peak unknown: no MFU"
            log.info("throughput: %.3g training FLOPs per token (rwkv_train.flops); %s", self._flops_per_token, peak)
        self._last_step = trainer.global_step
        self._clock, self._clock_step = time.perf_counter(), trainer.global_step

    def _rewind_metrics(self, step: int) -> None:
        """Drop rows of steps after `step` (a resumed run's checkpoint): they are about to be trained again."""
        if not self.metrics_path.exists():
            return
        with self.metrics_path.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        tmp = self.metrics_path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(self.metrics_path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return  # mid-accumulation: no optimiser step yet
        self._last_step = step
        self._losses.extend(pl_module.step_losses)
        step_loss = sum(pl_module.step_losses) / max(1, len(pl_module.step_losses))
        pl_module.step_losses.clear()
        lr = trainer.optimizers[0].param_groups[0]["lr"] / trainer.optimizers[0].param_groups[0]["lr_scale"]
        elapsed = time.perf_counter() - self._clock
        tok_s = (step - self._clock_step) * self.plan.tokens_per_step / max(elapsed, 1e-9)
        tok_s_gpu = tok_s / self.plan.world
        step_mfu = mfu(tok_s_gpu, self._flops_per_token, self._peak)
        bar = {"loss": step_loss, "lr": lr, "tok/s": tok_s, "tok/s/gpu": tok_s_gpu}
        if step_mfu is not None:
            bar["mfu"] = step_mfu
        pl_module.log_dict(bar, prog_bar=True, logger=False)

        if step % self.log_every == 0 or step == self.plan.total_steps:
            grad_norm = pl_module.grad_norm
            engine = getattr(trainer.strategy, "deepspeed_engine", None)
            if engine is not None and engine.get_global_grad_norm() is not None:
                grad_norm = float(engine.get_global_grad_norm())
            self._write_row(trainer, {
                "step": step,
                "tokens": step * self.plan.tokens_per_step,
                "loss": round(sum(self._losses) / len(self._losses), 6),
                "lr": f"{lr:.4g}",
                "grad_norm": round(grad_norm, 5),
                "tokens_per_s": round(tok_s, 1),
                "tokens_per_s_per_gpu": round(tok_s_gpu, 1),
                "mfu": "" if step_mfu is None else round(step_mfu, 4),
            })
            self._losses.clear()
            self._clock, self._clock_step = time.perf_counter(), step

        if self.save_every and step % self.save_every == 0 and step < self.plan.total_steps:
            self.save(trainer, pl_module, f"rwkv-{step}.pth")

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_started = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        self._clock += time.perf_counter() - self._val_started  # tokens/s counts training time only
        if trainer.sanity_checking or pl_module.val_loss is None:
            return
        step = trainer.global_step
        self._write_row(trainer, {"step": step, "tokens": step * self.plan.tokens_per_step,
                                  "val_loss": round(pl_module.val_loss, 6)})

    def on_train_end(self, trainer, pl_module) -> None:
        self.save(trainer, pl_module, "rwkv-final.pth")

    # --- checkpoints -----------------------------------------------------------------------------

    def save(self, trainer: L.Trainer, pl_module, weights_name: str) -> None:
        """The official weights file (rank 0) and the resume checkpoint (every rank takes part)."""
        tmp = self.out_dir / (RESUME_NAME + ".tmp")
        trainer.save_checkpoint(tmp, weights_only=False)
        trainer.strategy.barrier("resume-checkpoint")
        weights = gathered_weights(trainer, pl_module.model, self.dtype)  # collective under ZeRO-3
        if trainer.is_global_zero:
            replace_atomically(tmp, self.out_dir / RESUME_NAME)
            atomic_torch_save(weights, self.out_dir / weights_name)
        trainer.strategy.barrier("weights")


def gathered_weights(trainer: L.Trainer, model: torch.nn.Module, dtype: torch.dtype) -> dict | None:
    """The full official state dict on rank 0 (None elsewhere), gathering ZeRO-3 partitions first."""
    engine = getattr(trainer.strategy, "deepspeed_engine", None)
    if engine is not None and engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            return weights_state_dict(model, dtype) if trainer.is_global_zero else None
    return weights_state_dict(model, dtype) if trainer.is_global_zero else None
