"""Megatron / RWKV-LM "binidx" token files: `PREFIX.bin` + `PREFIX.idx`.

`.bin` holds the tokens of every sequence back to back. `.idx` is, little endian:

    magic    b"MMIDIDX\\x00\\x00"   9 bytes
    version  <Q  = 1
    dtype    <B  code from DTYPE_CODES
    n        <Q  number of sequences
    n_docs   <Q  number of doc_idx entries
    sizes    int32[n]       tokens per sequence
    pointers int64[n]       byte offset of each sequence in .bin
    doc_idx  int64[n_docs]  sequence index where each document starts, plus the end

As RWKV-LM's make_data.py writes it, every document is one sequence (its tokens
then the end-of-document id 0), so doc_idx is 0, 1, ..., n (n + 1 entries).
Megatron-LM's sentence-split mode writes each sentence as a sequence, so a
document spans doc_idx[d] .. doc_idx[d+1] - 1; `BinIdx.document` reads either.
Training reads the `.bin` as one flat token stream; the index is only a check.

Dtype codes follow Megatron-LM's current `DType` table (6 float64, 7 float32).
The fairseq-derived copies in GPT-NeoX and RWKV-LM map 7 to float64 (np.double);
the reader takes code 7 as float32 unless the .bin only fits float64. Tokens are
written as uint16 (code 8) up to 65536 ids and as int32 (code 4) beyond: there
is no uint32 code that Megatron, GPT-NeoX and RWKV-LM all read.
"""

from __future__ import annotations

import os
import struct
from array import array
from pathlib import Path
from types import TracebackType
from typing import Iterable

import numpy as np

from rwkv_train.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, n sequences, n doc_idx
_MAX_SEQUENCE = 2**31 - 1  # sizes are int32

# Codes as Megatron-LM writes them (6 is float64, 7 float32; RWKV-LM's and
# GPT-NeoX's copies read both 6 and 7 as float64). Token files only use 8 or 4.
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_CODE_FOR_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}

