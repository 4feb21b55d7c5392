"""Tokenize batches of input lines in worker processes, in order, with bounded memory.

The parent reads the inputs into `RawBatch`es; workers parse and tokenize
them (`tokenize_batch`, a pure function of the batch) and send back one flat
token array per batch. Results come back in submission order and at most
`max_in_flight` batches are out at once, so memory stays bounded whatever the
corpus size and the output is byte-identical for any number of workers.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Protocol

import numpy as np

from rwkv_train.data.sources import ParseOptions, ParseStats, RawBatch, parse_batch
from rwkv_train.errors import DataError


class CorpusTokenizer(Protocol):
    """What the corpus builder needs from a tokenizer."""

    vocab_size: int
    eod_id: int
    name: str

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class _World:
    """rwkv_train.tokenizer.WorldTokenizer behind the CorpusTokenizer interface."""

    name = "world"

    def __init__(self) -> None:
        from rwkv_train.tokenizer import WorldTokenizer

        self._tok = WorldTokenizer()
        self.vocab_size, self.eod_id = self._tok.vocab_size, self._tok.eod_id
        # The compiled encoder writes uint16 arrays directly: no list of Python ints to convert.
        self._to_array = getattr(self._tok, "encode_to_array", None)
        if getattr(self._tok, "backend", None) != "c":
            self._to_array = None
        self._batch = getattr(self._tok, "encode_batch", None)

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        if self._to_array is not None:
            return [self._to_array(text) for text in texts]
        if self._batch is not None:
            return [np.array(ids, dtype=np.int64) for ids in self._batch(texts)]
        encode = self._tok.encode_bytes
        return [np.array(encode(text.encode("utf-8")), dtype=np.int64) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(ids)


@dataclass(frozen=True)
class TokenizerSpec:
    """A picklable description of the tokenizer: "world" or the path of a tokenizer.json."""

    name: str = "world"
    eod_id: int = 0

    def load(self) -> CorpusTokenizer:
        if self.name == "world":
            if self.eod_id != 0:
                raise DataError(
                    f"--eod-id {self.eod_id} does not apply to the World tokenizer, whose end-of-document id "
                    "is 0; leave --eod-id out"
                )
            return _World()
        from rwkv_train.data.hf_tokenizer import HFTokenizer

        return HFTokenizer(self.name, self.eod_id)


@dataclass
class BatchResult:
    """One tokenized batch: documents back to back, each ending with the end-of-document id."""

    tokens: np.ndarray  # the output dtype
    sizes: np.ndarray  # int64, tokens per document (end-of-document id included)
    text_bytes: int  # UTF-8 bytes of the documents
    input_bytes: int  # bytes of the input on disk behind this batch
    stats: ParseStats = field(default_factory=ParseStats)


def tokenize_batch(
    batch: RawBatch, tokenizer: CorpusTokenizer, dtype: np.dtype, options: ParseOptions
) -> BatchResult:
    """Parse and tokenize one batch (what every worker runs)."""
    texts, where, stats = parse_batch(batch, options)
    encoded = tokenizer.encode_arrays(texts) if texts else []
    sizes = np.fromiter((ids.size + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
    wide = any(ids.dtype != dtype for ids in encoded)
    tokens = np.empty(int(sizes.sum()), dtype=np.int64 if wide else dtype)
    eod, vocab_size, pos = tokenizer.eod_id, tokenizer.vocab_size, 0
    for ids in encoded:
        n = ids.size
        tokens[pos:pos + n] = ids
        tokens[pos + n] = eod
        pos += n + 1
    del encoded
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        bad = np.flatnonzero((tokens < 0) | (tokens >= vocab_size))[0]
        doc = int(np.searchsorted(np.cumsum(sizes), bad, side="right"))
        raise DataError(
            f"{batch.source}:{where[doc]}: the tokenizer {tokenizer.name} produced token id {int(tokens[bad])}, "
            f"beyond its vocabulary of {vocab_size} ids; the tokenizer file is inconsistent, use another one"
        )
    text_bytes = sum(len(t.encode("utf-8")) for t in texts) if texts else 0
    return BatchResult(tokens.astype(dtype, copy=False), sizes, text_bytes, batch.input_bytes, stats)


# Per-process state of a worker, set once by _init_worker.
_STATE: tuple[CorpusTokenizer, np.dtype, ParseOptions] | None = None


def _init_worker(spec: TokenizerSpec, dtype: np.dtype, options: ParseOptions, parent: int) -> None:
    global _STATE
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker process
    _STATE = (spec.load(), np.dtype(dtype), options)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    # A killed parent (SIGKILL) cannot stop its pool; orphaned workers stop themselves.
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _work(batch: RawBatch) -> BatchResult:
    assert _STATE is not None, "worker not initialised"
    return tokenize_batch(batch, *_STATE)


class TokenizePool:
    """Ordered, bounded parallel tokenization; `workers <= 1` runs in this process.

    Usage::

        with TokenizePool(spec, np.uint16, options, workers=4) as pool:
            for result in pool.imap(batches):
                ...
    """

    def __init__(
        self,
        spec: TokenizerSpec,
        dtype: np.dtype,
        options: ParseOptions,
        workers: int = 1,
        max_in_flight: int | None = None,
        tokenizer: CorpusTokenizer | None = None,
    ) -> None:
        if workers < 1:
            raise DataError(f"--workers must be at least 1, got {workers}")
        self.spec, self.dtype, self.options, self.workers = spec, np.dtype(dtype), options, workers
        self.max_in_flight = max_in_flight or 2 * workers + 1
        self._tokenizer = tokenizer  # in-process use: reuse the caller's
        self._pool = None

    def __enter__(self) -> "TokenizePool":
        if self.workers > 1:
            # fork shares the loaded vocabulary with the workers; spawn elsewhere (fork is unsafe on macOS).
            method = "fork" if sys.platform.startswith("linux") else "spawn"
            context = multiprocessing.get_context(method)
            self._pool = context.Pool(
                self.workers, _init_worker, (self.spec, self.dtype, self.options, os.getpid())
            )
        elif self._tokenizer is None:
            self._tokenizer = self.spec.load()
        return self

    def imap(self, batches: Iterable[RawBatch]) -> Iterator[BatchResult]:
        """Results of `batches`, in their order."""
        if self._pool is None:
            assert self._tokenizer is not None, "use TokenizePool inside a `with` block"
            for batch in batches:
                yield tokenize_batch(batch, self._tokenizer, self.dtype, self.options)
            return
        pending: deque = deque()
        for batch in batches:
            pending.append(self._pool.apply_async(_work, (batch,)))
            if len(pending) >= self.max_in_flight:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._pool is not None:
            if exc_type is None:
                self._pool.close()
            else:
                self._pool.terminate()  # stop at once: queued batches are of no use now
            self._pool.join()
            self._pool = None
