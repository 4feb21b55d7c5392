"""The CUDA WKV kernels against the float64 PyTorch recurrences (GPU only; skipped with a reason elsewhere).

For every generation (v4; v5, v6 and v7 at head sizes 64 and 128) the CUDA op's output, final
state and every gradient (each input and the initial state, from random output and final-state
cotangents) are compared with the token-by-token reference run in float64 on the GPU, on the same
bf16-rounded inputs, by relative error ||out - ref|| / ||ref||. Each kernel call runs under
`kernels.poisoned_outputs()`, so an output element a kernel never writes comes out NaN and fails.
The measured errors go to out/kernel_errors.csv, and their maxima are printed at the end of the
session (visible with `pytest -s`).

Also here: bitwise determinism, the v7 op inside torch.compile(fullgraph=True), a model training
step with model.kernel=cuda against model.kernel=torch, and compute-sanitizer's memcheck over every
kernel (scripts/sanitize_kernels.py). The first run builds the kernels (about a minute each); later
runs load them from torch's extension cache.
"""

from __future__ import annotations

import copy
import csv
import functools
import math
import subprocess
import sys
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from rwkv_train.config import ModelConfig
from rwkv_train.models import build_model
from rwkv_train.ops import kernels
from rwkv_train.ops.wkv4 import wkv4_recurrent
from rwkv_train.ops.wkv4_cuda import wkv4_cuda
from rwkv_train.ops.wkv7 import wkv7_recurrent
from rwkv_train.ops.wkv7_cuda import wkv7_cuda
from rwkv_train.ops.wkv_diag import wkv_diag_recurrent
from rwkv_train.ops.wkv7_chunked_cuda import wkv7_chunked_cuda
from rwkv_train.ops.wkv_diag_cuda import wkv5_cuda, wkv6_cuda
from tests.conftest import REPO, count_kernel_calls, rel_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the WKV kernels run on the GPU"),
]

B, H = 2, 2
V4_CHANNELS = 100  # v4 has no heads; C % 8 != 0 takes the kernel's element-by-element loads
# C % 8 == 0 moves whole 16-byte pieces; 136 = 128 + 8 also leaves the second 128-channel tile partial
V4_VECTOR_CHANNELS = 136
TOL = 1e-2  # relative error for values that pass through bf16 (every kernel's inputs and y are bf16)
CONFIGS = [("v4", None), ("v5", 64), ("v5", 128), ("v6", 64), ("v6", 128), ("v7", 64), ("v7", 128),
           ("v7-chunked", 32), ("v7-chunked", 64), ("v5-chunked", 64), ("v6-chunked", 32), ("v6-chunked", 64)]
KERNEL_OF = {"v5-chunked": "v6-chunked"}  # a tested generation run on another's build: RWKV-5 on the v5/v6 one
# (T, with initial state): short and odd lengths cover partial chunks inside the kernels; 1000 the long run.
CASES = [(1, False), (1, True), (7, True), (16, False), (33, True), (200, False), (200, True), (1000, True)]


def require_kernel(generation: str, head_size: int | None) -> None:
    """Skip, with the loader's reason, when this kernel cannot be built or run here."""
    reason = kernels.unavailable_reason(KERNEL_OF.get(generation, generation), head_size)
    if reason is not None:
        pytest.skip(f"{generation} CUDA kernel unavailable: {reason}")


# --- inputs shaped and scaled like the models produce them -------------------------------------------


@dataclass
class Problem:
    """One generation's op on concrete inputs: the CUDA op, its float64 reference, and their inputs.

    `inputs` are what the CUDA op is given (bf16 where the kernel reads bf16, so the rounding happens
    before both ops see them); the last `n_state` of them are the initial state. Both callables take
    the inputs (the state entries None without a state) and return a flat list of outputs.
    """

    names: list[str]
    inputs: list[Tensor]
    n_state: int
    output_names: list[str]
    kernel: Callable[..., list[Tensor]]
    reference: Callable[..., list[Tensor]]


