"""Build and run a training job: data, model, Lightning Trainer (strategy, precision, callbacks, logger)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader

from rwkv_train.callbacks import RunMonitor
from rwkv_train.checkpoint import load_into, load_weights
from rwkv_train.config import Config
from rwkv_train.data.binidx import BinIdx
from rwkv_train.data.windows import BatchLayout, TrainSampler, TrainWindows, ValWindows, check_vocab
from rwkv_train.models import build_model
from rwkv_train.module import RWKVModule
from rwkv_train.plan import RunPlan, make_plan
from rwkv_train.plot import plot_metrics
from rwkv_train.rundir import resolve_resume

log = logging.getLogger("rwkv_train")

# Lightning notices that say nothing about this run: validation is optional here by design, and a
# deprecation inside Lightning itself.
warnings.filterwarnings("ignore", message=r".*defined a `validation_step` but have no `val_dataloader`")
warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated")

LIGHTNING_PRECISION = {"fp32": "32-true", "tf32": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed"}


def deepspeed_config(cfg: Config, plan: RunPlan) -> dict:
    """The DeepSpeed config a `train.strategy: deepspeed` run hands to Lightning's DeepSpeedStrategy."""
    t = cfg.train
    zero: dict = {
        "stage": t.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": True,
        "allgather_partitions": True,
        "reduce_scatter": True,
        "allgather_bucket_size": 200_000_000,
        "reduce_bucket_size": 200_000_000,
    }
    if t.offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if t.offload == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    out = {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": plan.micro_bsz,
        "gradient_accumulation_steps": plan.accumulate,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": t.precision == "bf16"},
    }
    if t.precision == "fp16":
        out["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                       "hysteresis": 2, "min_loss_scale": 1}
    return out


def make_strategy(cfg: Config, plan: RunPlan):
    if cfg.train.strategy == "deepspeed":
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(config=deepspeed_config(cfg, plan))
    if cfg.train.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=False)
    return "auto"


def _open_corpus(prefix: str, role: str, vocab_size: int) -> BinIdx:
    data = BinIdx(prefix)
    check_vocab(data, vocab_size, f"{role} corpus {prefix}")
    return data


def run(cfg: Config, callbacks: list[L.Callback] | None = None) -> Path:
    """Train as configured; return the out_dir. Raises UserError subclasses for bad input.

    `callbacks` are added after the run's own (which write metrics and checkpoints).
    """
    is_rank_zero = rank_zero_only.rank == 0
    out_dir = Path(cfg.train.out_dir)
    resume = resolve_resume(cfg) if is_rank_zero else _resume_path_other_ranks(cfg)

    corpora = [_open_corpus(c.path, "training", cfg.model.vocab_size) for c in cfg.data.train]
    val_data = _open_corpus(cfg.data.val, "validation", cfg.model.vocab_size) if cfg.data.val else None
    train_set = TrainWindows(corpora, cfg.data.ctx_len, cfg.train.seed, [c.weight for c in cfg.data.train])

    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    model = build_model(cfg.model, device="cpu", init=resume is None and cfg.model.load is None)
    if cfg.model.load and resume is None:
        load_into(model, load_weights(cfg.model.load), f"model.load={cfg.model.load}")
    model.grad_cp = cfg.train.grad_cp
    if cfg.train.compile:
        model.compile_blocks()
        if is_rank_zero:
            log.info("train.compile: the blocks compile during the first steps (a minute or more)")
    plan = make_plan(cfg, sum(p.numel() for p in model.parameters()), tuple(train_set.primes))

    if is_rank_zero:
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(out_dir / "config.yaml")
        log.info("run: %s", plan.describe())
        if len(corpora) > 1:
            log.info("mix over the run: %s", describe_mix(cfg, train_set, plan))
        log.info("out_dir: %s%s", out_dir, f" (resuming from {resume})" if resume else "")
    if cfg.train.precision == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    module = RWKVModule(cfg, model, plan.total_steps)
    trainer = L.Trainer(
        accelerator=cfg.train.accelerator,
        devices=cfg.train.devices,
        num_nodes=cfg.train.num_nodes,
        strategy=make_strategy(cfg, plan),
        precision=LIGHTNING_PRECISION[cfg.train.precision],
        max_steps=plan.total_steps,
        max_epochs=-1,
        accumulate_grad_batches=1 if cfg.train.strategy == "deepspeed" else plan.accumulate,
        gradient_clip_val=(cfg.optim.grad_clip or None) if cfg.train.strategy != "deepspeed" else None,
        use_distributed_sampler=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        logger=_make_logger(cfg),
        callbacks=[
            RunMonitor(plan, str(out_dir), cfg.logging.log_every, cfg.train.save_every, cfg.train.precision),
            *(callbacks or []),
        ],
        num_sanity_val_steps=0,
        limit_val_batches=1.0 if val_data is not None else 0,
        val_check_interval=(cfg.data.val_every or plan.total_steps) * plan.accumulate,
        check_val_every_n_epoch=None,
        default_root_dir=str(out_dir),
        log_every_n_steps=1,
    )
    layout = BatchLayout(plan.micro_bsz, plan.accumulate, trainer.world_size, trainer.global_rank)
    sampler = TrainSampler(layout, plan.total_steps, start_step=lambda: trainer.global_step)
    train_loader = DataLoader(train_set, batch_size=plan.micro_bsz, sampler=sampler, num_workers=0, drop_last=True)
    val_loader = None
    if val_data is not None:
        val_set = ValWindows(val_data, cfg.data.ctx_len, cfg.data.val_tokens, trainer.global_rank, trainer.world_size)
        val_loader = DataLoader(val_set, batch_size=plan.micro_bsz, shuffle=False, num_workers=0)

    trainer.fit(module, train_loader, val_loader, ckpt_path=str(resume) if resume else None, weights_only=True)

    if trainer.is_global_zero:
        plot_metrics(out_dir / "metrics.csv", out_dir / "loss.png")
        if len(corpora) > 1:
            log.info("realised mix: %s", describe_mix(cfg, train_set, plan, trainer.global_step))
    return out_dir


def describe_mix(cfg: Config, train_set: TrainWindows, plan: RunPlan, steps: int | None = None) -> str:
    """Samples drawn from each corpus over `steps` optimiser steps (default: the whole run), with shares."""
    samples = (plan.total_steps if steps is None else steps) * plan.global_bsz
    drawn = train_set.mixture.drawn(samples)
    total_weight = sum(c.weight for c in cfg.data.train)
    return ", ".join(
        f"{c.path} {n:,} samples = {n / max(1, samples):.2%} (weight {c.weight / total_weight:.2%})"
        for c, n in zip(cfg.data.train, drawn)
    )


def _resume_path_other_ranks(cfg: Config) -> Path | None:
    """Ranks other than 0 start after rank 0 wrote config.yaml: they only locate the checkpoint."""
    from rwkv_train.checkpoint import find_resume

    if cfg.train.resume is None:
        return None
    return find_resume(Path(cfg.train.out_dir)) if cfg.train.resume == "auto" else Path(cfg.train.resume)


def _make_logger(cfg: Config):
    if cfg.logging.wandb == "off":
        return False
    from lightning.pytorch.loggers import WandbLogger

    out_dir = Path(cfg.train.out_dir)
    return WandbLogger(
        project=cfg.logging.project,
        name=cfg.logging.run_name or out_dir.name,
        save_dir=str(out_dir),
        offline=cfg.logging.wandb == "offline",
        config=cfg.to_dict(),
    )
