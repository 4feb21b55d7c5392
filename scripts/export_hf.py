"""Export an RWKV-4 checkpoint as a Hugging Face transformers RwkvForCausalLM directory.

    python scripts/export_hf.py --checkpoint out/demo/rwkv-final.pth --output hf/rwkv4-demo
    python scripts/export_hf.py --checkpoint rwkv.pth --output DIR --dtype bf16 --context-length 4096

The directory (config.json, model.safetensors) loads with RwkvForCausalLM.from_pretrained(DIR).
Only RWKV-4 checkpoints can be exported: transformers has no RWKV-5/6/7 model.
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

from rwkv_train.errors import UserError
from rwkv_train.export_hf import DTYPES, export_hf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="weights-only RWKV-4 rwkv-*.pth")
    parser.add_argument("--output", required=True, help="directory to write (config.json, model.safetensors)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="weights dtype (default: the checkpoint's)")
    parser.add_argument("--context-length", type=int, default=None,
                        help="config context_length (default: data.ctx_len of the run's config.yaml, else 1024)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output directory")
    args = parser.parse_args(argv)
    try:
        config = export_hf(args.checkpoint, args.output, args.context_length, args.dtype, args.overwrite)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sizes = {k: config[k] for k in ("num_hidden_layers", "hidden_size", "vocab_size", "context_length", "dtype")}
    print(json.dumps({"checkpoint": args.checkpoint, "output": args.output, **sizes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
