"""Loss and perplexity of a checkpoint on a binidx corpus, printed as one JSON line.

    python scripts/eval.py --checkpoint out/demo/rwkv-final.pth --data data/demo/val --ctx-len 256
    python scripts/eval.py --checkpoint rwkv.pth --data data/books --by-position --ctx-len 16384 --out curve

The token stream is cut into consecutive windows tokens[jL : jL+L+1], each scored from a zero state.
With --by-position, the first ctx_len + 1 tokens of each document at least that long are read in
chunks with the state carried, and the mean loss at every position is written to OUT.csv and OUT.png.
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
from rwkv_train.errors import DataError, UserError
from rwkv_train.evaluate import long_documents, loss_by_position, windowed_loss, write_position_curve
from rwkv_train.models import model_from_weights


def by_position(model, data: BinIdx, args) -> dict:
    docs = long_documents(data, args.ctx_len, args.max_docs)
    if not docs:
        longest = int(data.document_lengths().max()) if data.num_documents else 0
        raise DataError(
            f"no document in {args.data} has ctx_len + 1 = {args.ctx_len + 1} tokens (the longest has {longest}): "
            "lower --ctx-len or use a corpus of longer documents"
        )
    mean, used = loss_by_position(model, data, docs, args.ctx_len, args.chunk, args.batch)
    csv_path, png_path = write_position_curve(mean, args.out)
    return {"loss": round(float(mean.mean()), 6), "documents": used, "positions": args.ctx_len,
            "first_64": round(float(mean[:64].mean()), 6), "last_64": round(float(mean[-64:].mean()), 6),
            "csv": csv_path, "png": png_path}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="weights-only rwkv-*.pth")
    parser.add_argument("--data", required=True, help="binidx prefix (PREFIX.bin / PREFIX.idx)")
    parser.add_argument("--ctx-len", type=int, default=512, help="window length (default 512)")
    parser.add_argument("--max-tokens", type=int, default=1 << 20, help="score at most this many tokens")
    parser.add_argument("--batch", type=int, default=4, help="windows per forward pass")
    parser.add_argument("--by-position", action="store_true", help="mean loss per token position over documents")
    parser.add_argument("--chunk", type=int, default=1024, help="with --by-position: tokens per forward pass")
    parser.add_argument("--max-docs", type=int, default=64, help="with --by-position: documents to average")
    parser.add_argument("--out", default="loss_by_position", help="with --by-position: OUT.csv and OUT.png")
    args = parser.parse_args(argv)
    if min(args.ctx_len, args.max_tokens, args.batch, args.chunk, args.max_docs) < 1:
        parser.error("--ctx-len, --max-tokens, --batch, --chunk and --max-docs must be positive")
    try:
        model = model_from_weights(args.checkpoint)
        data = BinIdx(args.data)
        check_vocab(data, model.dims.vocab_size, f"corpus {args.data}")
        if args.by_position:
            result = by_position(model, data, args)
        else:
            result = windowed_loss(model, data, args.ctx_len, args.max_tokens, args.batch)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"checkpoint": args.checkpoint, "data": args.data, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
