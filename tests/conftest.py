"""Shared fixtures: deterministic seeds, tiny corpora and configs, the real command-line tools."""

from __future__ import annotations

import collections
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from rwkv_train.data.binidx import BinIdxWriter

REPO = Path(__file__).resolve().parent.parent


def pytest_addoption(parser):
    parser.addoption("--kernel-errors", type=Path, default=REPO / "out" / "kernel_errors.csv", metavar="CSV",
                     help="where the GPU kernel tests write every measured error (CSV), with the largest per "
                          "kernel and quantity beside it as a markdown table (.md); default out/kernel_errors.csv")


@pytest.fixture(autouse=True)
def _reset_state():
    """Every test starts from the same seeds and default dtype."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    torch.set_default_dtype(torch.float32)
    yield


def write_corpus(prefix: Path, num_tokens: int, vocab: int = 256, seed: int = 0, docs: int = 8) -> Path:
    """A binidx corpus of learnable token sequences (a noisy periodic pattern) in `docs` documents."""
    rng = np.random.default_rng(seed)
    base = np.arange(num_tokens) % 17 + 1
    noise = rng.integers(1, vocab, num_tokens)
    tokens = np.where(rng.random(num_tokens) < 0.1, noise, base).astype(np.uint16)
    with BinIdxWriter(prefix, np.uint16) as writer:
        for chunk in np.array_split(tokens, docs):
            writer.add_document(chunk)
    return prefix


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus", 20_000)


def tiny_config(tmp_path: Path, corpus: Path, **sections) -> Path:
    """A YAML config for a 2-layer, 64-wide model on `corpus`; `sections` update it ({"train": {...}})."""
    cfg = {
        "model": {"version": "v7", "n_layer": 2, "n_embd": 64, "head_size": 32, "vocab_size": 256},
        "data": {"train": str(corpus), "ctx_len": 32},
        "train": {"micro_bsz": 2, "max_steps": 6, "precision": "fp32", "accelerator": "cpu", "devices": 1,
                  "out_dir": str(tmp_path / "run"), "seed": 1},
        "optim": {"lr_init": 3e-3, "lr_final": 3e-4, "warmup_steps": 2},
        "logging": {"wandb": "off", "log_every": 1},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def zero_filled_shapes(backward) -> list[list[int]]:
    """The shapes of the tensors zero-filled (zeros, zeros_like, fill_, zero_) while backward() runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        backward()
    fills = ("aten::zeros", "aten::zeros_like", "aten::fill_", "aten::zero_")
    return [list(e.input_shapes[0]) for e in prof.events() if e.name in fills and e.input_shapes]


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; the absolute ||out - ref|| where the reference is exactly zero."""
    out, ref = out.double(), ref.detach().double()
    scale, diff = ref.norm().item(), (out - ref).norm().item()
    return diff / scale if scale > 0 else diff


def assert_errors_within(errors: dict[str, float], tol: float, worst: dict[str, float]) -> None:
    """Each named relative error at most tol (NaN fails: an element never written), the largest per name
    kept in `worst` for a summary."""
    for name, err in errors.items():
        worst[name] = max(worst.get(name, 0.0), err)
    too_far = {name: f"{err:.2e}" for name, err in errors.items() if not err <= tol}
    assert not too_far, f"relative error above {tol} (NaN: an element never written): {too_far}"


def error_summary_fixture(title: str, worst: dict[str, float]):
    """A module-scoped autouse fixture that prints `worst` (quantity -> largest relative error, filled by
    assert_errors_within) after the module's tests: shown with pytest -s."""

    @pytest.fixture(scope="module", autouse=True)
    def error_summary():
        yield
        if worst:
            print(f"\n{title}, largest relative error: " + ", ".join(f"{k} {e:.1e}" for k, e in worst.items()))

    return error_summary


def model_gradient_errors(model, reference, idx: torch.Tensor) -> tuple[list[float], tuple[float, str], float]:
    """One next-token loss and backward through `model` and through `reference` (the same weights, in
    float64): (their losses, (the largest relative error of one parameter's gradient, its name), the
    relative error of all gradients together)."""
    losses = []
    for m in (model, reference):
        logits, _ = m(idx)
        vocab = logits.shape[-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab).double(), idx.roll(-1, 1).reshape(-1))
        loss.backward()
        losses.append(loss.item())
    pairs = [(name, p.grad, q.grad) for (name, p), q in zip(model.named_parameters(), reference.parameters())
             if q.grad is not None]
    worst = max((rel_error(ours, theirs), name) for name, ours, theirs in pairs if theirs.norm() > 0)
    overall = rel_error(torch.cat([ours.flatten().double() for _, ours, _ in pairs]),
                        torch.cat([theirs.flatten() for _, _, theirs in pairs]))
    return losses, worst, overall


def run_cli(*args: str, cwd: Path = REPO, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a project script (path relative to the repo) with this interpreter; capture its output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=full_env)


class _CountingModule:
    """A loaded kernel module whose `forward` and `backward` calls are counted; the rest passes through."""

    def __init__(self, module, calls: collections.Counter):
        self._module, self._calls = module, calls

    def __getattr__(self, name):
        attr = getattr(self._module, name)
        if name not in ("forward", "backward"):
            return attr

        def counted(*args):
            self._calls[name] += 1
            return attr(*args)

        return counted


def count_kernel_calls(monkeypatch) -> collections.Counter:
    """Counts the forward and backward runs of every module `kernels.load` returns from now on (the real
    kernels, or an emulation a fixture put in its place). A call answered from a cache runs nothing."""
    from rwkv_train.ops import kernels

    calls: collections.Counter = collections.Counter()
    load = kernels.load
    monkeypatch.setattr(kernels, "load", lambda *args, **kwargs: _CountingModule(load(*args, **kwargs), calls))
    return calls
