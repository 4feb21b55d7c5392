"""Tokenize text into a binidx corpus for training (World tokenizer, uint16).

    python data_prep/make_binidx.py --input data/train.jsonl --output data/train
    python data_prep/make_binidx.py --input a.txt --input b.jsonl --output data/mix --overwrite

Writes PREFIX.bin, PREFIX.idx and PREFIX.json (a description), all or nothing.
.jsonl inputs hold one JSON object per line (text under --text-key); any other
file is one document. Every document ends with the end-of-document id 0, as in
RWKV-LM's make_data.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import rwkv_train  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rwkv_train.data.binidx import strip_suffix
from rwkv_train.data.build import build_binidx
from rwkv_train.data.sampling import magic_prime
from rwkv_train.errors import UserError

CTX_LENS = (512, 4096)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", action="append", required=True, metavar="FILE",
                        help="a .jsonl or text file; repeat for several")
    parser.add_argument("--output", required=True, metavar="PREFIX", help="writes PREFIX.bin/.idx/.json")
    parser.add_argument("--text-key", default="text", help="JSON key holding the text (default: text)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return parser.parse_args(argv)


class _Progress:
    """A tqdm bar over input bytes, opened on the first update so that errors
    found before any work print cleanly; silent without a terminal or tqdm."""

    def __init__(self, total_bytes: int) -> None:
        self.total, self.bar, self.last = total_bytes, None, 0

    def __call__(self, documents: int, tokens: int, bytes_read: int) -> None:
        if self.bar is None:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=self.total, unit="B", unit_scale=True, desc="tokenizing",
                            file=sys.stderr, disable=None, leave=False)
        self.bar.update(bytes_read - self.last)
        self.last = bytes_read
        if documents % 256 == 0:
            self.bar.set_postfix(docs=documents, tokens=tokens, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    total = sum(Path(p).stat().st_size for p in args.input if Path(p).is_file())
    progress = _Progress(total)
    try:
        info = build_binidx(args.input, args.output, text_key=args.text_key,
                            overwrite=args.overwrite, progress=progress)
    except UserError as exc:
        progress.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    progress.close()
    print(f"wrote {strip_suffix(args.output)}.bin/.idx/.json: {info['num_documents']} documents, "
          f"{info['num_tokens']} tokens ({info['dtype']})")
    for ctx_len in CTX_LENS:
        try:
            print(f"ctx_len {ctx_len}: magic_prime {magic_prime(info['num_tokens'], ctx_len)}")
        except UserError:
            print(f"ctx_len {ctx_len}: too few tokens for magic-prime sampling "
                  f"(needs at least {3 * ctx_len})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