def _randn(g: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _to(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.to(dtype).cuda()


def make_problem(generation: str, head_size: int | None, T: int, seed: int, channels: int = V4_CHANNELS,
                 split: int = 0) -> Problem:
    """Fresh random inputs for one generation (never zeros), at realistic magnitudes; `channels` is v4's C,
    `split` the chunked kernel's blocks per head (0: its own choice)."""
    g = torch.Generator().manual_seed(seed)
    bf, f32 = torch.bfloat16, torch.float32
    if generation == "v4":
        C = channels
        w = -torch.exp(torch.rand(C, generator=g, dtype=torch.float64) * 8 - 5)  # time_decay in [-5, 3], as at init
        u = math.log(0.3) + 0.5 * _randn(g, C)  # time_first
        k = (2 * _randn(g, B, T, C)).clamp(-5, 5)  # |k| up to ~5: exercises the running maximum
        v = _randn(g, B, T, C)
        pp0 = 2 * _randn(g, B, C)
        bb0 = 1 + 3 * torch.rand(B, C, generator=g, dtype=torch.float64)  # >= 1: the largest term counts 1
        aa0 = bb0 * 0.5 * _randn(g, B, C).clamp(-3, 3)  # aa / bb is a weighted mean of past v
        inputs = [_to(w, f32), _to(u, f32), _to(k, bf), _to(v, bf), _to(aa0, f32), _to(bb0, f32), _to(pp0, f32)]

        def kernel(w, u, k, v, aa, bb, pp):
            y, state = wkv4_cuda(w, u, k, v, None if aa is None else (aa, bb, pp))
            return [y, *state]

        def reference(w, u, k, v, aa, bb, pp):
            y, state = wkv4_recurrent(w, u, k, v, None if aa is None else (aa, bb, pp))
            return [y, *state]

        return Problem(["w", "u", "k", "v", "aa0", "bb0", "pp0"], inputs, 3, ["y", "aa", "bb", "pp"], kernel, reference)

    N = head_size
    r, k, v = _randn(g, B, T, H, N), _randn(g, B, T, H, N), _randn(g, B, T, H, N)
    state = _randn(g, B, H, N, N)
    if generation in ("v7", "v7-chunked"):
        lw = -math.exp(-0.5) * torch.sigmoid(_randn(g, B, T, H, N))  # in (-0.61, 0), as the model makes it
        kk = F.normalize(_randn(g, B, T, H, N), dim=-1)  # unit norm per head
        a, b = -kk, kk * torch.sigmoid(_randn(g, B, T, H, N))  # b = kk * in-context learning rate
        inputs = [_to(x, bf) for x in (r, k, v, a, b)]
        inputs = [inputs[0], _to(lw, f32), *inputs[1:], _to(state, f32)]

        op = functools.partial(wkv7_chunked_cuda, split=split) if generation == "v7-chunked" else wkv7_cuda

        def kernel(r, lw, k, v, a, b, s):
            return list(op(r, lw, k, v, a, b, s))

        def reference(r, lw, k, v, a, b, s):
            return list(wkv7_recurrent(r, lw, k, v, a, b, s))

        return Problem(["r", "lw", "k", "v", "a", "b", "state"], inputs, 1, ["y", "state"], kernel, reference)

    u = 0.5 * _randn(g, H, N)  # time_faaaa, the current token's bonus
    chunked = generation.endswith("-chunked")  # the tensor-core kernel (lw >= -8 per step, as drawn here)
    if generation.startswith("v6"):  # data-dependent decay: lw = -exp(time_decay + lora(x)) per token
        lw = -torch.exp((_randn(g, B, T, H, N) - 1).clamp(-8, 2))
        cuda_op = functools.partial(wkv6_cuda, chunked=chunked, **({"split": split} if chunked else {}))
    else:  # v5: one decay per channel for all steps
        lw = -torch.exp((1.5 * _randn(g, H, N) - 2.5).clamp(-8, 2))
        cuda_op = functools.partial(wkv5_cuda, chunked=chunked, **({"split": split} if chunked else {}))
    inputs = [_to(r, bf), _to(lw, f32), _to(k, bf), _to(v, bf), _to(u, f32), _to(state, f32)]

    def kernel(r, lw, k, v, u, s):
        return list(cuda_op(r, lw, k, v, u, s))

    def reference(r, lw, k, v, u, s):
        return list(wkv_diag_recurrent(r, lw.expand_as(r), k, v, u, s))

    return Problem(["r", "lw", "k", "v", "u", "state"], inputs, 1, ["y", "state"], kernel, reference)


def seed_of(*parts) -> int:
    """A per-test seed: every test draws its own inputs, reproducibly."""
    return zlib.crc32(repr(parts).encode())


def run(fn: Callable[..., list[Tensor]], inputs: Sequence[Tensor], n_state: int, with_state: bool,
        seed: int, unaligned: bool = False) -> tuple[list[Tensor], list[Tensor | None]]:
    """Outputs, and the gradients w.r.t. every input (the state's only if given) of sum_i <out_i, c_i>.

    The cotangents c_i are random, drawn from `seed` and rounded to bf16 (which every output dtype holds
    exactly), so two runs with one seed, the kernel and its reference, back-propagate the same values.
    With `unaligned`, fn gets each input as a view starting one element into a buffer (not 16-byte
    aligned), and the gradients are the buffers' at those places.
    """
    leaves = [(torch.cat([x.new_zeros(1), x.flatten()]) if unaligned else x.detach().clone()).requires_grad_()
              for x in inputs]
    args = [leaf[1:].view_as(x) if unaligned else leaf for leaf, x in zip(leaves, inputs)]
    n = len(leaves) if with_state else len(leaves) - n_state
    outputs = fn(*args[:n], *[None] * (len(leaves) - n))
    g = torch.Generator().manual_seed(seed)
    cotangents = [_randn(g, *o.shape).to(torch.bfloat16).to(device=o.device, dtype=o.dtype) for o in outputs]
    grads = torch.autograd.grad(outputs, leaves[:n], cotangents, allow_unused=True)
    if unaligned:
        grads = [None if gr is None else gr[1:].view_as(x) for gr, x in zip(grads, inputs)]
    return [o.detach() for o in outputs], list(grads)


# --- the measured errors: a table at the end of the session, and a CSV --------------------------------


@pytest.fixture(scope="session")
def error_log(request):
    """Collects (generation, head size, T, state, quantity, error); written and printed when the session ends."""
    rows: list[dict] = []
    yield rows
    if rows:
        print(write_errors(rows, request.config.getoption("--kernel-errors")))


def write_errors(rows: list[dict], path: Path) -> str:
    """Every measured error to the CSV `path`, the largest per kernel and quantity as a markdown table beside it
    (.md); returns that table as text."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    worst: dict[tuple, dict] = {}
    for row in rows:
        key = (row["generation"], row["head_size"], row["quantity"])
        if key not in worst or row["rel_error"] > worst[key]["rel_error"]:
            worst[key] = row
    table = [f"CUDA kernels against the float64 reference: the largest relative error over T and initial "
             f"state (tolerance {TOL:g}; every measurement in {path.name})", "",
             "| kernel | head | quantity | max rel error | at |", "|---|---:|---|---:|---|"]
    lines = [f"\nCUDA kernels vs float64 reference: largest relative error over T and state (tolerance {TOL:g})",
             f"{'gen':<4} {'head':>4}  {'quantity':<9} {'max rel err':>11}  at"]
    for (gen, head, quantity), row in worst.items():
        where = f"T={row['T']}{', initial state' if row['initial_state'] else ''}"
        table.append(f"| {gen} | {head} | {quantity} | {row['rel_error']:.2e} | {where} |")
        lines.append(f"{gen:<4} {head:>4}  {quantity:<9} {row['rel_error']:>11.2e}  {where}")
    path.with_suffix(".md").write_text("\n".join(table) + "\n")
    lines.append(f"(every measurement: {path})")
    return "\n".join(lines)


# --- values and gradients against the reference -------------------------------------------------------


@pytest.mark.parametrize("T,with_state", CASES, ids=[f"T{t}-{'state' if s else 'zero'}" for t, s in CASES])
@pytest.mark.parametrize("generation,head_size", CONFIGS, ids=[f"{g}-h{h}" if h else g for g, h in CONFIGS])
def test_kernel_matches_float64_reference(generation, head_size, T, with_state, error_log):
    compare_with_reference(generation, head_size, T, with_state, error_log)


@pytest.mark.parametrize("T,with_state", [(7, True), (200, False), (1000, True)])
def test_v4_kernel_with_whole_row_moves_matches_reference(T, with_state, error_log):
    """v4 with C % 8 == 0: chunks move 16 bytes per thread, and a partial channel tile is masked."""
    compare_with_reference("v4", None, T, with_state, error_log, channels=V4_VECTOR_CHANNELS)


# (head size, blocks per head) of the chunked kernel, each forced: the tests above take the op's own choice
# (at their B * H = 4, the most blocks per head where clusters exist)
SPLITS = [(32, 1), (32, 2), (64, 1), (64, 2), (64, 4)]


def require_clusters() -> None:
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("split heads run as thread block clusters: compute capability 9.0 or later")


@pytest.mark.parametrize("T,with_state", [(1, True), (33, True), (200, False), (1000, True)])
@pytest.mark.parametrize("head_size,split", SPLITS, ids=[f"h{h}-split{s}" for h, s in SPLITS])
def test_chunked_kernel_per_split_matches_float64_reference(head_size, split, T, with_state, error_log):
    """Each head's value rows over `split` blocks, the key-side gradients summed across the cluster."""
    if split > 1:
        require_clusters()
    compare_with_reference("v7-chunked", head_size, T, with_state, error_log, split=split)


@pytest.mark.parametrize("T,with_state", [(1, True), (33, True), (200, False), (1000, True)])
@pytest.mark.parametrize("generation", ["v5-chunked", "v6-chunked"])
@pytest.mark.parametrize("head_size,split", SPLITS, ids=[f"h{n}-split{s}" for n, s in SPLITS])
def test_chunked_diagonal_kernel_per_split_matches_float64_reference(head_size, split, generation, T, with_state,
                                                                     error_log):
    """Each head's value columns over `split` blocks, the key-side gradients summed across the cluster."""
    if split > 1:
        require_clusters()
    compare_with_reference(generation, head_size, T, with_state, error_log, split=split)


def compare_with_reference(generation, head_size, T, with_state, error_log, channels=V4_CHANNELS, split=0):
    require_kernel(generation, head_size)
    seed = seed_of(generation, head_size, T, with_state, channels)
    problem = make_problem(generation, head_size, T, seed, channels, split)
    with kernels.poisoned_outputs():  # forward and backward: every output buffer starts as NaN
        outs, grads = run(problem.kernel, problem.inputs, problem.n_state, with_state, seed + 1)
    ref_inputs = [x.double() for x in problem.inputs]  # exactly the values the kernel saw
    ref_outs, ref_grads = run(problem.reference, ref_inputs, problem.n_state, with_state, seed + 1)

    measured = list(zip(problem.output_names, outs, ref_outs))
    measured += [(f"d_{n}", gr, ref) for n, gr, ref in zip(problem.names, grads, ref_grads)]
    problems = []
    for quantity, out, ref in measured:
        if out is None:
            problems.append(f"{quantity}: no gradient (every input and the initial state must get one)")
            continue
        if torch.isnan(out).any():
            problems.append(f"{quantity}: {int(torch.isnan(out).sum())} NaN of {out.numel()} (elements never written?)")
            continue
        assert out.shape == ref.shape, f"{quantity}: shape {tuple(out.shape)}, reference {tuple(ref.shape)}"
        err = rel_error(out, ref)
        label = f"{generation}/{split}" if split else generation
        error_log.append({"generation": label, "head_size": head_size or "-", "T": T,
                          "initial_state": with_state, "quantity": quantity, "rel_error": err})
        if not err <= TOL:
            problems.append(f"{quantity}: relative error {err:.3e} > {TOL:g}")
    assert not problems, f"{generation} head {head_size} split {split} T={T} state={with_state}:\n  " + "\n  ".join(problems)


DETERMINISM = [("v4", None, 0), ("v5", 64, 0), ("v6", 64, 0), ("v7", 64, 0), ("v7-chunked", 64, 1),
               ("v7-chunked", 64, 4), ("v6-chunked", 64, 0)]


@pytest.mark.parametrize("generation,head_size,split", DETERMINISM,
                         ids=[f"{g}-split{s}" if s else g for g, _, s in DETERMINISM])
def test_kernel_is_deterministic(generation, head_size, split):
    """The same inputs twice give bitwise the same outputs and gradients (no atomics-order noise; split
    heads add the cluster's partial sums in a fixed order)."""
    require_kernel(generation, head_size)
    if split > 1:
        require_clusters()
    problem = make_problem(generation, head_size, 200, seed_of("determinism", generation), split=split)
    with kernels.poisoned_outputs():  # an unwritten element is NaN, and NaN != NaN
        first = run(problem.kernel, problem.inputs, problem.n_state, True, seed=1)
        second = run(problem.kernel, problem.inputs, problem.n_state, True, seed=1)
    for name, x, y in zip(problem.output_names + [f"d_{n}" for n in problem.names], [*first[0], *first[1]],
                          [*second[0], *second[1]]):
        assert torch.equal(x, y), f"{generation}: {name} differs between two identical calls"


@pytest.mark.parametrize("generation", ["v7-chunked", "v6-chunked", "v5-chunked"])
def test_chunked_kernels_take_views_that_start_unaligned(generation):
    """The chunked kernels move their tensors 16 bytes at a time; views that start one element into a
    buffer are copied to aligned ones by the ops, so every output and gradient is bitwise the same."""
    require_kernel(generation, 64)
    problem = make_problem(generation, 64, 37, seed_of("unaligned", generation))
    want = run(problem.kernel, problem.inputs, problem.n_state, True, seed=1)
    got = run(problem.kernel, problem.inputs, problem.n_state, True, seed=1, unaligned=True)
    for name, x, y in zip(problem.output_names + [f"d_{n}" for n in problem.names], [*got[0], *got[1]],
                          [*want[0], *want[1]]):
        assert torch.equal(x, y), f"{generation}: {name} differs with unaligned inputs"


# --- integration: torch.compile and the model ---------------------------------------------------------


@pytest.mark.parametrize("generation", ["v7", "v7-chunked"])
def test_wkv7_cuda_inside_torch_compile_matches_eager(generation):
    """The op is a real custom op: fullgraph compilation keeps it whole, and forward and backward agree with eager."""
    require_kernel(generation, 64)
    problem = make_problem(generation, 64, 48, seed_of("compile"))
    op = wkv7_chunked_cuda if generation == "v7-chunked" else wkv7_cuda

    def step(r, lw, k, v, a, b, s):
        y, s_out = op(r, lw, k, v, a, b, s)
        return y.float() * 0.5 + 1.0, s_out * 2.0  # some surrounding ops for inductor to fuse

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    with kernels.poisoned_outputs():
        eager_out, eager_grads = run(lambda *x: list(step(*x)), problem.inputs, 1, True, seed=2)
        comp_out, comp_grads = run(lambda *x: list(compiled(*x)), problem.inputs, 1, True, seed=2)
    for name, x, y in zip(["y", "state"] + [f"d_{n}" for n in problem.names], [*comp_out, *comp_grads],
                          [*eager_out, *eager_grads]):
        torch.testing.assert_close(x, y, msg=lambda m, name=name: f"compiled vs eager, {name}: {m}")


def _trained_looking(model: torch.nn.Module, seed: int) -> None:
    """Perturb every parameter, so paths that start at zero (output, ffn.value, low-rank *1) carry signal."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, device="cuda", dtype=p.dtype) * 0.1)


@pytest.mark.parametrize("version,chunked", [("v7", False), ("v7", True), ("v6", True)],
                         ids=["sequential", "chunked", "v6-chunked"])
def test_model_trains_a_step_with_the_cuda_kernel(version, chunked):
    """A tiny v7 model (and v6 on its chunked kernel): model.kernel=cuda gives a finite loss, and the loss and
    gradients of model.kernel=torch."""
    require_kernel(f"{version}-chunked" if chunked else version, 64)
    dims = dict(version=version, n_layer=2, n_embd=128, head_size=64, vocab_size=256)
    start = build_model(ModelConfig(**dims, kernel="torch"), device="cuda")
    _trained_looking(start, seed=3)
    weights = {k: v.clone() for k, v in start.state_dict().items()}
    tokens = torch.randint(0, 256, (2, 65), device="cuda", generator=torch.Generator(device="cuda").manual_seed(4))
    idx, targets = tokens[:, :-1], tokens[:, 1:]

    results = {}
    for kernel in ("torch", "cuda"):
        model = build_model(ModelConfig(**dims, kernel=kernel, wkv7_chunked=chunked, wkv_diag_chunked=chunked),
                            device="cuda", init=False)
        model.load_state_dict(weights)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        with kernels.poisoned_outputs():
            with torch.autocast("cuda", dtype=torch.bfloat16):  # as precision=bf16 trains
                loss = model.loss(idx, targets)
            loss.backward()
            grad = torch.cat([p.grad.flatten().float() for p in model.parameters()])
            optimizer.step()
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                after = model.loss(idx, targets)
        results[kernel] = (loss.item(), after.item(), grad)

    (loss_t, after_t, grad_t), (loss_c, after_c, grad_c) = results["torch"], results["cuda"]
    assert math.isfinite(loss_c) and math.isfinite(after_c), f"model.kernel=cuda: loss {loss_c}, after a step {after_c}"
    assert torch.isfinite(grad_c).all(), "model.kernel=cuda: non-finite gradients"
    assert abs(loss_c - loss_t) <= 1e-2 * max(1.0, abs(loss_t)), f"loss: cuda {loss_c:.5f} vs torch {loss_t:.5f}"
    assert abs(after_c - after_t) <= 1e-2 * max(1.0, abs(after_t)), f"after a step: {after_c:.5f} vs {after_t:.5f}"
    grad_err = rel_error(grad_c, grad_t)
    assert grad_err <= 2e-2, f"gradient: relative difference {grad_err:.3e} between model.kernel=cuda and torch"


MODEL_KERNELS = [("v4", False), ("v5", False), ("v6", False), ("v7", False), ("v7", True)]


@pytest.mark.parametrize("version,chunked", MODEL_KERNELS, ids=["v4", "v5", "v6", "v7", "v7-chunked"])
def test_selective_wkv_checkpointing_runs_the_kernel_forward_once(version, chunked, monkeypatch):
    """grad_cp selective-wkv keeps each CUDA kernel's outputs: its forward runs once per block, where full
    checkpointing runs it again in the backward, and loss and gradients are those without checkpointing."""
    generation = "v7-chunked" if chunked else version
    require_kernel(generation, None if version == "v4" else 64)
    dims = dict(version=version, n_layer=2, n_embd=128, head_size=64, vocab_size=256)
    start = build_model(ModelConfig(**dims, kernel="cuda", wkv7_chunked=chunked), device="cuda")
    _trained_looking(start, seed=5)
    tokens = torch.randint(0, 256, (2, 65), device="cuda", generator=torch.Generator(device="cuda").manual_seed(6))
    calls = count_kernel_calls(monkeypatch)

    results = {}
    for mode in (False, True, "selective-wkv"):
        model = copy.deepcopy(start)
        model.train()
        model.grad_cp = mode
        calls.clear()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        results[mode] = (loss.item(), torch.cat([p.grad.flatten().float() for p in model.parameters()]), calls["forward"])
    assert [results[m][2] for m in (False, True, "selective-wkv")] == [2, 4, 2]
    for mode in (True, "selective-wkv"):
        assert results[mode][0] == pytest.approx(results[False][0], rel=1e-6)
        assert rel_error(results[mode][1], results[False][1]) < 1e-4, mode


# --- memory safety ------------------------------------------------------------------------------------


def _compute_sanitizer() -> str | None:
    return kernels.cuda_tool("compute-sanitizer")


@pytest.mark.skipif(_compute_sanitizer() is None,
                    reason="compute-sanitizer not found on PATH or in $CUDA_HOME/bin (it ships with the CUDA toolkit)")
def test_kernels_pass_compute_sanitizer_memcheck():
    """No out-of-bounds or misaligned access in any kernel, forward or backward (scripts/sanitize_kernels.py)."""
    for generation in ("v4", "v5", "v6", "v7", "v7-chunked", "v6-chunked"):
        require_kernel(generation, None if generation == "v4" else 64)
    cmd = [_compute_sanitizer(), "--tool", "memcheck", "--error-exitcode", "1",
           sys.executable, str(REPO / "scripts" / "sanitize_kernels.py")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"memcheck failed (exit {proc.returncode}):\n{output[-6000:]}"
    assert "ERROR SUMMARY: 0 errors" in output, output[-6000:]
