"""The real data_prep/make_binidx.py CLI on tiny inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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
    # Every document is its tokens then 0; splitting at 0 gives the texts back. The empty one is skipped.
    assert tokens[-1] == 0
    pieces = np.split(np.array(tokens), np.flatnonzero(np.array(tokens) == 0) + 1)[:-1]
    expected = [t for t in TEXTS if t] + [PLAIN]
    assert [tok.decode(p.tolist()[:-1]) for p in pieces] == expected
    assert tokens == [t for text in expected for t in tok.encode(text) + [0]]
    # One sequence per document, as RWKV-LM's make_data.py writes it.
    assert len(data) == len(expected)
    assert data.doc_idx.tolist() == list(range(len(expected) + 1))

    sidecar = json.loads(Path(f"{prefix}.json").read_text())
    assert sidecar == {
        "tokenizer": "world",
        "vocab_size": 65536,
        "eod_id": 0,
        "num_tokens": len(tokens),
        "num_documents": len(expected),
        "max_token_id": max(tokens),
        "dtype": "uint16",
        "sources": [str(jsonl), str(txt)],
        "split": "train",
        "epochs": 1,
        "shuffle": False,
        "seed": 0,
        "val_fraction": 0.0,
    }
    assert f"{len(expected)} documents, {len(tokens)} tokens" in result.stdout
    assert "skipped 1 empty document" in result.stdout
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
    assert BinIdx(prefix).num_documents == 2 * (len(TEXTS) - 1)  # the empty document is skipped


# build_binidx in-process: the cases that need no subprocess.

def test_build_strips_bom_and_reports_progress(tmp_path):
    src = tmp_path / "bom.txt"
    src.write_bytes(b"\xef\xbb\xbfbody text")
    calls = []
    info = build_binidx([src], tmp_path / "bom", progress=lambda *a: calls.append(a))
    tok = WorldTokenizer()
    assert BinIdx(tmp_path / "bom").tokens.tolist() == tok.encode("body text") + [0]
    assert info.train["num_documents"] == 1
    assert calls == [(1, info.train["num_tokens"], src.stat().st_size)]


def test_build_rejects_bad_input(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt:1: not valid UTF-8.*re-save.*--errors replace"):
        build_binidx([latin1], tmp_path / "a")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="no documents"):
        build_binidx([blank], tmp_path / "b")
    surrogate = tmp_path / "s.jsonl"
    surrogate.write_text('{"text": "ok"}\n{"text": "\\ud800"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="s.jsonl:2: 'text' holds a lone surrogate"):
        build_binidx([surrogate], tmp_path / "c")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "notes.md").write_text("not an input kind")
    with pytest.raises(DataError, match="empty_dir holds no .jsonl, .json or .txt files"):
        build_binidx([tmp_path / "empty_dir"], tmp_path / "d")
    with pytest.raises(DataError, match="output directory .* does not exist"):
        build_binidx([blank], tmp_path / "nodir" / "e")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.jsonl", "empty_dir", "latin1.txt", "s.jsonl"]


# Corpus-scale options, through the CLI.

def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def test_glob_workers_and_summary(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(3):
        _jsonl(shards / f"part{i}.jsonl", [f"shard {i} document {j}: " + "words " * (j % 7) for j in range(40)])
    one = run_cli("--input", str(shards / "*.jsonl"), "--output", str(tmp_path / "one"), "--ctx-len", "16",
                  cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    two = run_cli("--input", str(shards / "part*.jsonl"), "--output", str(tmp_path / "two"), "--workers", "2",
                  "--batch-mb", "0.0005", "--progress", cwd=tmp_path)
    assert two.returncode == 0, two.stderr
    # Any number of workers and any batch size give the same bytes.
    for suffix in (".bin", ".idx"):
        assert Path(f"{tmp_path / 'one'}{suffix}").read_bytes() == Path(f"{tmp_path / 'two'}{suffix}").read_bytes()
    assert json.loads(Path(f"{tmp_path / 'one'}.json").read_text())["sources"] == [
        str(shards / f"part{i}.jsonl") for i in range(3)]
    n = BinIdx(tmp_path / "one").num_tokens
    assert "120 documents" in one.stdout and "MB/s" in one.stdout and "tokens/s" in one.stdout
    assert f"ctx_len 16: magic_prime {magic_prime(n, 16)}, one pass = {magic_prime(n, 16) * 16} tokens" in one.stdout
    assert "tokenizing" in two.stderr and "B/s" in two.stderr  # --progress forces the bar off a terminal
    assert "tokenizing" not in one.stderr


def test_glob_matching_nothing(tmp_path):
    result = run_cli("--input", str(tmp_path / "missing" / "*.jsonl"), "--output", str(tmp_path / "x"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("error:") == 1 and "matches no files" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_skip_bad_summary(tmp_path):
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(b'{"text": "good one"}\n{"text": broken\n{"body": "x"}\n{"text": ""}\n'
                    b'{"text": "bad \xff byte"}\n{"text": "good two"}\n')
    strict = run_cli("--input", str(src), "--output", str(tmp_path / "a"), cwd=tmp_path)
    assert strict.returncode == 2 and "mixed.jsonl:2: malformed JSON" in strict.stderr
    assert "--skip-bad" in strict.stderr
    result = run_cli("--input", str(src), "--output", str(tmp_path / "b"), "--skip-bad", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "2 documents" in result.stdout
    assert "skipped 1 empty document" in result.stdout
    assert "skipped 3 bad lines (--skip-bad)" in result.stdout
    for where in ("mixed.jsonl:2: malformed JSON", "mixed.jsonl:3: no key 'text'", "mixed.jsonl:5: not valid UTF-8"):
        assert where in result.stdout
    replaced = run_cli("--input", str(src), "--output", str(tmp_path / "c"), "--skip-bad", "--errors", "replace",
                       cwd=tmp_path)
    assert replaced.returncode == 0 and "3 documents" in replaced.stdout
    assert "\ufffd" in WorldTokenizer().decode(BinIdx(tmp_path / "c").tokens.tolist())


def test_shuffle_epochs_val_split(tmp_path):
    src = _jsonl(tmp_path / "docs.jsonl", [f"document number {i}" for i in range(60)])
    args = ["--input", str(src), "--shuffle", "--epochs", "3", "--val-fraction", "0.2", "--seed", "7"]
    result = run_cli(*args, "--output", str(tmp_path / "a"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    again = run_cli(*args, "--output", str(tmp_path / "b"), "--workers", "2", "--batch-mb", "0.0002", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    for name, other in (("a", "b"), ("a_val", "b_val")):
        for suffix in (".bin", ".idx"):
            assert Path(f"{tmp_path / name}{suffix}").read_bytes() == Path(f"{tmp_path / other}{suffix}").read_bytes()
    train, val = BinIdx(tmp_path / "a"), BinIdx(tmp_path / "a_val")
    tok = WorldTokenizer()
    train_docs = [tok.decode(train[i].tolist()[:-1]) for i in range(len(train))]
    val_docs = [tok.decode(val[i].tolist()[:-1]) for i in range(len(val))]
    n_train = len(train_docs) // 3
    passes = [train_docs[k * n_train:(k + 1) * n_train] for k in range(3)]
    # Each pass holds every training document once, in its own order; validation is disjoint.
    assert len(train_docs) == 3 * n_train and 0 < len(val_docs) < 30
    assert all(sorted(p) == sorted(passes[0]) for p in passes)
    assert passes[0] != passes[1] and passes[1] != passes[2]
    assert sorted(passes[0] + val_docs) == sorted(f"document number {i}" for i in range(60))
    assert val_docs == sorted(val_docs, key=lambda t: int(t.split()[-1]))  # held out in input order
    assert "3 passes, shuffled with seed 7" in result.stdout and "a_val.bin/.idx/.json" in result.stdout
    assert json.loads((tmp_path / "a_val.json").read_text())["split"] == "val"
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def _children(pid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            found.append(int(status.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text().split("State:\t", 1)[1][:1]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads worker processes from /proc")
def test_killed_run_leaves_nothing_finished(tmp_path):
    prefix = tmp_path / "killed"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # Read from a pipe that stays open: the run is certainly mid-way when it is killed.
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--input", "-", "--output", str(prefix), "--workers", "2",
         "--val-fraction", "0.3", "--batch-mb", "0.0001"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path, env=env)
    try:
        line = json.dumps({"text": "some words to tokenize " * 10}) + "\n"
        proc.stdin.write((line * 300).encode())
        proc.stdin.flush()
        partial = Path(f"{prefix}.bin.tmp")
        deadline = time.monotonic() + 60
        while not (partial.exists() and partial.stat().st_size > 0):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the run never started writing"
            time.sleep(0.05)
        workers = _children(proc.pid)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdin.close()
        proc.stdout.close()
        proc.stderr.close()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left and all(name.endswith(".tmp") for name in left), left
    assert outputs(prefix) == [] and outputs(tmp_path / "killed_val") == []
    # Orphaned workers notice their parent is gone and stop.
    assert len(workers) >= 2
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers)
    # The next run for the same output removes the leftovers and finishes.
    src = _jsonl(tmp_path / "docs.jsonl", [f"doc {i}" for i in range(30)])
    result = run_cli("--input", str(src), "--output", str(prefix), "--val-fraction", "0.3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "removed" in result.stderr and "killed.bin.tmp" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["docs.jsonl", "killed.bin", "killed.idx", "killed.json", "killed_val.bin", "killed_val.idx",
         "killed_val.json"])
