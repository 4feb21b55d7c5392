"""Scoring and sampling with a trained model: windowed loss, and RNN-mode generation."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from rwkv_train.data.binidx import BinIdx
from rwkv_train.data.windows import ValWindows


@torch.no_grad()
def windowed_loss(model: nn.Module, data: BinIdx, ctx_len: int, max_tokens: int, batch: int = 4) -> dict:
    """Mean loss over consecutive windows tokens[jL : jL+L+1], each from a zero state."""
    windows = ValWindows(data, ctx_len, max_tokens)
    total, count = 0.0, 0
    for start in range(0, len(windows), batch):
        pairs = [windows[i] for i in range(start, min(start + batch, len(windows)))]
        idx = torch.stack([p[0] for p in pairs])
        targets = torch.stack([p[1] for p in pairs])
        logits = model(idx)[0]
        total += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += targets.numel()
    loss = total / count
    return {"loss": round(loss, 6), "perplexity": round(math.exp(loss), 4), "tokens": count, "ctx_len": ctx_len}


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True)
    keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p  # always keeps the top token
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
    return int(order[choice])


@torch.no_grad()
def generate(model: nn.Module, prompt_ids: list[int], max_new: int, temperature: float = 1.0,
             top_p: float = 0.85, seed: int = 0, stop_id: int | None = 0) -> list[int]:
    """Read the prompt in one pass, then sample one token at a time carrying the state (RNN mode)."""
    generator = torch.Generator().manual_seed(seed)
    logits, state = model(torch.tensor([prompt_ids or [0]]))
    out: list[int] = []
    for _ in range(max_new):
        token = sample_token(logits[0, -1], temperature, top_p, generator)
        if token == stop_id:
            break
        out.append(token)
        logits, state = model(torch.tensor([[token]]), state)
    return out


def long_documents(data: BinIdx, length: int, max_docs: int) -> list[int]:
    """Indices of the first `max_docs` documents with at least length + 1 tokens."""
    lengths = data.document_lengths()
    return [int(d) for d in np.flatnonzero(lengths >= length + 1)[:max_docs]]


@torch.no_grad()
def loss_by_position(model: nn.Module, data: BinIdx, docs: list[int], length: int, chunk: int,
                     batch: int = 4) -> tuple[np.ndarray, int]:
    """Mean loss at each position 0..length-1 over the starts of `docs`, read `chunk` tokens at a time
    with the state carried (memory stays flat for any length). Returns (mean loss per position, docs used)."""
    sums = np.zeros(length, dtype=np.float64)
    for first in range(0, len(docs), batch):
        tokens = np.stack([data.document(d)[: length + 1] for d in docs[first : first + batch]])
        tokens = torch.from_numpy(tokens.astype(np.int64))
        state = None
        for start in range(0, length, chunk):
            stop = min(start + chunk, length)
            logits, state = model(tokens[:, start:stop], state)
            loss = F.cross_entropy(logits.float().transpose(1, 2), tokens[:, start + 1 : stop + 1], reduction="none")
            sums[start:stop] += loss.sum(0).double().numpy()
    return sums / len(docs), len(docs)


def write_position_curve(mean: np.ndarray, prefix: str) -> tuple[str, str]:
    """PREFIX.csv (position, mean_loss) and PREFIX.png (loss against position, log-scaled axis)."""
    csv_path, png_path = f"{prefix}.csv", f"{prefix}.png"
    with open(csv_path, "w") as f:
        f.write("position,mean_loss\n")
        f.writelines(f"{i},{v:.6f}\n" for i, v in enumerate(mean))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # average over log-spaced buckets so the long tail reads as a curve, not noise
    edges = np.unique(np.geomspace(1, len(mean), num=min(64, len(mean))).astype(int))
    centers = [(a + b - 1) / 2 for a, b in zip(np.r_[0, edges[:-1]], edges)]
    values = [mean[a:b].mean() for a, b in zip(np.r_[0, edges[:-1]], edges)]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(centers, values, marker=".")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("token position in document")
    ax.set_ylabel("mean loss (nats/token)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return csv_path, png_path
