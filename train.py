"""Train an RWKV model:  python train.py --config configs/demo.yaml [section.key=value ...]"""

from __future__ import annotations

import argparse
import logging
import sys

from rwkv_train.config import all_keys, load_config
from rwkv_train.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Train an RWKV language model from a YAML config.",
        epilog="Overrides are dotted words, e.g. train.max_steps=50 optim.lr_init=1e-3. Keys: " + ", ".join(all_keys()),
    )
    parser.add_argument("--config", required=True, help="YAML config file, e.g. configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value words that replace config values")
    args = parser.parse_args(argv)
    log = logging.getLogger("rwkv_train")  # our one logger; Lightning keeps its own
    log.addHandler(logging.StreamHandler())
    log.setLevel(logging.INFO)
    try:
        cfg = load_config(args.config, args.overrides)
        from rwkv_train.trainer import run  # heavy imports only once the config is known to be good

        out_dir = run(cfg)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"done: checkpoints, metrics.csv, loss.png and config.yaml are in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
