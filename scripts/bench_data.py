"""Data-preparation throughput and memory: one table.

    python scripts/bench_data.py                 # 16 MB runs, a 1.1 GB run
    python scripts/bench_data.py --mb 8 --big-gb 0   # skip the big run

Rows:
  * tokenizer MB/s of the World tokenizers on the same text in this run: ours,
    the reference `rwkv.rwkv_tokenizer.TRIE_TOKENIZER` and `pyrwkv_tokenizer`
    (from scripts/bench_tokenizer.py's `tokenizer_table` when present);
  * data_prep/make_binidx.py MB/s of text with 1 and 2 workers on an --mb MB
    .jsonl, run as a subprocess (tokenizer loading excluded from MB/s);
  * the same on a --big-gb GB .jsonl (1 and 2 workers, then 2 with --shuffle
    and a validation split), with the peak resident memory of the make_binidx
    process and of its largest worker (VmHWM / getrusage CHILDREN).

The inputs are generated here, deterministically (varied text: standard-library
sources and multilingual sentences, sliced at shifting offsets), in a temporary
directory that is deleted afterwards (--tmp chooses where; it needs about
2.5x --big-gb of free disk).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAKE_BINIDX = REPO / "data_prep" / "make_binidx.py"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SENTENCES = [
    "The committee met on {n} March and agreed to publish the results before the summer.",
    "数据准备好以后，我们在第{n}天开始训练模型，并记录了每一步的损失。",
    "今日は{n}件の注文がありました。発送は明日の午前中に行います。",
    "Встреча перенесена на {n} число; пожалуйста, подтвердите участие.",
    "La réunion du {n} mai a duré deux heures, et personne n'a pris de notes.",
    "Der Zug nach Berlin fährt um {n} Uhr von Gleis sieben ab.",
    "if count > {n}:\n    raise ValueError(f\"too many items: {{count}}\")\n",
    "Release notes: fixed {n} bugs ✅, improved speed 🚀, and updated the docs 📄.",
]

# Runs the CLI in-process and reports its own and its children's peak memory. Its own peak is read
# from /proc (VmHWM) where there is one: ru_maxrss can carry the launching process's size across exec.
_WRAPPER = """
import json, resource, runpy, sys
script, out = sys.argv[1], sys.argv[2]
sys.argv = [script] + sys.argv[3:]
main = runpy.run_path(script, run_name="make_binidx")["main"]
rc = main(sys.argv[1:])
own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    own = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
except (OSError, IndexError):
    pass
