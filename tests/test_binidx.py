"""binidx writer and reader, checked against the layout itself rather than against each other only."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from rwkv_train.data.binidx import DTYPE_CODES, BinIdx, BinIdxWriter, dtype_for_vocab
from rwkv_train.errors import DataError

DOCS = [[5, 6, 7, 0], [0], [65535, 1, 2, 3, 4, 0], [9, 0]]


def write_by_spec(prefix, docs, code=8, dtype=np.uint16):
    """Write a binidx pair straight from the layout description, without our writer."""
    sizes = [len(d) for d in docs]
    itemsize = np.dtype(dtype).itemsize
    pointers = [sum(sizes[:i]) * itemsize for i in range(len(docs))]
    doc_idx = list(range(len(docs) + 1))
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", code))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(struct.pack(f"<{len(sizes)}i", *sizes))
        f.write(struct.pack(f"<{len(pointers)}q", *pointers))
        f.write(struct.pack(f"<{len(doc_idx)}q", *doc_idx))
    with open(f"{prefix}.bin", "wb") as f:
        for d in docs:
            f.write(np.asarray(d, dtype=dtype).tobytes())


def parse_by_spec(prefix):
    """Independent struct-based parse of an .idx file."""
    with open(f"{prefix}.idx", "rb") as f:
        raw = f.read()
    magic, version, code, n, n_docs = struct.unpack_from("<9sQBQQ", raw, 0)
    off = 34
    sizes = list(struct.unpack_from(f"<{n}i", raw, off))
    off += 4 * n
    pointers = list(struct.unpack_from(f"<{n}q", raw, off))
    off += 8 * n
    doc_idx = list(struct.unpack_from(f"<{n_docs}q", raw, off))
    off += 8 * n_docs
    assert off == len(raw)
    return magic, version, code, sizes, pointers, doc_idx


def test_round_trip(tmp_path):
    prefix = tmp_path / "corpus"
    with BinIdxWriter(prefix, np.uint16) as w:
        for d in DOCS:
            w.add_document(d)
        w.add_document(np.array([3, 0], dtype=np.int64))
    docs = DOCS + [[3, 0]]
    data = BinIdx(prefix)
    assert len(data) == len(docs)
    assert data.dtype == np.uint16
    assert data.sizes.tolist() == [len(d) for d in docs]
    assert data.pointers.tolist() == [2 * sum(map(len, docs[:i])) for i in range(len(docs))]
    assert data.doc_idx.tolist() == list(range(len(docs) + 1))
    assert data.num_documents == len(docs)
    assert data.num_tokens == sum(map(len, docs))
    assert data.tokens.tolist() == [t for d in docs for t in d]
    for i, d in enumerate(docs):
        assert data[i].tolist() == d
    assert data[-1].tolist() == docs[-1]
    with pytest.raises(IndexError):
        data[len(docs)]


def test_int32_round_trip(tmp_path):
    prefix = tmp_path / "wide"
    docs = [[70000, 1, 0], [2**31 - 1, 0]]
    with BinIdxWriter(prefix, dtype_for_vocab(100000)) as w:
        for d in docs:
            w.add_document(d)
    data = BinIdx(prefix)
    assert data.dtype == np.int32
    assert [data[i].tolist() for i in range(2)] == docs


def test_reader_reads_file_written_by_spec(tmp_path):
    prefix = tmp_path / "spec"
    write_by_spec(prefix, DOCS)
    data = BinIdx(str(prefix))
    assert [data[i].tolist() for i in range(len(DOCS))] == DOCS
    assert data.doc_idx.tolist() == [0, 1, 2, 3, 4]
    assert BinIdx(f"{prefix}.bin").num_tokens == sum(map(len, DOCS))  # a suffix is tolerated


def test_writer_output_parsed_by_spec(tmp_path):
    prefix = tmp_path / "ours"
    with BinIdxWriter(prefix, np.uint16) as w:
        for d in DOCS:
            w.add_document(d)
    magic, version, code, sizes, pointers, doc_idx = parse_by_spec(prefix)
    assert (magic, version, code) == (b"MMIDIDX\x00\x00", 1, 8)
    assert sizes == [4, 1, 6, 2]
    assert pointers == [0, 8, 10, 22]
    assert doc_idx == [0, 1, 2, 3, 4]
    flat = np.fromfile(f"{prefix}.bin", dtype="<u2").tolist()
    assert flat == [t for d in DOCS for t in d]


def test_dtype_codes_and_vocab_dtype():
    assert DTYPE_CODES[8] == np.uint16 and DTYPE_CODES[4] == np.int32 and DTYPE_CODES[1] == np.uint8
    assert dtype_for_vocab(65536) == np.uint16
    assert dtype_for_vocab(65537) == np.int32


def test_bad_magic(tmp_path):
    prefix = tmp_path / "bad"
    write_by_spec(prefix, DOCS)
    raw = bytearray((tmp_path / "bad.idx").read_bytes())
    raw[:9] = b"NOTMAGIC!"
    (tmp_path / "bad.idx").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="not a binidx index"):
        BinIdx(prefix)


def test_unsupported_version_and_dtype_code(tmp_path):
    prefix = tmp_path / "v"
    write_by_spec(prefix, DOCS)
    idx = tmp_path / "v.idx"
    raw = bytearray(idx.read_bytes())
    raw[9:17] = struct.pack("<Q", 2)
    idx.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="version 2"):
        BinIdx(prefix)
    raw[9:17] = struct.pack("<Q", 1)
    raw[17] = 42
    idx.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="dtype code 42"):
        BinIdx(prefix)


@pytest.mark.parametrize("missing", ["bin", "idx"])
def test_missing_files(tmp_path, missing):
    prefix = tmp_path / "m"
    write_by_spec(prefix, DOCS)
    (tmp_path / f"m.{missing}").unlink()
    with pytest.raises(DataError, match=rf"m\.{missing} does not exist.*make_binidx\.py"):
        BinIdx(prefix)


def test_bin_size_inconsistent_with_index(tmp_path):
    prefix = tmp_path / "short"
    write_by_spec(prefix, DOCS)
    binf = tmp_path / "short.bin"
    binf.write_bytes(binf.read_bytes()[:-2])
    with pytest.raises(DataError, match="bytes but"):
        BinIdx(prefix)


def test_truncated_index(tmp_path):
    prefix = tmp_path / "t"
    write_by_spec(prefix, DOCS)
    idx = tmp_path / "t.idx"
    idx.write_bytes(idx.read_bytes()[:-8])
    with pytest.raises(DataError, match="truncated or corrupt"):
        BinIdx(prefix)


def test_writer_refuses_existing_output(tmp_path):
    prefix = tmp_path / "exists"
    write_by_spec(prefix, DOCS)
    with pytest.raises(DataError, match="already exist.*overwrite"):
        BinIdxWriter(prefix, np.uint16)
    with BinIdxWriter(prefix, np.uint16, overwrite=True) as w:
        w.add_document([1, 0])
    assert BinIdx(prefix).tokens.tolist() == [1, 0]


def test_failing_writer_leaves_nothing(tmp_path):
    prefix = tmp_path / "fail"
    with pytest.raises(RuntimeError, match="boom"):
        with BinIdxWriter(prefix, np.uint16) as w:
            w.add_document([1, 2, 0])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_failing_overwrite_keeps_old_files(tmp_path):
    prefix = tmp_path / "keep"
    write_by_spec(prefix, DOCS)
    with pytest.raises(RuntimeError):
        with BinIdxWriter(prefix, np.uint16, overwrite=True) as w:
            w.add_document([1, 0])
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.bin", "keep.idx"]
    assert BinIdx(prefix).tokens.tolist() == [t for d in DOCS for t in d]


def test_writer_checks_ids_fit_dtype(tmp_path):
    prefix = tmp_path / "range"
    with pytest.raises(DataError, match="do not fit uint16"):
        with BinIdxWriter(prefix, np.uint16) as w:
            w.add_document([1, 65536])
    with pytest.raises(DataError, match="do not fit"):
        with BinIdxWriter(prefix, np.uint16) as w:
            w.add_document([-1])
    with pytest.raises(DataError, match="integers"):
        with BinIdxWriter(prefix, np.uint16) as w:
            w.add_document([1.5])
    with pytest.raises(DataError, match="integer dtype"):
        BinIdxWriter(prefix, np.float32)
    assert list(tmp_path.iterdir()) == []


def test_empty_corpus(tmp_path):
    prefix = tmp_path / "empty"
    with BinIdxWriter(prefix, np.uint16):
        pass
    data = BinIdx(prefix)
    assert len(data) == 0 and data.num_tokens == 0 and data.tokens.size == 0
    assert data.doc_idx.tolist() == [0]
