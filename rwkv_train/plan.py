"""Batch and run arithmetic, derived once: global = micro x accumulate x world; steps from tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rwkv_train.config import Config
from rwkv_train.errors import ConfigError


@dataclass(frozen=True)
class RunPlan:
    world: int
    micro_bsz: int
    accumulate: int
    global_bsz: int
    ctx_len: int
    total_steps: int
    magic_primes: tuple[int, ...]  # one per training corpus
    num_params: int

    @property
    def tokens_per_step(self) -> int:
        return self.global_bsz * self.ctx_len

    @property
    def total_tokens(self) -> int:
        return self.total_steps * self.tokens_per_step

    def describe(self) -> str:
        return (
            f"parameters {self.num_params:,} | world {self.world} x micro_bsz {self.micro_bsz} x accumulate "
            f"{self.accumulate} = global batch {self.global_bsz} | ctx_len {self.ctx_len} | tokens/step "
            f"{self.tokens_per_step:,} | steps {self.total_steps:,} | tokens {self.total_tokens:,} | "
            f"magic prime {' / '.join(f'{p:,}' for p in self.magic_primes)}"
        )


def make_plan(cfg: Config, num_params: int, magic_primes: tuple[int, ...]) -> RunPlan:
    t = cfg.train
    world = t.devices * t.num_nodes
    per_pass = t.micro_bsz * world
    if t.global_bsz is not None:
        if t.global_bsz % per_pass:
            raise ConfigError(
                f"train.global_bsz={t.global_bsz} is not a multiple of micro_bsz x devices x num_nodes = {per_pass}: "
                f"use a multiple of {per_pass}, or set train.accumulate instead"
            )
        accumulate = t.global_bsz // per_pass
    else:
        accumulate = t.accumulate or 1
    if accumulate > 1 and t.strategy == "deepspeed":
        # DeepSpeed accumulates inside its engine, where Lightning counts every micro-batch as a step; the
        # step-exact schedule, sampler and checkpoints here assume Lightning-side accumulation.
        raise ConfigError(
            f"gradient accumulation ({accumulate} micro-batches per step) is not supported with "
            "train.strategy=deepspeed: raise train.micro_bsz or the device count to reach the global batch, "
            "or use train.strategy=ddp"
        )
    global_bsz = per_pass * accumulate
    tokens_per_step = global_bsz * cfg.data.ctx_len
    steps = t.max_steps if t.max_steps is not None else math.ceil(t.max_tokens / tokens_per_step)
    return RunPlan(world, t.micro_bsz, accumulate, global_bsz, cfg.data.ctx_len, steps, magic_primes, num_params)
