"""The CPU demo: build a corpus from Python's own standard library, train RWKV-7 on it, evaluate, sample.

    python scripts/demo.py            (what `make demo` runs)

Every step runs the project's real command-line tools, so the demo doubles as their smoke test.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rwkv_train.data.binidx import BinIdx  # noqa: E402
from rwkv_train.data.demo_corpus import write_demo_corpus  # noqa: E402


def unigram_entropy(prefix: Path) -> float:
    """Entropy in nats of the corpus's token frequencies: the loss of the best context-free model."""
    counts = np.bincount(np.asarray(BinIdx(prefix).tokens), minlength=65536).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def run(cmd: list[str], capture: bool = False) -> str:
    print("$", " ".join(cmd), flush=True)
    result = subprocess.run(cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE if capture else None)
    if result.returncode != 0:
        sys.exit(f"demo: step failed with exit code {result.returncode}: {' '.join(cmd)}")
    return result.stdout or ""


def free_dir(base: Path) -> Path:
    """`base`, or base-2, base-3, ... : the demo never writes into an earlier run's directory."""
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data/demo", help="where the demo corpus is built (reused if there)")
    parser.add_argument("--out", default="out/demo", help="run directory (a fresh -N suffix if it exists)")
    parser.add_argument("--steps", type=int, default=None, help="override train.max_steps of configs/demo.yaml")
    args = parser.parse_args()
    start = time.time()
    py = sys.executable
    data_dir = ROOT / args.data_dir

    print("== 1. corpus: Python standard-library source, tokenized with the RWKV World tokenizer")
    if not (data_dir / "train.bin").exists() or not (data_dir / "val.bin").exists():
        train_jsonl, val_jsonl = write_demo_corpus(data_dir)
        for split, jsonl in (("train", train_jsonl), ("val", val_jsonl)):
            run([py, "data_prep/make_binidx.py", "--input", str(jsonl), "--output", str(data_dir / split), "--overwrite"])
    else:
        print(f"reusing {data_dir}/train and {data_dir}/val")
    entropy = unigram_entropy(data_dir / "train")
    print(f"unigram entropy of the training corpus: {entropy:.3f} nats/token")

    print("\n== 2. training (configs/demo.yaml)")
    out_dir = free_dir(ROOT / args.out)
    overrides = [f"train.out_dir={out_dir}", f"data.train={data_dir / 'train'}", f"data.val={data_dir / 'val'}"]
    if args.steps:
        overrides.append(f"train.max_steps={args.steps}")
    train_start = time.time()
    run([py, "train.py", "--config", "configs/demo.yaml", *overrides])
    train_time = time.time() - train_start

    print("\n== 3. evaluation on the validation split")
    ckpt = out_dir / "rwkv-final.pth"
    result = json.loads(run([py, "scripts/eval.py", "--checkpoint", str(ckpt), "--data", str(data_dir / "val"),
                             "--ctx-len", "256", "--max-tokens", "32768"], capture=True).strip().splitlines()[-1])
    print(json.dumps(result))

    print("\n== 4. a sample (RNN mode, temperature 0.8, top-p 0.8)")
    print(run([py, "scripts/generate.py", "--checkpoint", str(ckpt), "--prompt", "def ", "--max-tokens", "80",
               "--temperature", "0.8", "--top-p", "0.8"], capture=True))

    rows = [r for r in csv.DictReader((out_dir / "metrics.csv").open()) if r["loss"]]
    last = rows[-3:]
    final_loss = sum(float(r["loss"]) for r in last) / len(last)
    speed = sorted(float(r["tokens_per_s"]) for r in rows[1:] or rows)[len(rows[1:] or rows) // 2]
    print("== summary")
    print(f"training loss (last steps)  {final_loss:.3f} nats/token, from {float(rows[0]['loss']):.3f} "
          f"over steps 1-{rows[0]['step']}")
    print(f"validation loss             {result['loss']:.3f} nats/token (perplexity {result['perplexity']:.1f})")
    print(f"unigram entropy of corpus   {entropy:.3f} nats/token  -> the model is "
          f"{entropy - result['loss']:.2f} nats below it on held-out text")
    print(f"training speed              {speed:.0f} tokens/s (median), training took {train_time:.0f} s")
    print(f"demo wall time              {time.time() - start:.0f} s")
    print(f"outputs in {out_dir}: rwkv-final.pth (official layout), resume.ckpt, metrics.csv, loss.png, config.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
