"""scripts/block_traffic.py: what a compiled RWKV-7 block keeps for its backward, and its fused kernels' bytes."""

from __future__ import annotations

import importlib.util
import sys

import torch

from tests.conftest import REPO, run_cli

_spec = importlib.util.spec_from_file_location("block_traffic", REPO / "scripts" / "block_traffic.py")
block_traffic = importlib.util.module_from_spec(_spec)
sys.modules["block_traffic"] = block_traffic
_spec.loader.exec_module(block_traffic)


def test_full_checkpointing_keeps_nothing_and_no_checkpointing_keeps_at_least_what_the_wkv_saves():
    C, N = 128, 32
    full = block_traffic.measure(C, N, tokens=32, grad_cp=True)
    none = block_traffic.measure(C, N, tokens=32, grad_cp=False)
    assert full["kept"] == 0  # only the block's input, which is not counted
    # the WKV op alone keeps r, k, v, a, b (bf16), lw (float32: 2 C-values) and a state per 16 steps per head
    # (H N^2 / 16 bf16 values per token = C N / 16)
    assert none["kept"] >= 5 + 2 + N / 16
    for got in (full, none):
        assert got["forward"] and got["backward"] and all(share > 0 for share, _ in got["forward"] + got["backward"])
    # the checkpointed forward runs again inside the backward
    assert sum(s for s, _ in full["backward"]) > sum(s for s, _ in none["backward"])


def test_selective_wkv_keeps_the_wkv_outputs_beside_what_selective_keeps():
    """Per token, y and sa (a bf16 C-value each) and the chunk start states (C N / 16 bf16 values: N / 16
    C-values)."""
    C, N = 128, 32
    selective = block_traffic.measure(C, N, tokens=32, grad_cp="selective")
    keeping_wkv = block_traffic.measure(C, N, tokens=32, grad_cp="selective-wkv")
    assert keeping_wkv["kept"] - selective["kept"] == 2 + N / 16


def test_bad_sizes_are_refused():
    result = run_cli("scripts/block_traffic.py", "--n-embd", "100", "--head-size", "64")
    assert result.returncode == 2 and "multiple of --head-size" in result.stderr


def backward_traffic(mix, n_mix=6, C=128, T=32) -> float:
    """C-values per token that the compiled backward of LayerNorm -> n_mix token mixes -> products moves."""
    from rwkv_train.compiling import compile_fn

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    norm = torch.nn.LayerNorm(C).to(torch.bfloat16)
    mus = [torch.rand(1, 1, C, generator=g).to(torch.bfloat16).requires_grad_() for _ in range(n_mix)]
    weights = [torch.randn(C, C, generator=g).to(torch.bfloat16) for _ in range(n_mix)]
    x = torch.randn(1, T, C, generator=g).to(torch.bfloat16).requires_grad_()
    run = compile_fn(lambda x: sum(o @ w for o, w in zip(mix(norm(x), mus), weights)))
    _, backward = block_traffic.kernel_bytes(run, x)
    return sum(n for _, n in backward) / (T * C * 2)


def test_token_mix_backward_moves_less_than_autograds_for_the_same_expression():
    """The six lerps of an RWKV-7 block: autograd sums mu_i g_i into a buffer and shifts it; token_mix does not."""
    from rwkv_train.ops.token_mix import token_mix, token_shift

    def by_autograd(x, mus):
        xx = token_shift(x, None) - x
        return [x + xx * mu for mu in mus]

    plain = backward_traffic(by_autograd)
    ours = backward_traffic(lambda x, mus: token_mix(x, None, *mus))
    assert ours <= plain - 4, (ours, plain)
