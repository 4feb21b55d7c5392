"""scripts/inspect_data.py, run as a user runs it, on our corpora and on a Megatron-style index."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from rwkv_train.data.binidx import BinIdx
from rwkv_train.data.build import build_binidx
from rwkv_train.data.sampling import magic_prime
from tests.test_binidx_interop import DOC_IDX, SENTENCES, write_by_layout

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "inspect_data.py"


def inspect(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the script finds the package itself
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env)


def test_world_corpus(tmp_path):
    texts = ["The first document says hello."] + [f"doc {i} " + "word " * (2 ** (i % 8)) for i in range(40)]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    build_binidx([src], tmp_path / "c")
    data = BinIdx(tmp_path / "c")
    result = inspect(str(tmp_path / "c.bin"), "--ctx-len", "64", "--sample-tokens", "12", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"{len(texts)} sequences, {len(texts)} documents, {data.num_tokens} tokens" in out
    assert "dtype uint16 (code 8)" in out
    assert f"token ids: 0..{int(data.tokens.max())}" in out
    assert f"ctx_len 64: magic_prime {magic_prime(data.num_tokens, 64)}" in out
    assert "ctx_len 512" not in out  # only the ctx_len asked for
    # Log2 buckets: every document length is counted once.
    rows = [line for line in out.splitlines() if " tokens | " in line]
    assert sum(int(line.split("|")[1].split()[0]) for line in rows) == len(texts)
    lengths = data.document_lengths()
    low = int(np.floor(np.log2(lengths.min())))
    assert rows[0].strip().startswith(f"{2**low}-{2**(low + 1) - 1} tokens")
    assert "decoded with world" in out and "The first document says hello.<|eod|>" in out


def test_default_ctx_lens_and_sample_position(tmp_path):
    src = tmp_path / "d.txt"
    src.write_text("line of text number one\n" * 400)
    build_binidx([src], tmp_path / "c")
    result = inspect(str(tmp_path / "c"), "--sample-at", "3", "--sample-tokens", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ctx_len 512: magic_prime" in result.stdout
    assert "ctx_len 4096: too few tokens" in result.stdout
    assert "sample: tokens 3..6" in result.stdout


def test_megatron_sentence_split_index(tmp_path):
    write_by_layout(tmp_path / "m", 4, SENTENCES, DOC_IDX)  # int32, documents of several sequences
    result = inspect(str(tmp_path / "m"), "--ctx-len", "2", "--sample-tokens", "5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "7 sequences, 4 documents, 13 tokens" in out and "dtype int32 (code 4)" in out
    assert "several sequences" in out and "token ids: 1..13" in out
    assert "2-3 tokens |          2" in out and "4-7 tokens |          2" in out
    assert "ctx_len 2: magic_prime 5" in out


def test_hf_tokenizer_from_the_sidecar(tmp_path):
    from tests.test_data_sources import _tiny_hf_tokenizer

    tj = _tiny_hf_tokenizer(tmp_path / "tok.json")
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps({"text": "hello world."}) + "\n" + json.dumps({"text": "world"}) + "\n")
    build_binidx([src], tmp_path / "c", tokenizer=str(tj))
    result = inspect(str(tmp_path / "c"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"decoded with {tj.resolve()}" in result.stdout
    assert "hello world .<|eod|>world<|eod|>" in result.stdout


def test_errors(tmp_path):
    result = inspect(str(tmp_path / "missing"), cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: ")
    assert "missing.idx does not exist" in result.stderr and "Traceback" not in result.stderr
    write_by_layout(tmp_path / "f", 6, [[0.5, 1.5]], [0, 1])
    result = inspect(str(tmp_path / "f"), "--ctx-len", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "dtype float64 (code 6)" in result.stdout and "float tokens, not decoded" in result.stdout
