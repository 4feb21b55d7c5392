"""The real data_prep/make_binidx.py CLI on tiny inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rwkv_train.data.binidx import BinIdx
from rwkv_train.data.build import build_binidx
from rwkv_train.data.sampling import magic_prime
from rwkv_train.errors import DataError
from rwkv_train.tokenizer import WorldTokenizer

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "data_prep" / "make_binidx.py"

TEXTS = ["Hello world.", "", "第二个文档 with émojis 🎉\n\nand blank lines", '{"quoted": "json"}\t']
PLAIN = "A plain text file.\r\nIt is one document.\n\n  Trailing spaces  \n"


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # Run from a directory outside the repo without PYTHONPATH: the script must find the package itself.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env)


def outputs(prefix: Path) -> list[Path]:
    return [p for p in (Path(f"{prefix}{s}") for s in (".bin", ".idx", ".json")) if p.exists()]


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, Path]:
    jsonl = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": t, "id": i}, ensure_ascii=i % 2 == 0) for i, t in enumerate(TEXTS)]
    # The blank line after the first record must be skipped, as make_data.py does.
    jsonl.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n", encoding="utf-8")
    txt = tmp_path / "plain.txt"
    txt.write_bytes(PLAIN.encode("utf-8"))
    return jsonl, txt


def test_builds_corpus(tmp_path, inputs):
    jsonl, txt = inputs
    prefix = tmp_path / "out" / "corpus"
    prefix.parent.mkdir()
    result = run_cli("--input", str(jsonl), "--input", str(txt), "--output", str(prefix), cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    data = BinIdx(prefix)
    tokens = data.tokens.tolist()
    tok = WorldTokenizer()
    # Every document is its tokens then 0; splitting at 0 gives the texts back.
    assert tokens[-1] == 0
    pieces = np.split(np.array(tokens), np.flatnonzero(np.array(tokens) == 0) + 1)[:-1]
    expected = TEXTS + [PLAIN]
    assert [tok.decode(p.tolist()[:-1]) for p in pieces] == expected
    assert tokens == [t for text in expected for t in tok.encode(text) + [0]]
    # One sequence per document, as RWKV-LM's make_data.py writes it.
    assert len(data) == len(expected)
    assert data.doc_idx.tolist() == list(range(len(expected) + 1))

    sidecar = json.loads(Path(f"{prefix}.json").read_text())
    assert sidecar == {
        "tokenizer": "world",
        "vocab_size": 65536,
        "num_tokens": len(tokens),
        "num_documents": len(expected),
        "max_token_id": max(tokens),
        "dtype": "uint16",
        "sources": [str(jsonl), str(txt)],
    }
    assert f"{len(expected)} documents, {len(tokens)} tokens" in result.stdout
    assert "ctx_len 512" in result.stdout and "ctx_len 4096" in result.stdout
    assert not list(prefix.parent.glob("*.tmp"))


def test_reports_magic_prime(tmp_path):
    txt = tmp_path / "big.txt"
    txt.write_text("".join(f"line {i} of a somewhat longer file\n" for i in range(400)), encoding="utf-8")
    result = run_cli("--input", str(txt), "--output", str(tmp_path / "big"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    n = BinIdx(tmp_path / "big").num_tokens
    assert n >= 3 * 512
    assert f"ctx_len 512: magic_prime {magic_prime(n, 512)}" in result.stdout


def test_malformed_json_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken\n', encoding="utf-8")
    prefix = tmp_path / "bad_out"
    result = run_cli("--input", str(bad), "--output", str(prefix), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    assert "bad.jsonl:3" in result.stderr
    assert outputs(prefix) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # no temp files either


def test_missing_text_key(tmp_path):
    src = tmp_path / "k.jsonl"
    src.write_text('{"text": "ok"}\n{"content": "no text key"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"k\.jsonl:2: no key 'text' \(keys here: 'content'\).*--text-key"):
        build_binidx([src], tmp_path / "k")
    assert outputs(tmp_path / "k") == []


def test_missing_input(tmp_path):
    result = run_cli("--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "x"), cwd=tmp_path)
    assert result.returncode == 2
    assert "nope.jsonl does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_existing_output_refused(tmp_path, inputs):
    jsonl, _ = inputs
    prefix = tmp_path / "twice"
    build_binidx([jsonl], prefix)
    before = Path(f"{prefix}.bin").read_bytes()
    result = run_cli("--input", str(jsonl), "--input", str(jsonl), "--output", str(prefix), cwd=tmp_path)
    assert result.returncode == 2
    assert "already exist" in result.stderr and "--overwrite" in result.stderr
    assert Path(f"{prefix}.bin").read_bytes() == before
    result = run_cli("--input", str(jsonl), "--input", str(jsonl), "--output", str(prefix), "--overwrite",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert BinIdx(prefix).num_documents == 2 * len(TEXTS)


# build_binidx in-process: the cases that need no subprocess.

def test_build_strips_bom_and_reports_progress(tmp_path):
    src = tmp_path / "bom.txt"
    src.write_bytes(b"\xef\xbb\xbfbody text")
    calls = []
    info = build_binidx([src], tmp_path / "bom", progress=lambda *a: calls.append(a))
    tok = WorldTokenizer()
    assert BinIdx(tmp_path / "bom").tokens.tolist() == tok.encode("body text") + [0]
    assert info["num_documents"] == 1
    assert calls == [(1, info["num_tokens"], src.stat().st_size)]


def test_build_rejects_bad_input(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt: not valid UTF-8.*re-save"):
        build_binidx([latin1], tmp_path / "a")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="no documents"):
        build_binidx([blank], tmp_path / "b")
    surrogate = tmp_path / "s.jsonl"
    surrogate.write_text('{"text": "ok"}\n{"text": "\\ud800"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="s.jsonl:2: 'text' holds a lone surrogate"):
        build_binidx([surrogate], tmp_path / "c")
    with pytest.raises(DataError, match="not a file"):
        build_binidx([tmp_path], tmp_path / "d")
    with pytest.raises(DataError, match="output directory .* does not exist"):
        build_binidx([blank], tmp_path / "nodir" / "e")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.jsonl", "latin1.txt", "s.jsonl"]
