"""The RWKV World tokenizer (vocabulary `rwkv_vocab_v20230424.txt`).

Encoding is greedy longest match over UTF-8 bytes: at each position take the
longest vocabulary token that is a prefix of the remaining bytes. Every single
byte is a token, so any input encodes. Id 0 is not in the vocabulary file; it
marks the end of a document in RWKV corpora.

The vocabulary file ships inside the `rwkv` PyPI package, which is where we
read it from; nothing is downloaded.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path
from typing import Iterable

from rwkv_train.errors import DataError

VOCAB_FILE_NAME = "rwkv_vocab_v20230424.txt"
VOCAB_SIZE = 65536  # embedding rows; the file uses ids 1..65529, the rest are padding
EOD_ID = 0

# A trie node maps a byte value to its child node; the id of the token that
# ends at this node (if any) is stored under the key _ID, which no byte uses.
_ID = -1
_Trie = dict


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
                token = ast.literal_eval(line[first + 1:last])
                length = int(line[last + 1:])
            except (ValueError, SyntaxError) as exc:
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


@functools.lru_cache(maxsize=None)
def _load_vocab(path: str) -> tuple[tuple[bytes, ...], _Trie, int]:
    """Parse the vocabulary once per process: (bytes by id, trie, largest id)."""
    id_to_bytes = _parse_vocab(Path(path))
    if EOD_ID in id_to_bytes or max(id_to_bytes) >= VOCAB_SIZE:
        raise DataError(
            f"{path}: ids must lie in 1..{VOCAB_SIZE - 1} (0 is end-of-document); this is not "
            "the World vocabulary; reinstall the `rwkv` package"
        )
    # Index = id; id 0 and the unused tail decode to nothing (see decode_bytes).
    table = [b""] * VOCAB_SIZE
    root: _Trie = {}
    for token_id, token in id_to_bytes.items():
        table[token_id] = token
        node = root
        for byte in token:
            node = node.setdefault(byte, {})
        node[_ID] = token_id
    missing = [b for b in range(256) if _ID not in root.get(b, {})]
    if missing:
        # Without every single byte some inputs could not be encoded at all.
        raise DataError(
            f"{path}: single-byte tokens missing for {len(missing)} byte values; this is not "
            "the World vocabulary; reinstall the `rwkv` package"
        )
    return tuple(table), root, max(id_to_bytes)


class WorldTokenizer:
    """RWKV World tokenizer: 65536 ids, greedy longest byte match, id 0 = end of document."""

    def __init__(self, vocab_file: str | Path | None = None) -> None:
        path = Path(vocab_file) if vocab_file is not None else vocab_path()
        if not path.is_file():
            raise DataError(f"vocabulary file {path} does not exist; pass the path of {VOCAB_FILE_NAME}")
        # _max_id is the last id the file defines (65529); decode refuses ids above it.
        self._id_to_bytes, self._root, self._max_id = _load_vocab(str(path.resolve()))

    @property
    def vocab_size(self) -> int:
        """Number of embedding rows a model needs (65536)."""
        return VOCAB_SIZE

    @property
    def eod_id(self) -> int:
        """Id that ends a document (0)."""
        return EOD_ID

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (UTF-8 encoded first); never contains eod_id."""
        return self.encode_bytes(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of raw bytes by greedy longest match."""
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

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Concatenated token bytes; eod_id (0) contributes nothing."""
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
        return f"WorldTokenizer(vocab_size={VOCAB_SIZE}, eod_id={EOD_ID})"

