"""Loss and perplexity of a checkpoint on a binidx corpus, printed as one JSON line.

    python scripts/eval.py --checkpoint out/demo/rwkv-final.pth --data data/demo/val --ctx-len 256

The token stream is cut into consecutive windows tokens[jL : jL+L+1], each scored from a zero state.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    import rwkv_train  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rwkv_train.data.binidx import BinIdx
from rwkv_train.data.windows import check_vocab
from rwkv_train.errors import UserError
from rwkv_train.evaluate import windowed_loss
from rwkv_train.models import model_from_weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="weights-only rwkv-*.pth")
    parser.add_argument("--data", required=True, help="binidx prefix (PREFIX.bin / PREFIX.idx)")
    parser.add_argument("--ctx-len", type=int, default=512, help="window length (default 512)")
    parser.add_argument("--max-tokens", type=int, default=1 << 20, help="score at most this many tokens")
    parser.add_argument("--batch", type=int, default=4, help="windows per forward pass")
    args = parser.parse_args(argv)
    if args.ctx_len < 1 or args.max_tokens < 1 or args.batch < 1:
        parser.error("--ctx-len, --max-tokens and --batch must be positive")
    try:
        model = model_from_weights(args.checkpoint)
        data = BinIdx(args.data)
        check_vocab(data, model.dims.vocab_size, f"corpus {args.data}")
        result = windowed_loss(model, data, args.ctx_len, args.max_tokens, args.batch)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"checkpoint": args.checkpoint, "data": args.data, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
