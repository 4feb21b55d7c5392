"""Turn text corpora into a tokenized binidx corpus (the logic behind data_prep/make_binidx.py).

Conventions match RWKV-LM's make_data.py, so corpora are interchangeable:
every document is tokenized, followed by the end-of-document id (0), and
written as one binidx sequence (doc_idx = 0, 1, ..., n). Blank lines of a
JSON-lines file and empty documents are skipped (and counted).

The build streams: inputs are read in batches (see sources.py), tokenized by
a pool of workers in order (tokenize_pool.py) and appended to the output, so
memory does not grow with the corpus (beyond the index: 8 bytes per document).

  * shuffle / epochs: the documents are tokenized once into a temporary binidx
    (`PREFIX.tokens.tmp.bin/.idx`), then copied to the output pass by pass in a
    permuted order through its memory-mapped index (one int64 per document).
    Each pass has its own permutation, drawn from (seed, pass), as make_data.py
    repeats and reshuffles a fine-tuning set.
  * validation split: a document goes to the validation output when a hash of
    (its index among the kept documents, seed) falls below the fraction; that
    is deterministic and needs no second pass. Validation documents are
    written once, in input order.
  * all or nothing: every file is written under a temporary name; at the end
    the sidecars and .bin files get their names and the .idx files last (an
    old .idx is removed first when overwriting), so a run killed at any moment
    leaves no corpus that reads as finished. Leftover temporary files of a
    killed run are removed by the next run for the same output.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from rwkv_train.data.binidx import (
    BinIdx,
    BinIdxWriter,
    bin_path,
    dtype_for_vocab,
    idx_path,
    strip_suffix,
)
from rwkv_train.data.sources import (
    STDIN,
    ParseOptions,
    ParseStats,
    Source,
    expand_inputs,
    iter_batches,
    iter_documents,
)
from rwkv_train.data.tokenize_pool import TokenizePool, TokenizerSpec
from rwkv_train.errors import DataError

__all__ = ["BuildReport", "build_binidx", "holdout_mask", "iter_documents", "sidecar_path"]

DEFAULT_BATCH_BYTES = 2 << 20  # input per worker task: large enough to amortise the IPC, small for memory
_REWRITE_TOKENS = 1 << 22  # tokens gathered per write while shuffling

# progress(documents_done, tokens_done, input_bytes_read)
ProgressFn = Callable[[int, int, int], None]
# rewrite_progress(documents_written, documents_total)
RewriteProgressFn = Callable[[int, int], None]


def sidecar_path(prefix: str | Path) -> Path:
    """`PREFIX.json`, the description written next to PREFIX.bin/.idx."""
    return Path(f"{strip_suffix(prefix)}.json")


def _staging_prefix(prefix: str) -> str:
    return f"{prefix}.tokens.tmp"


def temp_paths(prefix: str) -> list[Path]:
    """Every temporary file a build of `prefix` may leave behind when killed."""
    stage = _staging_prefix(prefix)
    names = [f"{prefix}.bin.tmp", f"{prefix}.idx.tmp", f"{prefix}.json.tmp",
             f"{stage}.bin", f"{stage}.idx", f"{stage}.bin.tmp", f"{stage}.idx.tmp"]
    return [Path(n) for n in names]


@dataclass
class BuildReport:
    """What a build wrote and what it left out."""

    train: dict  # the sidecar of the training output (PREFIX.json)
    val: dict | None  # the sidecar of the validation output, if any
    documents: int  # documents kept from the inputs (before repetition and split)
    empty: int  # empty documents skipped
    bad: int  # bad lines skipped (--skip-bad)
    bad_examples: list[str] = field(default_factory=list)
    input_bytes: int = 0  # bytes read from disk
    text_bytes: int = 0  # UTF-8 bytes of the documents
    tokenize_seconds: float = 0.0
    seconds: float = 0.0
    removed_temps: list[str] = field(default_factory=list)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def holdout_mask(first: int, count: int, seed: int, fraction: float) -> np.ndarray:
    """Whether documents first .. first+count-1 go to the validation split (a hash of index and seed)."""
    if fraction <= 0 or count == 0:
        return np.zeros(count, dtype=bool)
    key = _mix64(np.array([seed], dtype=np.uint64))[0]
    h = _mix64(np.arange(first, first + count, dtype=np.uint64) ^ key)
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53 < fraction


def _check_options(epochs: int, val_fraction: float, seed: int, errors: str, workers: int, batch_bytes: int) -> None:
    problems = []
    if epochs < 1:
        problems.append(f"--epochs must be at least 1, got {epochs}")
    if not 0 <= val_fraction < 1:
        problems.append(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if seed < 0:
        problems.append(f"--seed must be a non-negative integer, got {seed}")
    if errors not in ("strict", "replace"):
        problems.append(f"--errors must be strict or replace, got {errors!r}")
    if workers < 1:
        problems.append(f"--workers must be at least 1, got {workers}")
    if batch_bytes < 1:
        problems.append(f"the batch size must be positive, got {batch_bytes} bytes")
    if problems:
        raise DataError("; ".join(problems))


def _check_outputs(prefixes: list[str], overwrite: bool) -> None:
    for prefix in prefixes:
        outputs = (bin_path(prefix), idx_path(prefix), sidecar_path(prefix))
        existing = [str(p) for p in outputs if p.exists()]
        if existing and not overwrite:
            raise DataError(
                f"output file(s) {', '.join(existing)} already exist; "
                "choose another --output prefix or pass --overwrite"
            )
        parent = outputs[0].parent
        if not parent.is_dir():
            raise DataError(
                f"output directory {parent} does not exist; create it first or choose another --output"
            )


def _remove_stale_temps(prefixes: list[str]) -> list[str]:
    removed = []
    for prefix in prefixes:
        for path in temp_paths(prefix):
            if path.exists():
                path.unlink()
                removed.append(str(path))
    return removed


def build_binidx(
    inputs: Sequence[str | Path],
    output: str | Path,
    text_key: str = "text",
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    *,
    tokenizer: str = "world",
    eod_id: int = 0,
    workers: int = 1,
    shuffle: bool = False,
    seed: int = 0,
    epochs: int = 1,
    val_fraction: float = 0.0,
    val_output: str | Path | None = None,
    skip_bad: bool = False,
    errors: str = "strict",
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    rewrite_progress: RewriteProgressFn | None = None,
) -> BuildReport:
    """Tokenize `inputs` into OUTPUT.bin/.idx/.json (and a validation split); see the module doc.

    Either every output file appears or none does; existing ones are replaced
    only when `overwrite` is true and the build succeeds.
    """
    start = time.perf_counter()
    _check_options(epochs, val_fraction, seed, errors, workers, batch_bytes)
    prefix = strip_suffix(output)
    val_prefix = None
    if val_output is not None and val_fraction <= 0:
        raise DataError("--val-output needs --val-fraction F (the share of documents to hold out)")
    if val_fraction > 0:
        val_prefix = strip_suffix(val_output) if val_output is not None else f"{prefix}_val"
        if Path(val_prefix).resolve() == Path(prefix).resolve():
            raise DataError("--val-output must differ from --output")
    prefixes = [prefix] + ([val_prefix] if val_prefix else [])
    # This run's own outputs (a directory input may hold an earlier PREFIX.json) are never inputs.
    own = {f.resolve() for q in prefixes for f in (bin_path(q), idx_path(q), sidecar_path(q))}
    sources = [s for s in expand_inputs(inputs) if s.path == STDIN or Path(s.path).resolve() not in own]
    _check_outputs(prefixes, overwrite)  # before the slow part, not after
    removed = _remove_stale_temps(prefixes)
    spec = TokenizerSpec(tokenizer, eod_id)
    tok = spec.load()
    dtype = dtype_for_vocab(tok.vocab_size)
    staged = shuffle or epochs > 1
    options = ParseOptions(text_key, skip_bad, errors)
    tokenize_start = time.perf_counter()  # throughput excludes loading the tokenizer
    stats = ParseStats()
    input_bytes = text_bytes = documents = tokens_done = 0
    first = val = final = None

    try:
        with ExitStack() as stack:
            first = stack.enter_context(
                BinIdxWriter(_staging_prefix(prefix) if staged else prefix, dtype,
                             overwrite=overwrite or staged, deferred=not staged)
            )
            if val_prefix:
                val = stack.enter_context(BinIdxWriter(val_prefix, dtype, overwrite=overwrite, deferred=True))
            pool = stack.enter_context(TokenizePool(spec, dtype, options, workers, tokenizer=tok))
            for result in pool.imap(iter_batches(sources, batch_bytes)):
                stats.merge(result.stats)
                count = len(result.sizes)
                if val is not None and count:
                    held = holdout_mask(documents, count, seed, val_fraction)
                    per_token = np.repeat(held, result.sizes)
                    val.add_documents(result.tokens[per_token], result.sizes[held])
                    first.add_documents(result.tokens[~per_token], result.sizes[~held])
                else:
                    first.add_documents(result.tokens, result.sizes)
                documents += count
                tokens_done += result.tokens.size
                input_bytes += result.input_bytes
                text_bytes += result.text_bytes
                if progress is not None:
                    progress(documents, tokens_done, input_bytes)
            # Raising inside the block makes the writers discard their temp files.
            _check_counts(sources, documents, stats, first.num_documents, val, val_fraction)
        tokenize_seconds = time.perf_counter() - tokenize_start
        writers = [w for w in (val, first) if w is not None]
        if staged:
            final = BinIdxWriter(prefix, dtype, overwrite=overwrite, deferred=True)
            with final:
                _rewrite(_staging_prefix(prefix), final, epochs, shuffle, seed, rewrite_progress)
            writers[-1] = final
        sidecars = []
        for writer in writers:
            is_val = writer is val
            sidecars.append({
                "tokenizer": tok.name,
                "vocab_size": tok.vocab_size,
                "eod_id": tok.eod_id,
                "num_tokens": writer.num_tokens,
                "num_documents": writer.num_documents,
                "max_token_id": writer.max_token_id,
                "dtype": dtype.name,
                "sources": [s.path for s in sources],
                "split": "val" if is_val else "train",
                "epochs": 1 if is_val else epochs,
                "shuffle": False if is_val else shuffle,
                "seed": seed,
                "val_fraction": val_fraction,
            })
        _publish(writers, sidecars)
    except BaseException:
        for writer in (first, val, final):
            if writer is not None:
                writer.discard()
        for p in prefixes:
            Path(f"{sidecar_path(p)}.tmp").unlink(missing_ok=True)
        raise
    finally:
        for path in temp_paths(prefix)[3:]:  # the staging copy, used or not
            path.unlink(missing_ok=True)
    return BuildReport(
        train=sidecars[-1], val=sidecars[0] if val is not None else None, documents=documents,
        empty=stats.empty, bad=stats.bad, bad_examples=stats.examples, input_bytes=input_bytes,
        text_bytes=text_bytes, tokenize_seconds=tokenize_seconds, seconds=time.perf_counter() - start,
        removed_temps=removed,
    )


def _check_counts(sources: list[Source], documents: int, stats: ParseStats, train_documents: int,
                  val: BinIdxWriter | None, val_fraction: float) -> None:
    if documents == 0:
        names = ", ".join(s.path for s in sources[:5]) + (", ..." if len(sources) > 5 else "")
        left_out = []
        if stats.empty:
            left_out.append(f"{stats.empty} empty")
        if stats.bad:
            left_out.append(f"{stats.bad} bad lines skipped")
        detail = f" ({', '.join(left_out)})" if left_out else ""
        raise DataError(f"the inputs hold no documents{detail}: {names}; check the files and --text-key")
    if val is not None and val.num_documents == 0:
        raise DataError(
            f"--val-fraction {val_fraction} held out none of the {documents} documents; raise it or add documents"
        )
    if train_documents == 0:
        raise DataError(
            f"--val-fraction {val_fraction} held out all {documents} documents, leaving none to train on; lower it"
        )


def _rewrite(source: str, writer: BinIdxWriter, epochs: int, shuffle: bool, seed: int,
             progress: RewriteProgressFn | None) -> None:
    """Copy the documents of binidx `source` into `writer` `epochs` times, each pass permuted when `shuffle`.

    Documents are read with positioned reads rather than through a memory map, so that the pages of
    a corpus larger than memory do not pile up in this process: only the index is mapped.
    """
    index = BinIdx(source)
    n, dtype = len(index), index.dtype
    sizes_all, pointers_all = index.sizes, index.pointers
    block = 1 << 16  # documents considered per write
    done, total = 0, n * epochs
    with open(index.bin_path, "rb", buffering=0) as f:
        fd = f.fileno()
        for epoch in range(epochs):
            order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else None
            lo = 0
            while lo < n:
                idx = order[lo:lo + block] if order is not None else np.arange(lo, min(lo + block, n))
                sizes = sizes_all[idx].astype(np.int64)
                # Cut the block at about _REWRITE_TOKENS tokens (at least one document).
                take = max(1, int(np.searchsorted(np.cumsum(sizes), _REWRITE_TOKENS, side="right")))
                idx, sizes = idx[:take], sizes[:take]
                nbytes = (sizes * dtype.itemsize).tolist()
                if order is None:  # consecutive documents: one read
                    data = _pread(fd, sum(nbytes), int(pointers_all[idx[0]]))
                else:
                    data = b"".join(_pread(fd, size, offset)
                                    for size, offset in zip(nbytes, pointers_all[idx].tolist()))
                writer.add_documents(np.frombuffer(data, dtype=dtype), sizes)
                lo += take
                done += take
                if progress is not None:
                    progress(done, total)
    del index


def _pread(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    while len(data) < size:  # short reads are allowed; loop until done or the file ends
        more = os.pread(fd, size - len(data), offset + len(data))
        if not more:
            raise DataError(f"the staging corpus ended early at byte {offset + len(data)}; run again")
        data += more
    return data


def _publish(writers: list[BinIdxWriter], sidecars: list[dict]) -> None:
    """Give the finished outputs their names; the training .idx, last, marks the build as finished."""
    jsons = [(Path(f"{sidecar_path(w.prefix)}.tmp"), sidecar_path(w.prefix)) for w in writers]
    for (tmp, _), sidecar in zip(jsons, sidecars):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(sidecar, f, indent=2, ensure_ascii=False)
            f.write("\n")
    # An old .idx beside a new .bin could pass for a corpus: remove the old ones first.
    for writer in reversed(writers):
        writer.idx_path.unlink(missing_ok=True)
    for (tmp, final), writer in zip(jsons, writers):
        os.replace(tmp, final)
        writer.commit()