_MAKE_HINT = "build it with `python data_prep/make_binidx.py --input FILE --output PREFIX`"


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """Smallest usual token dtype for a vocabulary: uint16 up to 65536 ids, else int32."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def bin_path(prefix: str | Path) -> Path:
    """`PREFIX.bin` (the suffix is appended, never substituted)."""
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | Path) -> Path:
    """`PREFIX.idx`."""
    return Path(f"{prefix}.idx")


def strip_suffix(prefix: str | Path) -> str:
    """Accept `data/x`, `data/x.bin` or `data/x.idx` and return `data/x`."""
    text = str(prefix)
    for suffix in (".bin", ".idx"):
        if text.endswith(suffix):
            return text[: -len(suffix)]
    return text


class BinIdxWriter:
    """Write a binidx pair atomically: temp files, renamed only when the `with` block succeeds.

    Usage::

        with BinIdxWriter("data/corpus", np.uint16) as writer:
            writer.add_document(tokens)

    With `deferred=True` a successful block leaves the finished pair under its
    temp names (`PREFIX.bin.tmp`, `PREFIX.idx.tmp`) until `commit()`, so that a
    caller can publish several files together; `discard()` drops them.
    """

    def __init__(
        self,
        prefix: str | Path,
        dtype: np.dtype | type = np.uint16,
        overwrite: bool = False,
        deferred: bool = False,
    ) -> None:
        self.prefix = strip_suffix(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_FOR_DTYPE or self.dtype.kind not in "ui":
            raise DataError(
                f"cannot write tokens as {self.dtype}; use an integer dtype from DTYPE_CODES "
                "(uint16 for vocabularies up to 65536, else int32)"
            )
        self.bin_path, self.idx_path = bin_path(self.prefix), idx_path(self.prefix)
        if not overwrite:
            existing = [str(p) for p in (self.bin_path, self.idx_path) if p.exists()]
            if existing:
                raise DataError(
                    f"output file(s) {' and '.join(existing)} already exist; choose another output prefix or "
                    "pass overwrite=True (--overwrite) to replace it"
                )
        parent = self.bin_path.parent
        if not parent.is_dir():
            raise DataError(f"output directory {parent} does not exist; create it first")
        self._bin_tmp = Path(f"{self.bin_path}.tmp")
        self._idx_tmp = Path(f"{self.idx_path}.tmp")
        self._bin_file = None
        self._deferred = deferred
        self._finished = False
        # array('q') rather than a list: 8 bytes per document on huge corpora.
        self._sizes = array("q")
        self._num_tokens = 0
        self._max_id = -1
        info = np.iinfo(self.dtype)
        self._min, self._max = int(info.min), int(info.max)

    @property
    def max_token_id(self) -> int:
        """The largest token id written so far (-1 before any)."""
        return self._max_id

    @property
    def num_tokens(self) -> int:
        """Tokens written so far."""
        return self._num_tokens

    @property
    def num_documents(self) -> int:
        """Documents written so far."""
        return len(self._sizes)

    def __enter__(self) -> "BinIdxWriter":
        self._bin_file = open(self._bin_tmp, "wb")
        return self

    def add_document(self, tokens: Iterable[int] | np.ndarray) -> None:
        """Append one document (one sequence) of token ids."""
        ids = np.asarray(tokens)
        if ids.ndim != 1:
            raise DataError(f"a document must be a 1-D list of token ids, got shape {ids.shape}")
        self.add_documents(ids, np.array([ids.size]))

    def add_documents(self, tokens: np.ndarray, sizes: np.ndarray) -> None:
        """Append many documents at once: `tokens` is their concatenation, `sizes` their lengths."""
        if self._bin_file is None:
            raise RuntimeError("BinIdxWriter.add_documents called outside its `with` block")
        ids, sizes = np.asarray(tokens), np.asarray(sizes, dtype=np.int64)
        if ids.ndim != 1 or sizes.ndim != 1:
            raise DataError("add_documents takes a 1-D token array and a 1-D array of sizes")
        if int(sizes.sum()) != ids.size or (sizes.size and int(sizes.min()) < 0):
            raise DataError(f"document sizes add up to {int(sizes.sum())}, but {ids.size} tokens were given")
        if sizes.size and int(sizes.max()) > _MAX_SEQUENCE:
            raise DataError(
                f"a document has {int(sizes.max())} tokens, more than binidx can store ({_MAX_SEQUENCE}); split it"
            )
        if ids.size:
            if ids.dtype.kind not in "ui":
                raise DataError(f"token ids must be integers, got dtype {ids.dtype}")
            low, high = int(ids.min()), int(ids.max())
            if low < self._min or high > self._max:
                raise DataError(
                    f"token ids {low}..{high} do not fit {self.dtype} ({self._min}..{self._max}); "
                    "write with a wider dtype (dtype_for_vocab(vocab_size))"
                )
            self._max_id = max(self._max_id, high)
        self._bin_file.write(ids.astype(self.dtype, copy=False).tobytes(order="C"))
        self._sizes.extend(sizes.tolist())
        self._num_tokens += int(ids.size)

    @property
    def temp_paths(self) -> tuple[Path, Path]:
        """Where the .bin and .idx are written before they get their final names."""
        return self._bin_tmp, self._idx_tmp

    def commit(self) -> None:
        """Give a deferred writer's finished files their final names (.bin first, .idx last)."""
        if not self._finished:
            raise RuntimeError("BinIdxWriter.commit needs a deferred writer whose `with` block succeeded")
        os.replace(self._bin_tmp, self.bin_path)
        os.replace(self._idx_tmp, self.idx_path)
        self._finished = False

    def discard(self) -> None:
        """Remove a deferred writer's finished temp files instead of committing them."""
        self._remove_temps()
        self._finished = False

    def _write_index(self) -> None:
        sizes = np.frombuffer(self._sizes, dtype=np.int64) if self._sizes else np.zeros(0, np.int64)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        np.cumsum(sizes[:-1] * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)  # one sequence per document
        with open(self._idx_tmp, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, _CODE_FOR_DTYPE[self.dtype], len(sizes), len(doc_idx)))
            f.write(sizes.astype("<i4").tobytes())
            f.write(pointers.astype("<i8").tobytes())
            f.write(doc_idx.astype("<i8").tobytes())

    def _remove_temps(self) -> None:
        for path in (self._bin_tmp, self._idx_tmp):
            path.unlink(missing_ok=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._bin_file is not None
        self._bin_file.close()
        self._bin_file = None
        if exc_type is not None:
            self._remove_temps()
            return
        try:
            self._write_index()
            if self._deferred:
                self._finished = True
                return
            # Dying between the two renames leaves a new .bin beside an old (or
            # no) .idx, which BinIdx rejects by its size check.
            os.replace(self._bin_tmp, self.bin_path)
            os.replace(self._idx_tmp, self.idx_path)
        except BaseException:
            self._remove_temps()
            raise


class BinIdx:
    """Read-only view of a binidx pair through np.memmap.

    `tokens` is the flat stream of every token; `self[i]` is the i-th sequence.
    """

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = strip_suffix(prefix)
        self.bin_path, self.idx_path = bin_path(self.prefix), idx_path(self.prefix)
        for path in (self.idx_path, self.bin_path):
            if not path.is_file():
                raise DataError(
                    f"{path} does not exist; check data.train / data.val (a prefix, without .bin/.idx) "
                    f"or {_MAKE_HINT}"
                )
        self.dtype, n, n_docs, offset = self._read_header()
        self.dtype_code = self._code
        expected = offset + 4 * n + 8 * n + 8 * n_docs
        actual = self.idx_path.stat().st_size
        if actual == expected + n and n:
            raise DataError(
                f"{self.idx_path} carries per-sequence modes (a multimodal Megatron index); only "
                f"text indexes are supported, {_MAKE_HINT}"
            )
        if actual != expected:
            raise DataError(
                f"{self.idx_path} has {actual} bytes but its header promises {expected} "
                f"({n} sequences, {n_docs} doc_idx entries); the file is truncated or corrupt, {_MAKE_HINT}"
            )
        index = np.memmap(self.idx_path, mode="r", dtype=np.uint8)
        self.sizes: np.ndarray = np.frombuffer(index, dtype="<i4", count=n, offset=offset)
        self.pointers: np.ndarray = np.frombuffer(index, dtype="<i8", count=n, offset=offset + 4 * n)
        self.doc_idx: np.ndarray = np.frombuffer(index, dtype="<i8", count=n_docs, offset=offset + 12 * n)
        self.num_tokens = int(self.sizes.sum(dtype=np.int64))
        if self._code == 7 and self.bin_path.stat().st_size == 8 * self.num_tokens != 4 * self.num_tokens:
            self.dtype = np.dtype(np.float64)  # a fairseq-style writer's np.double (see the module doc)
        self._check_bin()
        if self.num_tokens:
            self.tokens: np.ndarray = np.memmap(
                self.bin_path, mode="r", dtype=self.dtype, shape=(self.num_tokens,)
            )
        else:  # np.memmap refuses empty files
            self.tokens = np.empty(0, dtype=self.dtype)

    def _read_header(self) -> tuple[np.dtype, int, int, int]:
        with open(self.idx_path, "rb") as f:
            raw = f.read(_HEADER.size)
        if len(raw) < len(MAGIC) or raw[: len(MAGIC)] != MAGIC:
            raise DataError(
                f"{self.idx_path} is not a binidx index (it does not start with {MAGIC!r}); "
                f"point data.data_file at a Megatron/RWKV-LM binidx prefix or {_MAKE_HINT}"
            )
        if len(raw) < _HEADER.size:
            raise DataError(f"{self.idx_path} is truncated inside its header; {_MAKE_HINT}")
        _, version, code, n, n_docs = _HEADER.unpack(raw)
        if version != VERSION:
            raise DataError(
                f"{self.idx_path} has binidx version {version}; only version {VERSION} is supported, "
                f"{_MAKE_HINT}"
            )
        if code not in DTYPE_CODES:
            raise DataError(
                f"{self.idx_path} has unknown dtype code {code} (known: {sorted(DTYPE_CODES)}); "
                f"the file is corrupt or from another format, {_MAKE_HINT}"
            )
        self._code = code
        return DTYPE_CODES[code], n, n_docs, _HEADER.size

    def _check_bin(self) -> None:
        """The .bin must hold exactly the tokens the index describes, in order."""
        itemsize = self.dtype.itemsize
        expected = self.num_tokens * itemsize
        actual = self.bin_path.stat().st_size
        hint = f"the pair does not belong together or was cut short; rebuild it ({_MAKE_HINT})"
        if actual != expected:
            raise DataError(
                f"{self.bin_path} has {actual} bytes but {self.idx_path} describes "
                f"{self.num_tokens} {self.dtype} tokens ({expected} bytes); {hint}"
            )
        # A cheap check of the pointers (a full cumsum would cost memory on
        # huge corpora): contiguous sequences start at 0 and end at the end.
        if len(self.sizes) and (
            int(self.pointers[0]) != 0 or int(self.pointers[-1]) + int(self.sizes[-1]) * itemsize != expected
        ):
            raise DataError(f"{self.idx_path} has pointers that do not match its sizes; {hint}")

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        """The i-th sequence (a read-only view into the memmap)."""
        n = len(self.sizes)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {n} sequences")
        i %= n
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.sizes[i])]

    @property
    def num_documents(self) -> int:
        """Number of documents (doc_idx has one more entry than this)."""
        return max(len(self.doc_idx) - 1, 0)

    def document(self, d: int) -> np.ndarray:
        """The tokens of document d: its sequences doc_idx[d] .. doc_idx[d+1] - 1, concatenated.

        One sequence per document (RWKV-LM) and several (Megatron's sentence
        split) read the same way; sequences lie back to back in the .bin.
        """
        n = self.num_documents
        if not -n <= d < n:
            raise IndexError(f"document {d} out of range for {n} documents")
        d %= n
        first, last = int(self.doc_idx[d]), int(self.doc_idx[d + 1])
        if not 0 <= first <= last <= len(self.sizes):
            raise DataError(
                f"{self.idx_path}: doc_idx[{d}:{d + 2}] = {first}, {last} is not a range of its "
                f"{len(self.sizes)} sequences; the index is corrupt, {_MAKE_HINT}"
            )
        if first == last:
            return self.tokens[:0]
        start = int(self.pointers[first]) // self.dtype.itemsize
        end = int(self.pointers[last - 1]) // self.dtype.itemsize + int(self.sizes[last - 1])
        return self.tokens[start:end]

    def document_lengths(self) -> np.ndarray:
        """Tokens per document (int64), from the index alone."""
        if self.num_documents == 0:
            return np.zeros(0, dtype=np.int64)
        bounds = np.zeros(len(self.sizes) + 1, dtype=np.int64)
        np.cumsum(self.sizes, out=bounds[1:])
        doc_idx = np.clip(np.asarray(self.doc_idx, dtype=np.int64), 0, len(self.sizes))
        return np.diff(bounds[doc_idx])

    def __repr__(self) -> str:
        return f"BinIdx({self.prefix!r}, sequences={len(self)}, tokens={self.num_tokens}, dtype={self.dtype})"
