"""CPU throughput of every RWKV generation at the demo size: training and RNN-mode generation.

    python scripts/bench_generations_cpu.py [--layers 4 --width 128 --batch 8 --ctx 256 --steps 3]

Training: tokens/s of forward + backward + AdamW step on random tokens (the fused head loss, fp32).
Generation: tokens/s of one-token RNN steps with the state carried (batch 1).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

try:
    import rwkv_train  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rwkv_train.config import ModelConfig
from rwkv_train.models import build_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--gen-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, L{args.layers} D{args.width} "
          f"V{args.vocab}, train B={args.batch} T={args.ctx}")
    print(f"{'generation':>10} {'params':>12} {'train tok/s':>12} {'RNN gen tok/s':>14}")
    for version in ("v4", "v5", "v6", "v7"):
        cfg = ModelConfig(version=version, n_layer=args.layers, n_embd=args.width, head_size=64, vocab_size=args.vocab)
        model = build_model(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        idx = torch.randint(0, args.vocab, (args.batch, args.ctx + 1))
        times = []
        for _ in range(args.steps + 1):  # the first step warms up
            start = time.perf_counter()
            model.loss(idx[:, :-1], idx[:, 1:]).backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - start)
        train = args.batch * args.ctx / min(times[1:])
        model.eval()
        with torch.no_grad():
            logits, state = model(idx[:1, :8])
            token = idx[:1, 8:9]
            start = time.perf_counter()
            for _ in range(args.gen_tokens):
                logits, state = model(token, state)
                token = logits[:, -1:].argmax(-1)
            gen = args.gen_tokens / (time.perf_counter() - start)
        params = sum(p.numel() for p in model.parameters())
        print(f"{version:>10} {params:>12,} {train:>12.0f} {gen:>14.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
