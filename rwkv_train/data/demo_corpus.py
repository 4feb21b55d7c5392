"""A demo corpus found on any machine with Python: the standard library's own source files.

Nothing is downloaded. The files are taken in sorted order (tests and vendored packages skipped), each
one a document, until the byte budget is reached; every 20th document goes to the validation split.
"""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path
from typing import Iterator

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3", "turtledemo"}


def stdlib_sources() -> Iterator[Path]:
    """The standard library's .py files in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def write_demo_corpus(out_dir: str | Path, max_bytes: int = 6_000_000, val_every: int = 20) -> tuple[Path, Path]:
    """Write train.jsonl and val.jsonl under out_dir; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_path, val_path = out_dir / "train.jsonl", out_dir / "val.jsonl"
    total = 0
    with open(train_path.with_suffix(".tmp"), "w") as train, open(val_path.with_suffix(".tmp"), "w") as val:
        for i, path in enumerate(stdlib_sources()):
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if not text.strip():
                continue
            line = json.dumps({"text": text, "source": path.name}) + "\n"
            (val if i % val_every == val_every - 1 else train).write(line)
            total += len(text.encode())
            if total >= max_bytes:
                break
    train_path.with_suffix(".tmp").replace(train_path)
    val_path.with_suffix(".tmp").replace(val_path)
    return train_path, val_path
