"""Input discovery, streaming and parsing, parallel tokenization, shuffle, split and tokenizers (in-process)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from rwkv_train.data.binidx import BinIdx, BinIdxWriter
from rwkv_train.data.build import build_binidx, holdout_mask, temp_paths
from rwkv_train.data.sources import (
    ParseOptions,
    RawBatch,
    expand_inputs,
    iter_batches,
    iter_documents,
    parse_batch,
)
from rwkv_train.data.tokenize_pool import TokenizerSpec, tokenize_batch
from rwkv_train.errors import DataError
from rwkv_train.tokenizer import WorldTokenizer

zstandard = pytest.importorskip("zstandard")


def write_jsonl(path: Path, texts: list[str], key: str = "text") -> Path:
    path.write_text("".join(json.dumps({key: t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


TEXTS = [f"Document {i}: " + "ünïcode 数据 words, " * (i % 9) + "end." for i in range(50)]


def read_bytes(prefix: Path) -> tuple[bytes, bytes]:
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


# Finding inputs.

def test_expand_files_globs_and_directories(tmp_path):
    data = tmp_path / "data"
    (data / "b" / "deep").mkdir(parents=True)
    (data / "a.jsonl").write_text("")
    (data / "b" / "c.txt").write_text("")
    (data / "b" / "deep" / "d.json.gz").write_bytes(gzip.compress(b""))
    (data / "b" / "deep" / "e.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(b""))
    (data / "notes.md").write_text("")  # not an input kind: directories skip it
    (data / ".hidden.jsonl").write_text("")
    sources = expand_inputs([data])
    assert [Path(s.path).relative_to(data).as_posix() for s in sources] == [
        "a.jsonl", "b/c.txt", "b/deep/d.json.gz", "b/deep/e.txt.zst"]
    assert [(s.kind, s.compression) for s in sources] == [
        ("jsonl", None), ("text", None), ("jsonl", "gz"), ("text", "zst")]
    # A glob is expanded by us and sorted; an explicit file of any name is read as text.
    globbed = expand_inputs([str(data / "**" / "*.txt*"), data / "notes.md"])
    assert [Path(s.path).name for s in globbed] == ["c.txt", "e.txt.zst", "notes.md"]
    assert globbed[-1].kind == "text"
    with pytest.raises(DataError, match=r"input glob .*nothing\*\.jsonl' matches no files.*quote"):
        expand_inputs([str(data / "nothing*.jsonl")])
    with pytest.raises(DataError, match="does not exist"):
        expand_inputs([data / "missing.jsonl"])
    with pytest.raises(DataError, match="no input given"):
        expand_inputs([])
    with pytest.raises(DataError, match="at most once"):
        expand_inputs(["-", "-"])


def test_compressed_inputs_give_the_same_corpus(tmp_path):
    plain = write_jsonl(tmp_path / "docs.jsonl", TEXTS)
    raw = plain.read_bytes()
    (tmp_path / "docs.jsonl.gz").write_bytes(gzip.compress(raw))
    # Two zstd frames: a streaming reader must read across them.
    half = len(raw) // 2
    cctx = zstandard.ZstdCompressor()
    (tmp_path / "docs.jsonl.zst").write_bytes(cctx.compress(raw[:half]) + cctx.compress(raw[half:]))
    for name in ("docs.jsonl", "docs.jsonl.gz", "docs.jsonl.zst"):
        build_binidx([tmp_path / name], tmp_path / name.replace(".", "_"), batch_bytes=300)
    assert read_bytes(tmp_path / "docs_jsonl") == read_bytes(tmp_path / "docs_jsonl_gz") == \
        read_bytes(tmp_path / "docs_jsonl_zst")
    assert list(iter_documents([tmp_path / "docs.jsonl.zst"])) == TEXTS


def test_corrupt_compressed_input(tmp_path):
    bad = tmp_path / "cut.jsonl.gz"
    bad.write_bytes(gzip.compress(b'{"text": "x"}\n' * 100)[:-12])
    with pytest.raises(DataError, match="cut.jsonl.gz: cannot be read"):
        build_binidx([bad], tmp_path / "out")
    garbage = tmp_path / "garbage.jsonl.zst"
    garbage.write_bytes(b"this is not zstd at all" * 10)
    with pytest.raises(DataError, match="garbage.jsonl.zst: not valid zstd data"):
        build_binidx([garbage], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.jsonl.gz", "garbage.jsonl.zst"]


def test_batches_hold_whole_lines_with_their_numbers(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", TEXTS)
    batches = list(iter_batches(expand_inputs([src]), batch_bytes=100))
    assert len(batches) > 5
    assert b"".join(b.data for b in batches) == src.read_bytes()
    assert all(b.data.endswith(b"\n") for b in batches)
    assert [b.first_line for b in batches] == [1] + [1 + sum(x.data.count(b"\n") for x in batches[:i])
                                                     for i in range(1, len(batches))]
    assert sum(b.input_bytes for b in batches) == src.stat().st_size


# Parsing.

def test_line_numbers_survive_batching(tmp_path):
    lines = [json.dumps({"text": f"line {i}"}) for i in range(1, 40)]
    lines[29] = '{"text": "oops"'  # line 30
    src = tmp_path / "l.jsonl"
    src.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"l\.jsonl:30: malformed JSON .*--skip-bad"):
        build_binidx([src], tmp_path / "o", batch_bytes=64)


def _batch(data: bytes, kind: str = "jsonl") -> RawBatch:
    return RawBatch("f.jsonl", kind, 1, data)


def test_parse_skip_bad_counts_and_quotes():
    data = (b'\xef\xbb\xbf{"text": "a"}\n\n  \n{"text": 3}\n[1, 2]\n{"other": "x"}\n{"text": ""}\n'
            b'{"text": "\\ud800"}\n{"text": "b\xff"}\n{"text": "c"}')
    with pytest.raises(DataError, match=r"f\.jsonl:4: 'text' must be a string"):
        parse_batch(_batch(data), ParseOptions())
    texts, where, stats = parse_batch(_batch(data), ParseOptions(skip_bad=True))
    assert texts == ["a", "c"] and where == [1, 10]  # the BOM of line 1 is dropped; blank lines are no documents
    assert stats.empty == 1 and stats.bad == 5
    assert [e.split(":")[1] for e in stats.examples] == ["4", "5", "6", "8", "9"]
    texts, where, stats = parse_batch(_batch(data), ParseOptions(skip_bad=True, errors="replace"))
    assert texts == ["a", "\ufffd\ufffd\ufffd", "b\ufffd", "c"] and stats.bad == 3


def test_parse_text_files():
    texts, where, stats = parse_batch(_batch(b"\xef\xbb\xbfone\ntwo\n", "text"), ParseOptions())
    assert texts == ["one\ntwo\n"] and where == [1]
    with pytest.raises(DataError, match=r"f\.jsonl:3: not valid UTF-8.*--errors replace"):
        parse_batch(_batch(b"one\ntwo\nth\xe9ree", "text"), ParseOptions())
    assert parse_batch(_batch(b"a\xffb", "text"), ParseOptions(errors="replace"))[0] == ["a\ufffdb"]
    texts, _, stats = parse_batch(_batch(b"", "text"), ParseOptions())
    assert texts == [] and stats.empty == 1


def test_text_key(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", ["x", "y"], key="content")
    with pytest.raises(DataError, match="no key 'text'.*--text-key"):
        build_binidx([src], tmp_path / "a")
    report = build_binidx([src], tmp_path / "b", text_key="content")
    assert report.train["num_documents"] == 2


# Parallel tokenization, shuffle, split.

def test_output_is_identical_for_any_number_of_workers(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", TEXTS)
    b = tmp_path / "b.txt"
    b.write_text("a plain text document\n" * 20)
    built = {}
    for workers, batch in ((1, 1 << 20), (2, 64), (3, 200)):
        prefix = tmp_path / f"w{workers}"
        report = build_binidx([a, b, a], prefix, workers=workers, batch_bytes=batch)
        built[workers] = read_bytes(prefix)
        assert report.documents == 2 * len(TEXTS) + 1
    assert built[1] == built[2] == built[3]
    tok = WorldTokenizer()
    data = BinIdx(tmp_path / "w1")
    assert data[0].tolist() == tok.encode(TEXTS[0]) + [0]
    assert data[len(TEXTS)].tolist() == tok.encode("a plain text document\n" * 20) + [0]


def test_shuffled_epochs_are_permutations(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", TEXTS)
    build_binidx([src], tmp_path / "plain")
    plain = BinIdx(tmp_path / "plain")
    docs = [tuple(plain[i].tolist()) for i in range(len(plain))]
    report = build_binidx([src], tmp_path / "s", shuffle=True, epochs=3, seed=5, workers=2, batch_bytes=500)
    data = BinIdx(tmp_path / "s")
    out = [tuple(data[i].tolist()) for i in range(len(data))]
    n = len(docs)
    passes = [out[k * n:(k + 1) * n] for k in range(3)]
    assert all(sorted(p) == sorted(docs) for p in passes)
    assert len({tuple(p) for p in passes} | {tuple(docs)}) == 4  # three different orders, none the input's
    assert report.train["num_documents"] == 3 * n and report.train["num_tokens"] == 3 * plain.num_tokens
    assert report.train["max_token_id"] == int(plain.tokens.max())
    # The same seed gives the same bytes; another seed another order; no shuffle repeats the input order.
    build_binidx([src], tmp_path / "s2", shuffle=True, epochs=3, seed=5)
    assert read_bytes(tmp_path / "s") == read_bytes(tmp_path / "s2")
    build_binidx([src], tmp_path / "s3", shuffle=True, epochs=3, seed=6)
    assert read_bytes(tmp_path / "s3") != read_bytes(tmp_path / "s")
    build_binidx([src], tmp_path / "r", epochs=2)
    assert Path(f"{tmp_path / 'r'}.bin").read_bytes() == 2 * Path(f"{tmp_path / 'plain'}.bin").read_bytes()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_val_split(tmp_path):
    texts = [f"doc {i}" for i in range(400)]
    src = write_jsonl(tmp_path / "d.jsonl", texts)
    report = build_binidx([src], tmp_path / "t", val_fraction=0.1, seed=3, val_output=tmp_path / "held")
    tok = WorldTokenizer()
    train, val = BinIdx(tmp_path / "t"), BinIdx(tmp_path / "held")
    train_docs = [tok.decode(train[i].tolist()[:-1]) for i in range(len(train))]
    val_docs = [tok.decode(val[i].tolist()[:-1]) for i in range(len(val))]
    mask = holdout_mask(0, 400, 3, 0.1)
    assert val_docs == [t for t, m in zip(texts, mask) if m]
    assert train_docs == [t for t, m in zip(texts, mask) if not m]
    assert 20 <= len(val_docs) <= 60
    assert report.val["num_documents"] == len(val_docs) and report.val["split"] == "val"
    assert json.loads((tmp_path / "held.json").read_text()) == report.val
    # The split depends on the seed only, not on batching.
    assert holdout_mask(100, 50, 3, 0.1).tolist() == mask[100:150].tolist()
    assert holdout_mask(0, 400, 4, 0.1).tolist() != mask.tolist()
    with pytest.raises(DataError, match="held out none"):
        build_binidx([write_jsonl(tmp_path / "one.jsonl", ["x"])], tmp_path / "v", val_fraction=1e-9)
    with pytest.raises(DataError, match="needs --val-fraction"):
        build_binidx([src], tmp_path / "w", val_output=tmp_path / "x")
    with pytest.raises(DataError, match=r"--epochs must be at least 1, got 0; --val-fraction must be in \[0, 1\)"):
        build_binidx([src], tmp_path / "w", val_fraction=1.5, epochs=0)
    assert not (tmp_path / "v.bin").exists() and not (tmp_path / "v_val.bin").exists()


def test_stale_temp_files_are_removed(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", TEXTS[:3])
    prefix = str(tmp_path / "out")
    for path in temp_paths(prefix):
        path.write_bytes(b"left by a killed run")
    report = build_binidx([src], prefix, shuffle=True)
    assert sorted(report.removed_temps) == sorted(map(str, temp_paths(prefix)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "out.bin", "out.idx", "out.json"]


def test_failed_overwrite_keeps_the_old_corpus(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", TEXTS[:5])
    build_binidx([good], tmp_path / "c", val_fraction=0.5, seed=1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("c")}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": nope}\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        build_binidx([good, bad], tmp_path / "c", val_fraction=0.5, seed=1, overwrite=True, workers=2)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("c")}
    assert after == before and len(before) == 6


# Tokenizers.

def _tiny_hf_tokenizer(path: Path, extra: int = 0) -> Path:
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, "hello": 2, "world": 3, ".": 4}
    vocab.update({f"w{i}": i for i in range(5, 5 + extra)})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def test_hf_tokenizer_corpus(tmp_path):
    tj = _tiny_hf_tokenizer(tmp_path / "tokenizer.json")
    src = write_jsonl(tmp_path / "d.jsonl", ["hello world.", "world hello zzz"])
    report = build_binidx([src], tmp_path / "hf", tokenizer=str(tj), workers=2)
    data = BinIdx(tmp_path / "hf")
    assert data.tokens.tolist() == [2, 3, 4, 0, 3, 2, 1, 0]
    assert data.dtype == np.uint16
    assert report.train["tokenizer"] == str(tj.resolve()) and report.train["vocab_size"] == 5
    build_binidx([src], tmp_path / "eod4", tokenizer=str(tj), eod_id=4)
    assert BinIdx(tmp_path / "eod4").tokens.tolist() == [2, 3, 4, 4, 3, 2, 1, 4]
    with pytest.raises(DataError, match="--eod-id 9 is outside the vocabulary"):
        build_binidx([src], tmp_path / "x", tokenizer=str(tj), eod_id=9)
    with pytest.raises(DataError, match="does not apply to the World tokenizer"):
        build_binidx([src], tmp_path / "x", eod_id=3)
    with pytest.raises(DataError, match="tokenizer file .*missing.json does not exist"):
        build_binidx([src], tmp_path / "x", tokenizer=str(tmp_path / "missing.json"))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match="is not a Hugging Face tokenizer file"):
        build_binidx([src], tmp_path / "x", tokenizer=str(tmp_path / "broken.json"))


def test_large_vocabulary_is_written_as_int32(tmp_path):
    tj = _tiny_hf_tokenizer(tmp_path / "big.json", extra=70000)
    src = write_jsonl(tmp_path / "d.jsonl", ["hello w70004 w6"])
    report = build_binidx([src], tmp_path / "wide", tokenizer=str(tj))
    data = BinIdx(tmp_path / "wide")
    assert data.dtype == np.int32 and data.dtype_code == 4
    assert data.tokens.tolist() == [2, 70004, 6, 0]
    assert report.train["dtype"] == "int32" and report.train["vocab_size"] == 70005


class _Liar:
    """A tokenizer that returns an id beyond its own vocabulary."""

    name, vocab_size, eod_id = "liar", 10, 0

    def encode_arrays(self, texts):
        return [np.array([1, 2], dtype=np.int64) if "ok" in t else np.array([3, 12], dtype=np.int64)
                for t in texts]


def test_token_ids_beyond_the_vocabulary():
    batch = RawBatch("x.jsonl", "jsonl", 7, b'{"text": "ok"}\n{"text": "bad"}\n')
    with pytest.raises(DataError, match=r"x\.jsonl:8: the tokenizer liar produced token id 12, beyond its "
                                        r"vocabulary of 10 ids"):
        tokenize_batch(batch, _Liar(), np.dtype(np.uint16), ParseOptions())
    ok = tokenize_batch(RawBatch("x.jsonl", "jsonl", 1, b'{"text": "ok"}\n'), _Liar(), np.dtype(np.uint16),
                        ParseOptions())
    assert ok.tokens.tolist() == [1, 2, 0] and ok.sizes.tolist() == [3] and ok.tokens.dtype == np.uint16


def test_world_spec_round_trip():
    tok = TokenizerSpec().load()
    assert tok.vocab_size == 65536 and tok.eod_id == 0 and tok.name == "world"
    arrays = tok.encode_arrays(["Hello world", "数据"])
    assert [a.tolist() for a in arrays] == [WorldTokenizer().encode("Hello world"), WorldTokenizer().encode("数据")]


def test_writer_batch_append_and_deferred_commit(tmp_path):
    prefix = tmp_path / "w"
    writer = BinIdxWriter(prefix, np.uint16, deferred=True)
    with writer:
        writer.add_documents(np.array([5, 6, 0, 7, 0], dtype=np.uint16), np.array([3, 2]))
        writer.add_document([8, 0])
        with pytest.raises(DataError, match="add up to"):
            writer.add_documents(np.array([1, 2]), np.array([3]))
    assert not Path(f"{prefix}.bin").exists() and all(p.exists() for p in writer.temp_paths)
    writer.commit()
    data = BinIdx(prefix)
    assert [data[i].tolist() for i in range(3)] == [[5, 6, 0], [7, 0], [8, 0]]
    assert writer.max_token_id == 8 and writer.num_documents == 3
    other = BinIdxWriter(tmp_path / "d", np.uint16, deferred=True)
    with other:
        other.add_documents(np.array([1], dtype=np.int64), np.array([1]))
    other.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.bin", "w.idx"]


def test_a_directory_input_skips_this_runs_own_outputs(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", TEXTS[:4])
    build_binidx([tmp_path], tmp_path / "corpus")
    first = read_bytes(tmp_path / "corpus")
    # corpus.json (the sidecar) now sits in the input directory; rebuilding must not read it as JSON lines.
    report = build_binidx([tmp_path], tmp_path / "corpus", overwrite=True)
    assert read_bytes(tmp_path / "corpus") == first and report.train["sources"] == [str(tmp_path / "d.jsonl")]
