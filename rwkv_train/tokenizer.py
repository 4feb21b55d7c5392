"""The RWKV World tokenizer (vocabulary `rwkv_vocab_v20230424.txt`).

Encoding is greedy longest match over UTF-8 bytes: at each position take the
longest vocabulary token that is a prefix of the remaining bytes. Every single
byte is a token, so any input encodes. Id 0 is not in the vocabulary file; it
marks the end of a document in RWKV corpora.

Two backends give identical ids:
  "c"       a double-array trie in C (`csrc/world_tokenizer.c`, built by
            `pip install -e .` as `rwkv_train._world_tokenizer`), ~100 MB/s;
            it releases the GIL on long inputs;
  "python"  a trie of dicts, ~3 MB/s: the fallback when the extension is not
            built (with one RuntimeWarning), and the oracle in the tests.

The vocabulary file ships inside the `rwkv` PyPI package, which is where we
read it from; nothing is downloaded.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from rwkv_train.errors import DataError

if TYPE_CHECKING:
    import numpy as np

VOCAB_FILE_NAME = "rwkv_vocab_v20230424.txt"
VOCAB_SIZE = 65536  # embedding rows; the file uses ids 1..65529, the rest are padding
EOD_ID = 0
BACKENDS = ("auto", "c", "python")
COMPILED_MODULE = "rwkv_train._world_tokenizer"
BUILD_HINT = (
    "build it with `make setup` (or `pip install -e .`) on a machine with a C compiler "
    "(gcc, clang or MSVC) and the Python headers"
)

# A trie node maps a byte value to its child node; the id of the token that
# ends at this node (if any) is stored under the key _ID, which no byte uses.
_ID = -1
_Trie = dict

# Set once the missing extension has been reported, so the warning appears once per process.
_fallback_warned = False


def vocab_path() -> Path:
    """Path of the World vocabulary file inside the installed `rwkv` package."""
    spec = importlib.util.find_spec("rwkv")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the World tokenizer needs the vocabulary file from the `rwkv` package, which is not "
            "installed; run `pip install rwkv`"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / VOCAB_FILE_NAME
        if path.is_file():
            return path
    raise DataError(
        f"the installed `rwkv` package has no {VOCAB_FILE_NAME}; reinstall it with "
        "`pip install --force-reinstall rwkv`"
    )


def _token_literal(literal: str) -> str | bytes:
    """The token a vocabulary literal spells: `'...'` (text) or `b'...'` (bytes)."""
    # Nearly every line is a quoted literal without escapes; slicing those is ten times
    # faster than ast.literal_eval, which handles the rest (and any malformed line).
    if "\\" not in literal and len(literal) >= 2:
        quote = literal[0]
        if quote in "'\"" and literal[-1] == quote and quote not in literal[1:-1]:
            return literal[1:-1]
        if quote == "b" and len(literal) >= 3:
            quote = literal[1]
            if quote in "'\"" and literal[-1] == quote and quote not in literal[2:-1]:
                # bytes literals hold ASCII only; anything else fails here as it would in Python
                return literal[2:-1].encode("ascii")
    return ast.literal_eval(literal)


def _parse_vocab(path: Path) -> dict[int, bytes]:
    """Read `id repr(token) length` lines into {id: token bytes}."""
    id_to_bytes: dict[int, bytes] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip("\n")
            if not line:
                continue
            try:
                # The token literal may itself contain spaces, so split at the
                # first and the last space only.
                first, last = line.index(" "), line.rindex(" ")
                token_id = int(line[:first])
                token = _token_literal(line[first + 1:last])
                length = int(line[last + 1:])
            except (ValueError, SyntaxError, UnicodeEncodeError) as exc:
                raise DataError(
                    f"{path}:{line_no}: malformed vocabulary line ({exc}); reinstall the `rwkv` "
                    "package with `pip install --force-reinstall rwkv`"
                ) from None
            if isinstance(token, str):
                token = token.encode("utf-8")
            if not isinstance(token, bytes) or len(token) != length:
                raise DataError(
                    f"{path}:{line_no}: token does not match its stated length {length}; "
                    "reinstall the `rwkv` package with `pip install --force-reinstall rwkv`"
                )
            id_to_bytes[token_id] = token
    return id_to_bytes


@functools.cache
def _compiled() -> tuple[ModuleType | None, str]:
    """The compiled extension and "", or None and why it could not be imported."""
    try:
        return importlib.import_module(COMPILED_MODULE), ""
    except ImportError as exc:
        return None, str(exc)


def compiled_available() -> bool:
    """Whether the compiled tokenizer is built and importable."""
    return _compiled()[0] is not None


class _Vocab:
    """A parsed vocabulary; each backend's trie is built from it on first use."""

    def __init__(self, path: str, id_to_bytes: dict[int, bytes]) -> None:
        self.path = path
        self.max_id = max(id_to_bytes)  # 65529: decode refuses ids above it
        # Index = id; id 0 and the unused tail decode to nothing (see decode_bytes).
        table = [b""] * VOCAB_SIZE
        for token_id, token in id_to_bytes.items():
            table[token_id] = token
        self.id_to_bytes: tuple[bytes, ...] = tuple(table)

    @functools.cached_property
    def python_trie(self) -> _Trie:
        root: _Trie = {}
        for token_id, token in enumerate(self.id_to_bytes):
            if not token:
                continue
            node = root
            for byte in token:
                node = node.setdefault(byte, {})
            node[_ID] = token_id
        return root

    @functools.cached_property
    def compiled_trie(self):  # a rwkv_train._world_tokenizer.Trie
        module, _ = _compiled()
        return module.Trie(self.id_to_bytes)


