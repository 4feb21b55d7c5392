"""scripts/block_traffic.py: what a compiled RWKV-7 block keeps for its backward, and its fused kernels' bytes."""

from __future__ import annotations

import importlib.util
import sys

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
    """Per token, y (one bf16 C-value) and the chunk start states (C N / 16 bf16 values: N / 16 C-values)."""
    C, N = 128, 32
    selective = block_traffic.measure(C, N, tokens=32, grad_cp="selective")
    keeping_wkv = block_traffic.measure(C, N, tokens=32, grad_cp="selective-wkv")
    assert keeping_wkv["kept"] - selective["kept"] == 1 + N / 16


def test_bad_sizes_are_refused():
    result = run_cli("scripts/block_traffic.py", "--n-embd", "100", "--head-size", "64")
    assert result.returncode == 2 and "multiple of --head-size" in result.stderr
