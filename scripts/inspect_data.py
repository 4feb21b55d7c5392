"""Describe a binidx corpus: counts, dtype, token ids, document lengths, magic prime, a decoded sample.

    python scripts/inspect_data.py data/train
    python scripts/inspect_data.py data/pile --ctx-len 1024 --tokenizer 20B_tokenizer.json
    python scripts/inspect_data.py data/train --sample-at 123456 --sample-tokens 200

Reads any binidx (ours, RWKV-LM's, Megatron-LM's or GPT-NeoX's, every dtype
code, documents of one or several sequences). The tokenizer used to decode
the sample is --tokenizer, else the one recorded in PREFIX.json, else World.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

try:
    import rwkv_train  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rwkv_train.data.binidx import BinIdx
from rwkv_train.data.build import sidecar_path
from rwkv_train.data.sampling import magic_prime
from rwkv_train.errors import UserError

CTX_LENS = (512, 4096)
_SCAN = 1 << 24  # tokens per slice when scanning for the id range (bounded memory)
_BAR = 40


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prefix", help="corpus prefix (PREFIX.bin / PREFIX.idx; a .bin/.idx suffix is accepted)")
    parser.add_argument("--ctx-len", type=int, action="append", metavar="L",
                        help=f"print the magic prime for this ctx_len (repeatable; default {' and '.join(map(str, CTX_LENS))})")
    parser.add_argument("--sample-tokens", type=int, default=64, metavar="N", help="tokens to decode (default 64)")
    parser.add_argument("--sample-at", type=int, default=0, metavar="T", help="first token of the sample (default 0)")
    parser.add_argument("--tokenizer", metavar="world|PATH", help="decode with this tokenizer")
    return parser.parse_args(argv)


def token_range(data: BinIdx) -> tuple[float, float] | None:
    """(smallest, largest) token value, scanned in slices; None for an empty corpus."""
    low = high = None
    for start in range(0, data.num_tokens, _SCAN):
        part = np.asarray(data.tokens[start:start + _SCAN])
        lo, hi = part.min().item(), part.max().item()
        low = lo if low is None else min(low, lo)
        high = hi if high is None else max(high, hi)
    return None if low is None else (low, high)


def length_histogram(lengths: np.ndarray) -> list[str]:
    """Text histogram of document lengths in log2 buckets: [2^k, 2^(k+1))."""
    if lengths.size == 0:
        return ["  (no documents)"]
    buckets = np.zeros(64, dtype=np.int64)
    zero = int((lengths == 0).sum())
    positive = lengths[lengths > 0]
    if positive.size:
        np.add.at(buckets, np.floor(np.log2(positive)).astype(np.int64), 1)
    rows = [("0", zero)] if zero else []
    used = np.flatnonzero(buckets)
    for k in range(used.min(), used.max() + 1) if used.size else ():
        rows.append((f"{2**k}-{2**(k + 1) - 1}", int(buckets[k])))
    top = max(count for _, count in rows)
    width = max(len(label) for label, _ in rows)
    lines = []
    for label, count in rows:
        bar = "#" * (round(_BAR * count / top) if count else 0)
        lines.append(f"  {label:>{width}} tokens | {count:>10} {bar}")
    return lines


def _tokenizer_name(args: argparse.Namespace, data: BinIdx) -> tuple[str, int]:
    if args.tokenizer:
        return args.tokenizer, 0
    sidecar = sidecar_path(data.prefix)
    if sidecar.is_file():
        try:
            info = json.loads(sidecar.read_text())
            return str(info.get("tokenizer", "world")), int(info.get("eod_id", 0))
        except (OSError, ValueError):
            pass
    return "world", 0


def decode_sample(data: BinIdx, args: argparse.Namespace) -> list[str]:
    start = min(max(args.sample_at, 0), data.num_tokens)
    ids = np.asarray(data.tokens[start:start + max(args.sample_tokens, 0)])
    if ids.size == 0:
        return ["(no tokens to decode)"]
    if ids.dtype.kind == "f":
        return [f"(float tokens, not decoded) {ids[:16].tolist()}"]
    name, eod = _tokenizer_name(args, data)
    from rwkv_train.data.tokenize_pool import TokenizerSpec

    try:
        tok = TokenizerSpec(name, eod if name != "world" else 0).load()
        # Mark document ends: they decode to nothing (World) or to an invisible token.
        pieces, run = [], []
        for t in ids.tolist():
            if t == tok.eod_id:
                pieces.append(tok.decode(run) + "<|eod|>")
                run = []
            else:
                run.append(t)
        pieces.append(tok.decode(run))
        text = "".join(pieces)
    except UserError as exc:
        return [f"(cannot decode with tokenizer {name}: {exc})", f"ids: {ids[:32].tolist()}"]
    return [f"sample: tokens {start}..{start + ids.size - 1} decoded with {name}:", text]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        data = BinIdx(args.prefix)
        if any(L < 1 for L in args.ctx_len or ()):
            raise UserError(f"--ctx-len must be a positive number of tokens, got {args.ctx_len}")
        lengths = data.document_lengths()
        lines = [
            f"corpus {data.prefix}: {len(data)} sequences, {data.num_documents} documents, {data.num_tokens} tokens",
            f"dtype {data.dtype} (code {data.dtype_code}), {data.bin_path.stat().st_size} bytes of tokens",
        ]
        if len(data) != data.num_documents:
            lines.append("documents span several sequences (a Megatron sentence-split index)")
        rng = token_range(data)
        lines.append("token ids: none" if rng is None else f"token ids: {rng[0]}..{rng[1]}")
        if lengths.size:
            lines.append(f"document length (tokens): min {int(lengths.min())}, mean {lengths.mean():.1f}, "
                         f"median {int(np.median(lengths))}, max {int(lengths.max())}")
        lines.append("document lengths (log2 buckets):")
        lines.extend(length_histogram(lengths))
        for ctx_len in args.ctx_len or CTX_LENS:
            try:
                prime = magic_prime(data.num_tokens, ctx_len)
                lines.append(f"ctx_len {ctx_len}: magic_prime {prime}, one pass = {prime * ctx_len} tokens")
            except UserError:
                lines.append(f"ctx_len {ctx_len}: too few tokens for magic-prime sampling "
                             f"(needs at least {3 * ctx_len})")
        lines.extend(decode_sample(data, args))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
