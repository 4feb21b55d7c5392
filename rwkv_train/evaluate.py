"""Scoring and sampling with a trained model: windowed loss, and RNN-mode generation."""

from __future__ import annotations

import math

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