usage = {"rc": rc, "self_kb": own, "children_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}
open(out, "w").write(json.dumps(usage))
"""


def base_text(num_bytes: int = 8_000_000, seed: int = 0) -> str:
    """About `num_bytes` of varied text: stdlib sources interleaved with numbered multilingual sentences."""
    rng = random.Random(seed)
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for path in sorted(root.glob("*.py")):
        parts.append(path.read_text(encoding="utf-8", errors="replace"))
        for _ in range(40):
            parts.append(rng.choice(SENTENCES).replace("{n}", str(rng.randint(1, 9999))) + rng.choice(["\n", " "]))
        size += sum(len(p) for p in parts[-41:])
        if size >= num_bytes:
            break
    return "".join(parts)


def write_corpus(path: Path, num_bytes: int, text: str) -> int:
    """A .jsonl of about `num_bytes`: documents of 1-8 KB sliced from `text` at shifting offsets."""
    written, i, n = 0, 0, len(text)
    with open(path, "w", encoding="utf-8") as f:
        while written < num_bytes:
            start = (i * 7_919) % (n - 9_000)
            length = 1_000 + (i * 104_729) % 7_000
            line = json.dumps({"text": f"[{i}] " + text[start:start + length]}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            i += 1
    return written


def run_make_binidx(args: list[str], workdir: Path) -> dict:
    """Run make_binidx through the wrapper; its MB/s, seconds and peak memory."""
    usage_file = workdir / "usage.json"
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", _WRAPPER, str(MAKE_BINIDX), str(usage_file), *args],
                            capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"make_binidx failed:\n{result.stderr[-2000:]}")
    usage = json.loads(usage_file.read_text())
    match = re.search(r"\(([\d.]+) MB of text\), \d+ tokens in ([\d.]+) s: ([\d.]+) MB/s", result.stdout)
    return {"text_mb": float(match.group(1)), "seconds": float(match.group(2)), "mb_per_s": float(match.group(3)),
            "wall": wall, "parent_mb": usage["self_kb"] / 1024, "workers_mb": usage["children_kb"] / 1024}


def tokenizer_rows(sample_mb: float) -> list[tuple[str, float, str]]:
    """(name, MB/s, note) per tokenizer, from bench_tokenizer.tokenizer_table when it exists."""
    spec = importlib.util.spec_from_file_location("bench_tokenizer", REPO / "scripts" / "bench_tokenizer.py")
    if spec is not None and Path(spec.origin).is_file():
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if hasattr(module, "tokenizer_table"):
            rows = []
            for row in module.tokenizer_table(sample_mb):
                same = {True: "ids = reference", False: "IDS DIFFER", None: ""}[row.get("matches_reference")]
                rows.append((f"tokenizer {row['tokenizer']} [{row['text']}]", row["mb_per_s"],
                             f"{row['sample_mb']:.2f} MB sample, 1 core {same}".rstrip()))
            return rows
    return _measure_tokenizers(sample_mb)


def _measure_tokenizers(sample_mb: float) -> list[tuple[str, float, str]]:
    from rwkv_train.tokenizer import WorldTokenizer, vocab_path

    text = base_text(int(sample_mb * 1e6))
    slow = text.encode("utf-8")[: int(min(sample_mb, 0.5) * 1e6)].decode("utf-8", "ignore")
    encoders = [("ours", WorldTokenizer().encode, text)]
    try:
        from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

        encoders.append(("reference TRIE_TOKENIZER", TRIE_TOKENIZER(str(vocab_path())).encode, slow))
    except ImportError:
        pass
    try:
        import pyrwkv_tokenizer

        encoders.append(("pyrwkv_tokenizer", pyrwkv_tokenizer.RWKVTokenizer().encode, text))
    except ImportError:
        pass
    rows = []
    for name, encode, sample in encoders:
        size = len(sample.encode("utf-8"))
        start = time.perf_counter()
        encode(sample)
        rows.append((f"tokenizer {name}", size / (time.perf_counter() - start) / 1e6, f"{size / 1e6:.2f} MB sample"))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=16.0, help="size of the make_binidx input for 1 vs 2 workers")
    parser.add_argument("--big-gb", type=float, default=1.1, help="size of the big input (0 skips it)")
    parser.add_argument("--tokenizer-mb", type=float, default=4.0, help="text per tokenizer for its MB/s")
    parser.add_argument("--tmp", help="directory for the generated inputs and outputs (default: system temp)")
    args = parser.parse_args()

    rows: list[tuple[str, float, str]] = tokenizer_rows(args.tokenizer_mb)
    work = Path(tempfile.mkdtemp(prefix="bench_data_", dir=args.tmp))
    try:
        text = base_text()
        small = work / "small.jsonl"
        write_corpus(small, int(args.mb * 1e6), text)
        for workers in (1, 2):
            r = run_make_binidx(["--input", str(small), "--output", str(work / f"small{workers}"),
                                 "--workers", str(workers)], work)
            rows.append((f"make_binidx {args.mb:g} MB, {workers} worker{'s' if workers > 1 else ''}", r["mb_per_s"],
                         f"{r['wall']:.1f} s wall, peak RSS {r['parent_mb']:.0f} MB main"
                         + (f" / {r['workers_mb']:.0f} MB worker" if workers > 1 else "")))
        same = all((work / f"small1{s}").read_bytes() == (work / f"small2{s}").read_bytes() for s in (".bin", ".idx"))
        rows.append(("make_binidx output 1 vs 2 workers", float("nan"), "byte-identical" if same else "DIFFERENT"))
        for suffix in (".bin", ".idx", ".json"):
            for w in (1, 2):
                (work / f"small{w}{suffix}").unlink()
        if args.big_gb > 0:
            big = work / "big.jsonl"
            start = time.perf_counter()
            size = write_corpus(big, int(args.big_gb * 1e9), text)
            print(f"generated {size / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s; running make_binidx on it",
                  file=sys.stderr)
            runs = ((1, [], ""), (2, [], ""), (2, ["--shuffle", "--val-fraction", "0.01"], ", --shuffle --val-fraction"))
            for workers, extra, label in runs:
                out = work / "bigout"
                r = run_make_binidx(["--input", str(big), "--output", str(out), "--workers", str(workers), *extra],
                                    work)
                name = f"{workers} worker{'s' if workers > 1 else ''}"
                rows.append((f"make_binidx {size / 1e9:.2f} GB, {name}{label}", r["mb_per_s"],
                             f"{r['wall']:.0f} s wall, peak RSS {r['parent_mb']:.0f} MB main"
                             + (f" / {r['workers_mb']:.0f} MB worker" if workers > 1 else "")))
                for path in work.glob("bigout*"):
                    path.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    width = max(len(name) for name, _, _ in rows)
    print(f"{'what':<{width}}  {'MB/s':>8}  notes")
    for name, rate, note in rows:
        shown = "" if math.isnan(rate) else f"{rate:8.1f}"
        print(f"{name:<{width}}  {shown:>8}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
