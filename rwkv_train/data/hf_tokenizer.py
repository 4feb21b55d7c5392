"""Any Hugging Face `tokenizers` file (tokenizer.json) as a corpus tokenizer, e.g. GPT-NeoX 20B.

RWKV-4 "Pile" models use the GPT-NeoX 20B tokenizer (50277 ids) with 0 as the
end-of-document id, which is the default here. No special tokens are added
around documents: the corpus builder appends the end-of-document id itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from rwkv_train.errors import DataError


class HFTokenizer:
    """`tokenizers.Tokenizer.from_file(path)` with the interface the corpus builder uses."""

    def __init__(self, path: str | Path, eod_id: int = 0) -> None:
        path = Path(path)
        if not path.is_file():
            raise DataError(
                f"tokenizer file {path} does not exist; pass --tokenizer world or the path of a Hugging Face "
                "tokenizer.json"
            )
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise DataError(
                f"--tokenizer {path} needs the Hugging Face `tokenizers` package; run `pip install tokenizers`"
            ) from None
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the library raises a bare Exception for unreadable files
            raise DataError(
                f"{path} is not a Hugging Face tokenizer file ({exc}); pass the tokenizer.json of the "
                "model's tokenizer"
            ) from None
        self.path = path
        vocab = self._tok.get_vocab(with_added_tokens=True)
        # Ids may have gaps; the embedding needs a row for the largest one.
        self._vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
        if not 0 <= eod_id < self._vocab_size:
            raise DataError(
                f"--eod-id {eod_id} is outside the vocabulary of {path} (ids 0..{self._vocab_size - 1}); "
                "pass the id that ends a document (0 for RWKV-4 Pile corpora with the GPT-NeoX tokenizer)"
            )
        self._eod_id = eod_id
        self._batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # fast: no offsets

    @property
    def vocab_size(self) -> int:
        """Largest id + 1 (added tokens included)."""
        return self._vocab_size

    @property
    def eod_id(self) -> int:
        """Id appended after every document."""
        return self._eod_id

    @property
    def name(self) -> str:
        """What the corpus sidecar records: the tokenizer file's absolute path."""
        return str(self.path.resolve())

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens."""
        return [encoding.ids for encoding in self._batch(texts, add_special_tokens=False)]

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text as int64 arrays."""
        return [np.array(ids, dtype=np.int64) for ids in self.encode_batch(texts)]

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of UTF-8 bytes."""
        return self.encode_batch([data.decode("utf-8")])[0]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids (special tokens kept)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self._vocab_size}, eod_id={self._eod_id})"
