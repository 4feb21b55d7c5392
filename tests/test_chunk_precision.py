"""scripts/chunk_precision.py: its simulated chunked RWKV-7 forward, and the precision findings the
kernel's design rests on (cuda/NOTES.md, versions 9 and 10)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.conftest import REPO, run_cli

_spec = importlib.util.spec_from_file_location("chunk_precision", REPO / "scripts" / "chunk_precision.py")
precision = importlib.util.module_from_spec(_spec)
sys.modules["chunk_precision"] = precision
_spec.loader.exec_module(precision)


def test_without_rounding_every_chunked_form_is_the_recurrence(monkeypatch):
    """With bf16 and float32 rounding taken out, each way of forming x and y is exact algebra of the
    token-by-token recurrence: the simulation models the kernel's chunk math, not something near it."""
    monkeypatch.setattr(precision, "bf16", lambda x: x)
    monkeypatch.setattr(precision, "f32", lambda x: x)
    for mode, (y_err, s_err) in precision.errors(T=64, N=32, seed=5).items():
        assert y_err < 1e-12 and s_err < 1e-12, f"{mode}: y {y_err:.1e}, state {s_err:.1e}"


@pytest.mark.parametrize("T,N,seed", [(128, 32, 1), (256, 64, 2)])
def test_two_bf16_parts_of_m_keep_y_as_precise_as_the_float32_recurrence(T, N, seed):
    """y's product with M_r in bf16 alone is clearly worse than the float32 recurrence; with M_r as two
    bf16 parts it is as good, and the tensor-core solve for x keeps both y and the state there."""
    errors = precision.errors(T, N, seed)
    y_rec, s_rec = errors["recurrence"]
    assert errors["y, M in bf16"][0] > 1.15 * y_rec
    assert errors["y, M hi + lo"][0] < 1.03 * y_rec
    assert errors["solve, T"][0] < 1.05 * y_rec and errors["solve, T"][1] < 1.05 * s_rec
    assert all(y < 1e-2 and s < 1e-2 for y, s in errors.values())  # the kernel tests' tolerance


def test_prints_one_table_and_refuses_a_length_that_is_not_whole_chunks():
    proc = run_cli("scripts/chunk_precision.py", "--T", "64", "--head-size", "32")
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "e-" in line]
    assert [row.split("|")[1].strip() for row in rows] == list(precision.MODES)
    bad = run_cli("scripts/chunk_precision.py", "--T", "100")
    assert bad.returncode == 2 and "--T must be a positive multiple of 16, got 100" in bad.stderr
