"""binidx files as RWKV-LM, Megatron-LM and GPT-NeoX write them, made byte by byte from the published
layout (not with our writer), read back by BinIdx.

Layout (.idx, little endian): b"MMIDIDX\\x00\\x00", <Q version 1, <B dtype code, <Q sequence count,
<Q doc_idx count, int32 sizes, int64 byte pointers, int64 doc_idx. Megatron-LM's current dtype table:
1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16. The fairseq-derived copies
(GPT-NeoX, RWKV-LM) write np.double (float64) under code 7.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from rwkv_train.data.binidx import BinIdx
from rwkv_train.errors import DataError

MEGATRON_CODES = {1: "<u1", 2: "<i1", 3: "<i2", 4: "<i4", 5: "<i8", 6: "<f8", 7: "<f4", 8: "<u2"}

# Megatron's sentence-split mode: a document is several sequences (sentences); one sentence is empty.
SENTENCES = [[1, 2, 3], [4], [5, 6], [], [7, 8, 9, 10], [11], [12, 13]]
DOC_IDX = [0, 2, 3, 6, 7]  # documents: sentences 0-1, 2, 3-5, 6


def write_by_layout(prefix: Path, code: int, sequences: list[list], doc_idx: list[int],
                    item: str | None = None, modes: bytes | None = None) -> None:
    """Write PREFIX.bin/.idx from the layout; `item` overrides the element type of the .bin."""
    item = item or MEGATRON_CODES[code]
    itemsize = np.dtype(item).itemsize
    sizes = [len(s) for s in sequences]
    pointers, offset = [], 0
    for size in sizes:
        pointers.append(offset)
        offset += size * itemsize
    idx = bytearray()
    idx += b"MMIDIDX\x00\x00"
    idx += struct.pack("<Q", 1)
    idx += struct.pack("<B", code)
    idx += struct.pack("<Q", len(sizes))
    idx += struct.pack("<Q", len(doc_idx))
    idx += struct.pack(f"<{len(sizes)}i", *sizes)
    idx += struct.pack(f"<{len(pointers)}q", *pointers)
    idx += struct.pack(f"<{len(doc_idx)}q", *doc_idx)
    if modes is not None:
        idx += modes
    Path(f"{prefix}.idx").write_bytes(bytes(idx))
    with open(f"{prefix}.bin", "wb") as f:
        for sequence in sequences:
            f.write(np.asarray(sequence, dtype=item).tobytes())


def values_for(code: int) -> list[list]:
    """SENTENCES with values that exercise the type: negatives for signed, fractions for floats."""
    kind = np.dtype(MEGATRON_CODES[code]).kind
    if kind == "f":
        return [[v + 0.5 for v in s] for s in SENTENCES]
    if kind == "i":
        return [[-v if v % 2 else v for v in s] for s in SENTENCES]
    return SENTENCES


@pytest.mark.parametrize("code", sorted(MEGATRON_CODES))
def test_every_dtype_code_with_multi_sequence_documents(tmp_path, code):
    prefix = tmp_path / f"megatron{code}"
    sequences = values_for(code)
    write_by_layout(prefix, code, sequences, DOC_IDX)
    data = BinIdx(prefix)
    assert data.dtype == np.dtype(MEGATRON_CODES[code]) and data.dtype_code == code
    assert len(data) == len(SENTENCES) and data.num_documents == len(DOC_IDX) - 1
    assert data.sizes.tolist() == [len(s) for s in SENTENCES]
    assert data.doc_idx.tolist() == DOC_IDX
    assert data.num_tokens == sum(map(len, SENTENCES))
    assert data.tokens.tolist() == [v for s in sequences for v in s]
    for i, sequence in enumerate(sequences):
        assert data[i].tolist() == sequence
    for d in range(data.num_documents):
        expected = [v for s in sequences[DOC_IDX[d]:DOC_IDX[d + 1]] for v in s]
        assert data.document(d).tolist() == expected
    assert data.document_lengths().tolist() == [4, 2, 5, 2]
    assert data.document(-1).tolist() == data.document(3).tolist()
    with pytest.raises(IndexError):
        data.document(4)


def test_rwkv_lm_make_data_layout(tmp_path):
    """RWKV-LM's make_data.py: uint16, one sequence per document ending in 0, doc_idx 0..n."""
    docs = [[10, 11, 0], [65535, 0], [0], [7, 8, 9, 0]]
    write_by_layout(tmp_path / "rwkv", 8, docs, list(range(len(docs) + 1)))
    data = BinIdx(tmp_path / "rwkv")
    assert [data.document(d).tolist() for d in range(len(docs))] == docs
    assert data.document_lengths().tolist() == [3, 2, 1, 4]
    assert data.tokens.tolist() == [t for d in docs for t in d]


def test_gpt_neox_float_code_7_is_float64(tmp_path):
    """GPT-NeoX/fairseq map code 7 to np.double: the .bin size tells it from Megatron's float32."""
    sequences = [[0.25, 1.5], [2.75]]
    write_by_layout(tmp_path / "neox", 7, sequences, [0, 1, 2], item="<f8")
    data = BinIdx(tmp_path / "neox")
    assert data.dtype == np.float64 and data.tokens.tolist() == [0.25, 1.5, 2.75]
    write_by_layout(tmp_path / "megatron", 7, sequences, [0, 1, 2])
    assert BinIdx(tmp_path / "megatron").dtype == np.float32


def test_int32_tokens_for_large_vocabularies(tmp_path):
    docs = [[100_000, 5, 0], [2**31 - 1, 0]]
    write_by_layout(tmp_path / "wide", 4, docs, [0, 1, 2])
    data = BinIdx(tmp_path / "wide")
    assert data.dtype == np.int32 and [data.document(d).tolist() for d in range(2)] == docs


def test_doc_idx_without_final_end(tmp_path):
    """A builder that never closed its last document: lengths cover the documents the index lists."""
    write_by_layout(tmp_path / "open", 8, SENTENCES, [0, 2, 3])
    data = BinIdx(tmp_path / "open")
    assert data.num_documents == 2 and data.document_lengths().tolist() == [4, 2]
    assert data.num_tokens == sum(map(len, SENTENCES))


def test_corrupt_doc_idx_is_named(tmp_path):
    write_by_layout(tmp_path / "bad", 8, SENTENCES, [0, 5, 3])
    with pytest.raises(DataError, match=r"doc_idx\[1:3\] = 5, 3 is not a range"):
        BinIdx(tmp_path / "bad").document(1)


def test_multimodal_index_is_refused(tmp_path):
    write_by_layout(tmp_path / "mm", 8, SENTENCES, DOC_IDX, modes=bytes(len(SENTENCES)))
    with pytest.raises(DataError, match="multimodal"):
        BinIdx(tmp_path / "mm")