@functools.cache
def _load_vocab(path: str) -> _Vocab:
    """Parse and check the vocabulary once per process."""
    id_to_bytes = _parse_vocab(Path(path))
    if not id_to_bytes or EOD_ID in id_to_bytes or max(id_to_bytes) >= VOCAB_SIZE or min(id_to_bytes) < 0:
        raise DataError(
            f"{path}: ids must lie in 1..{VOCAB_SIZE - 1} (0 is end-of-document); this is not "
            "the World vocabulary; reinstall the `rwkv` package"
        )
    if len(set(id_to_bytes.values())) != len(id_to_bytes):
        # Two ids for one token: which one encoding should produce is anyone's guess.
        seen: dict[bytes, int] = {}
        first, second = next((seen[t], i) for i, t in id_to_bytes.items() if seen.setdefault(t, i) != i)
        raise DataError(
            f"{path}: ids {first} and {second} are the same token {id_to_bytes[first]!r}; this is not "
            "the World vocabulary; reinstall the `rwkv` package"
        )
    single = {token[0] for token in id_to_bytes.values() if len(token) == 1}
    if len(single) != 256:
        # Without every single byte some inputs could not be encoded at all.
        raise DataError(
            f"{path}: single-byte tokens missing for {256 - len(single)} byte values; this is not "
            "the World vocabulary; reinstall the `rwkv` package"
        )
    return _Vocab(path, id_to_bytes)


