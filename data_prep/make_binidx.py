"""Tokenize text corpora into a binidx corpus for training.

    python data_prep/make_binidx.py --input data/train.jsonl --output data/train
    python data_prep/make_binidx.py --input 'shards/*.jsonl.zst' --input extra/ --output data/mix \\
        --workers 8 --val-fraction 0.001
    python data_prep/make_binidx.py --input sft.jsonl --output data/sft --shuffle --epochs 3
    python data_prep/make_binidx.py --input pile/ --tokenizer 20B_tokenizer.json --output data/pile

Inputs (--input, repeated): files, quoted globs (expanded here, sorted) or
directories (every .jsonl/.json/.txt below, also .gz/.zst, sorted); `-` reads
JSON lines from standard input. .jsonl/.json files hold one JSON object per
line (text under --text-key); any other file is one document. Every document
ends with the end-of-document id (0 for World), as in RWKV-LM's make_data.py.

Writes PREFIX.bin, PREFIX.idx and PREFIX.json (a description), all or nothing:
files carry .tmp names until the end, and a later run removes the leftovers of
a killed one. Tokens are uint16 for vocabularies up to 65536 ids, else int32
(dtype code 4, which Megatron-LM, GPT-NeoX and RWKV-LM all read).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

try:
    import rwkv_train  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rwkv_train.data.binidx import strip_suffix
from rwkv_train.data.build import DEFAULT_BATCH_BYTES, BuildReport, build_binidx
from rwkv_train.data.sampling import magic_prime
from rwkv_train.data.sources import expand_inputs
from rwkv_train.errors import UserError

CTX_LENS = (512, 4096)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", action="append", required=True, metavar="PATH",
                        help="a file, a quoted glob, a directory or - (stdin); repeat for several")
    parser.add_argument("--output", required=True, metavar="PREFIX", help="writes PREFIX.bin/.idx/.json")
    parser.add_argument("--text-key", default="text", metavar="KEY", help="JSON key holding the text (default: text)")
    parser.add_argument("--tokenizer", default="world", metavar="world|PATH",
                        help="world (default) or the path of a Hugging Face tokenizer.json")
    parser.add_argument("--eod-id", type=int, default=0, metavar="ID",
                        help="end-of-document id appended to every document (default 0; World uses 0)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help=f"tokenizing processes (default 1; this machine has {os.cpu_count()} cores)")
    parser.add_argument("--shuffle", action="store_true", help="shuffle the document order (see --seed)")
    parser.add_argument("--epochs", type=int, default=1, metavar="N",
                        help="write the documents N times, each pass shuffled differently with --shuffle")
    parser.add_argument("--seed", type=int, default=0, help="seed of --shuffle and --val-fraction (default 0)")
    parser.add_argument("--val-fraction", type=float, default=0.0, metavar="F",
                        help="hold out this share of documents (chosen by a hash) as a validation corpus")
    parser.add_argument("--val-output", metavar="PREFIX", help="validation corpus prefix (default PREFIX_val)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="count and skip bad lines (malformed JSON, missing text, bad UTF-8) instead of stopping")
    parser.add_argument("--errors", choices=("strict", "replace"), default="strict",
                        help="invalid UTF-8: strict stops (default), replace puts U+FFFD")
    parser.add_argument("--ctx-len", type=int, action="append", metavar="L",
                        help=f"print the magic prime for this ctx_len (repeatable; default {' and '.join(map(str, CTX_LENS))})")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--progress", action="store_true",
                        help="show the progress bar even when stderr is not a terminal")
    parser.add_argument("--batch-mb", type=float, default=DEFAULT_BATCH_BYTES / 2**20, metavar="MB",
                        help=f"input per worker task in MB (default {DEFAULT_BATCH_BYTES / 2**20:g})")
    return parser.parse_args(argv)


class _Progress:
    """A tqdm bar over input bytes (MB/s) with tokens/s, opened on the first update so that errors
    found before any work print cleanly; silent without a terminal unless forced, or without tqdm."""

    def __init__(self, total_bytes: int | None, force: bool) -> None:
        self.total, self.force = total_bytes, force
        self.bar, self.last, self.start = None, 0, time.perf_counter()
        self.rewrite_bar = None

    def _open(self, **kwargs):
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        return tqdm(file=sys.stderr, disable=False if self.force else None, leave=False, **kwargs)

    def __call__(self, documents: int, tokens: int, bytes_read: int) -> None:
        if self.bar is None:
            self.bar = self._open(total=self.total, unit="B", unit_scale=True, unit_divisor=1000,
                                  desc="tokenizing")
            if self.bar is None:
                return
        self.bar.update(bytes_read - self.last)
        self.last = bytes_read
        rate = tokens / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{documents} docs, {tokens / 1e6:.1f}M tokens, {rate / 1e6:.2f}M tokens/s",
                                 refresh=False)

    def rewrite(self, done: int, total: int) -> None:
        if self.rewrite_bar is None:
            self.rewrite_bar = self._open(total=total, unit="doc", desc="shuffling/repeating")
            if self.rewrite_bar is None:
                return
        self.rewrite_bar.update(done - self.rewrite_bar.n)

    def close(self) -> None:
        for bar in (self.bar, self.rewrite_bar):
            if bar is not None:
                bar.close()


def _summary(report: BuildReport, args: argparse.Namespace, prefix: str) -> list[str]:
    train = report.train
    how = []
    if args.epochs > 1:
        how.append(f"{args.epochs} passes")
    if args.shuffle:
        how.append(f"shuffled with seed {args.seed}")
    lines = [f"wrote {prefix}.bin/.idx/.json: {train['num_documents']} documents, {train['num_tokens']} tokens "
             f"({train['dtype']}, max id {train['max_token_id']}, tokenizer {train['tokenizer']})"
             + (f", {', '.join(how)}" if how else "")]
    if report.val is not None:
        val_prefix = strip_suffix(args.val_output) if args.val_output else f"{prefix}_val"
        lines.append(f"wrote {val_prefix}.bin/.idx/.json: {report.val['num_documents']} documents, "
                     f"{report.val['num_tokens']} tokens (validation, --val-fraction {args.val_fraction})")
    seconds = max(report.tokenize_seconds, 1e-9)
    tokens = train["num_tokens"] // args.epochs + (report.val["num_tokens"] if report.val else 0)
    lines.append(f"read {report.documents} documents, {report.input_bytes / 1e6:.1f} MB from disk "
                 f"({report.text_bytes / 1e6:.1f} MB of text), {tokens} tokens in {seconds:.1f} s: "
                 f"{report.text_bytes / 1e6 / seconds:.2f} MB/s, {tokens / seconds:,.0f} tokens/s "
                 f"({args.workers} worker{'s' if args.workers > 1 else ''}); total {report.seconds:.1f} s")
    if report.empty:
        lines.append(f"skipped {report.empty} empty document{'s' if report.empty > 1 else ''}")
    if report.bad:
        lines.append(f"skipped {report.bad} bad line{'s' if report.bad > 1 else ''} (--skip-bad), e.g.:")
        lines.extend(f"  {example}" for example in report.bad_examples)
    n = train["num_tokens"]
    for ctx_len in args.ctx_len or CTX_LENS:
        try:
            prime = magic_prime(n, ctx_len)
        except UserError:
            lines.append(f"ctx_len {ctx_len}: too few tokens for magic-prime sampling "
                         f"(needs at least {3 * ctx_len})")
            continue
        lines.append(f"ctx_len {ctx_len}: magic_prime {prime}, one pass = {prime * ctx_len} tokens "
                     f"(train.max_tokens={prime * ctx_len}; RWKV-LM: --magic_prime {prime} --my_exit_tokens {n})")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if any(L < 1 for L in args.ctx_len or ()):
        print(f"error: --ctx-len must be a positive number of tokens, got {args.ctx_len}", file=sys.stderr)
        return 2
    try:
        total = sum(s.size or 0 for s in expand_inputs(args.input))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    progress = _Progress(total or None, args.progress)
    try:
        report = build_binidx(
            args.input, args.output, text_key=args.text_key, overwrite=args.overwrite, progress=progress,
            tokenizer=args.tokenizer, eod_id=args.eod_id, workers=args.workers, shuffle=args.shuffle,
            seed=args.seed, epochs=args.epochs, val_fraction=args.val_fraction, val_output=args.val_output,
            skip_bad=args.skip_bad, errors=args.errors, batch_bytes=max(1, int(args.batch_mb * 2**20)),
            rewrite_progress=progress.rewrite,
        )
    except UserError as exc:
        progress.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        progress.close()
        print("interrupted; no output written", file=sys.stderr)
        return 130
    progress.close()
    for path in report.removed_temps:
        print(f"note: removed {path}, left by an interrupted run", file=sys.stderr)
    print("\n".join(_summary(report, args, strip_suffix(args.output))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
