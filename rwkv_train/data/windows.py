"""Training and validation windows over a binidx corpus, in a deterministic, resumable order.

The corpus is one flat token stream. Training sample number n (global, 0-based) reads ctx_len + 1
tokens from `window_start(n, prime, ctx_len, seed)`. The samples of optimiser step s, micro-batch m
(of `accumulate`) on rank r are

    n = ((s * accumulate + m) * world + r) * micro_bsz + i,   i in 0..micro_bsz-1

so ranks draw disjoint windows, a run on W devices sees exactly the windows of a 1-device run with the
same global batch, and resuming at step s needs nothing but s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from rwkv_train.data.binidx import BinIdx
from rwkv_train.data.build import sidecar_path
from rwkv_train.data.mixture import Mixture
from rwkv_train.data.sampling import magic_prime, window_start
from rwkv_train.errors import DataError


def max_token_id(data: BinIdx) -> int:
    """The corpus's largest token id: from its make_binidx sidecar when there is one, else by a scan."""
    sidecar = sidecar_path(data.prefix)
    if sidecar.is_file():
        try:
            recorded = json.loads(sidecar.read_text()).get("max_token_id")
        except (OSError, ValueError):
            recorded = None
        if isinstance(recorded, int):
            return recorded
    top, step = -1, 1 << 26  # scan in slices: bounded memory on corpora of any size
    for start in range(0, data.num_tokens, step):
        top = max(top, int(data.tokens[start : start + step].max()))
    return top


def check_vocab(data: BinIdx, vocab_size: int, name: str) -> None:
    """Refuse a corpus holding token ids the model's embedding cannot look up."""
    if data.dtype.kind == "u" and np.iinfo(data.dtype).max < vocab_size:
        return  # every id the dtype can hold fits, e.g. uint16 corpora and the 65536 World vocabulary
    top = max_token_id(data)
    if top >= vocab_size:
        raise DataError(
            f"{name} holds token id {top} but model.vocab_size is {vocab_size}: "
            f"set model.vocab_size to at least {top + 1}, or rebuild the corpus with the model's tokenizer"
        )


class TrainWindows(Dataset):
    """Sample n -> (inputs, targets), each (ctx_len,) int64, from the magic-prime window of n.

    With several corpora, the mixture picks the corpus of n and its per-corpus sample number; each corpus
    has its own magic prime, so each is read in its own full-coverage order.
    """

    def __init__(self, corpora: list[BinIdx], ctx_len: int, seed: int, weights: list[float] | None = None):
        self.tokens = [c.tokens for c in corpora]
        self.ctx_len = ctx_len
        self.seed = seed
        self.primes = [magic_prime(c.num_tokens, ctx_len) for c in corpora]
        self.mixture = Mixture(weights or [1.0] * len(corpora))

    def __len__(self) -> int:
        return sum(self.primes)  # one pass' worth of windows; sample numbers beyond it wrap around

    def __getitem__(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        corpus, j = self.mixture.locate(n)
        start = window_start(j, self.primes[corpus], self.ctx_len, self.seed)
        window = self.tokens[corpus][start : start + self.ctx_len + 1]
        window = torch.from_numpy(np.asarray(window, dtype=np.int64))
        return window[:-1], window[1:]


@dataclass
class BatchLayout:
    """Who reads which samples: the batch arithmetic in one place."""

    micro_bsz: int
    accumulate: int
    world: int
    rank: int

    def samples(self, micro_batch: int) -> range:
        """Global sample numbers of this rank's `micro_batch`-th micro-batch (counted from step 0)."""
        first = (micro_batch * self.world + self.rank) * self.micro_bsz
        return range(first, first + self.micro_bsz)


class TrainSampler(Sampler[int]):
    """Yields this rank's sample numbers from the current optimiser step to the last one.

    `start_step` is read when iteration begins, so a run restored from a checkpoint carries on at the
    exact sample where the interrupted run stopped.
    """

    def __init__(self, layout: BatchLayout, total_steps: int, start_step: Callable[[], int]):
        self.layout = layout
        self.total_steps = total_steps
        self.start_step = start_step

    def __len__(self) -> int:
        return self.total_steps * self.layout.accumulate * self.layout.micro_bsz

    def __iter__(self) -> Iterator[int]:
        acc = self.layout.accumulate
        for q in range(self.start_step() * acc, self.total_steps * acc):
            yield from self.layout.samples(q)


class ValWindows(Dataset):
    """Consecutive windows tokens[jL : jL+L+1] from the start of a corpus, each scored from a zero state."""

    def __init__(self, data: BinIdx, ctx_len: int, max_tokens: int, rank: int = 0, world: int = 1):
        self.tokens = data.tokens
        self.ctx_len = ctx_len
        count = min((data.num_tokens - 1) // ctx_len, max(1, max_tokens // ctx_len))
        if count < 1:
            raise DataError(
                f"validation corpus has {data.num_tokens} tokens, fewer than data.ctx_len + 1 = {ctx_len + 1}: "
                "use a larger validation file or a smaller data.ctx_len"
            )
        self.windows = list(range(rank, count, world))  # this rank's share

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.windows[i] * self.ctx_len
        window = torch.from_numpy(np.asarray(self.tokens[start : start + self.ctx_len + 1], dtype=np.int64))
        return window[:-1], window[1:]