class _PythonEncoder:
    """Greedy longest match on a trie of dicts: the same interface as the compiled Trie."""

    def __init__(self, root: _Trie) -> None:
        self._root = root

    def encode(self, text: str) -> list[int]:
        return self.encode_bytes(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def encode_bytes(self, data: bytes) -> list[int]:
        root = self._root
        ids: list[int] = []
        append = ids.append
        n = len(data)
        pos = 0
        while pos < n:
            # Walk the trie as far as the bytes allow, remembering the last
            # node that ends a token: that is the longest match. The first
            # byte always matches, since every byte value is a token.
            node = root[data[pos]]
            best_id = node[_ID]
            end = pos + 1
            i = end
            while i < n:
                node = node.get(data[i])
                if node is None:
                    break
                i += 1
                token_id = node.get(_ID)
                if token_id is not None:
                    best_id, end = token_id, i
            append(best_id)
            pos = end
        return ids


class WorldTokenizer:
    """RWKV World tokenizer: 65536 ids, greedy longest byte match, id 0 = end of document.

    `backend` is "auto" (compiled when built, else pure Python with one warning),
    "c" (compiled or an ImportError) or "python".
    """

    def __init__(self, vocab_file: str | Path | None = None, backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        path = Path(vocab_file) if vocab_file is not None else vocab_path()
        if not path.is_file():
            raise DataError(f"vocabulary file {path} does not exist; pass the path of {VOCAB_FILE_NAME}")
        vocab = _load_vocab(str(path.resolve()))
        self._id_to_bytes, self._max_id = vocab.id_to_bytes, vocab.max_id
        if backend != "python":
            module, why = _compiled()
            if module is not None:
                backend = "c"
            elif backend == "c":
                raise ImportError(f"the compiled World tokenizer is unavailable ({why}); {BUILD_HINT}")
            else:
                _warn_fallback(why)
                backend = "python"
        self._backend = backend
        # Both expose encode, encode_bytes and encode_batch with the same results.
        self._compiled = vocab.compiled_trie if backend == "c" else None
        self._encoder = self._compiled if backend == "c" else _PythonEncoder(vocab.python_trie)

    @property
    def vocab_size(self) -> int:
        """Number of embedding rows a model needs (65536)."""
        return VOCAB_SIZE

    @property
    def eod_id(self) -> int:
        """Id that ends a document (0)."""
        return EOD_ID

    @property
    def backend(self) -> str:
        """Which encoder runs: "c" (compiled) or "python" (the fallback)."""
        return self._backend

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (UTF-8 encoded first); never contains eod_id."""
        return self._encoder.encode(text)

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of raw bytes (any bytes-like object) by greedy longest match."""
        return self._encoder.encode_bytes(data)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`[encode(t) for t in texts]`, in one call (one GIL release) with the compiled backend."""
        return self._encoder.encode_batch(texts)

    def encode_to_array(self, data: str | bytes) -> np.ndarray:
        """Token ids of text or bytes as a writable uint16 numpy array (the binidx dtype).

        With the compiled backend this skips the list of Python ints altogether.
        """
        import numpy as np  # only this method needs numpy

        if self._compiled is not None:
            return np.frombuffer(self._compiled.encode_u16(data), dtype=np.uint16)
        ids = self.encode(data) if isinstance(data, str) else self.encode_bytes(data)
        return np.array(ids, dtype=np.uint16)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Concatenated token bytes; eod_id (0) contributes nothing."""
        if self._compiled is not None:
            if isinstance(ids, Iterator):
                ids = list(ids)  # read twice if the compiled decoder refuses it below
            try:
                return self._compiled.decode_bytes(ids)
            except (ValueError, TypeError, OverflowError):
                pass  # an id out of range or not an int: the loop below names it
        table, max_id = self._id_to_bytes, self._max_id
        parts = []
        for token_id in ids:
            token_id = int(token_id)  # numpy scalars from a binidx reader
            if not 0 <= token_id <= max_id:
                raise DataError(
                    f"token id {token_id} is not in the World vocabulary (valid ids 0..{max_id}); "
                    "the tokens were probably made with another tokenizer: re-tokenize the data "
                    "with data_prep/make_binidx.py"
                )
            parts.append(table[token_id])
        return b"".join(parts)

    def decode(self, ids: Iterable[int]) -> str:
        """Decoded text; invalid UTF-8 (e.g. a cut multi-byte character) becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"WorldTokenizer(vocab_size={VOCAB_SIZE}, eod_id={EOD_ID}, backend={self._backend!r})"


def _warn_fallback(why: str) -> None:
    global _fallback_warned
    if _fallback_warned:
        return
    _fallback_warned = True
    warnings.warn(
        f"the compiled World tokenizer is unavailable ({why}); using the pure-Python encoder, "
        f"which gives the same ids about 30x slower; {BUILD_HINT}",
        RuntimeWarning,
        stacklevel=3,
    )
