"""Sample text from a checkpoint in RNN mode (the state is carried token by token).

    python scripts/generate.py --checkpoint out/demo/rwkv-final.pth --prompt "def main(" --max-tokens 100
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import rwkv_train  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rwkv_train.errors import UserError
from rwkv_train.evaluate import generate
from rwkv_train.models import model_from_weights
from rwkv_train.tokenizer import WorldTokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="weights-only rwkv-*.pth")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-tokens", type=int, default=200, help="tokens to generate at most")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 for greedy decoding")
    parser.add_argument("--top-p", type=float, default=0.85, help="nucleus sampling mass, in (0, 1]")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 < args.top_p <= 1 or args.temperature < 0 or args.max_tokens < 0:
        parser.error("need 0 < --top-p <= 1, --temperature >= 0 and --max-tokens >= 0")
    try:
        model = model_from_weights(args.checkpoint)
        tokenizer = WorldTokenizer()
        ids = generate(model, tokenizer.encode(args.prompt), args.max_tokens, args.temperature, args.top_p, args.seed)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(args.prompt + tokenizer.decode(ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
