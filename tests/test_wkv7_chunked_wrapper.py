"""The chunked WKV-7 op's Python side, on the CPU: custom ops, autograd, model plumbing.

`kernels.load("v7-chunked", N)` is pointed at the CPU emulation of cuda/wkv7_chunked.cu (the real
kernel code, tests/cuda_on_cpu.py), so the op wrapper (`rwkv_train.ops.wkv7_chunked_cuda`), its
saved chunk states and gradients, and a whole RWKV-7 model with `wkv7_chunked: true` are checked
against float64 references without a GPU.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from rwkv_train.config import ModelConfig
from rwkv_train.models import build_model
from rwkv_train.ops import kernels
from rwkv_train.ops.wkv7 import wkv7_recurrent
from rwkv_train.ops.wkv7_chunked_cuda import CHUNK_LEN, LOG_DECAY_MIN, value_split, wkv7_chunked_cuda
from tests import cuda_on_cpu
from tests.conftest import count_kernel_calls, model_gradient_errors, zero_filled_shapes
from tests.test_wkv7_chunked_emulated import TOL, model_like_inputs, rel_error

pytestmark = pytest.mark.skipif(cuda_on_cpu.compiler_problem() is not None, reason=str(cuda_on_cpu.compiler_problem()))


@pytest.fixture
def emulated(monkeypatch):
    """kernels.load("v7-chunked", N) returns the CPU emulation; records which kernels were asked for."""
    return cuda_on_cpu.emulate(monkeypatch, "v7-chunked", cuda_on_cpu.Wkv7ChunkedModule)


def test_python_constants_match_the_kernel(emulated):
    module = kernels.load("v7-chunked", 64)
    assert (module.chunk_len, module.log_decay_min) == (CHUNK_LEN, LOG_DECAY_MIN)


@pytest.mark.parametrize("split", [0, 2], ids=["own-choice", "split2"])
@pytest.mark.parametrize("uses", ["y and state", "y only", "state only"])
def test_op_gradients_match_float64_autograd(emulated, uses, split):
    """Through the custom ops and their autograd: a loss of y, of the final state, or of both; with the
    op's choice of blocks per head (one, off CUDA) and with each head split over two."""
    B, T, H, N = 2, 37, 2, 32
    inputs = model_like_inputs(B, T, H, N, seed=21)
    s0 = 0.5 * torch.randn(B, H, N, N, generator=torch.Generator().manual_seed(22))
    g = torch.Generator().manual_seed(23)
    wy, ws = torch.randn(B, T, H, N, generator=g), torch.randn(B, H, N, N, generator=g)

    def loss(y, s):
        return (y.double() * wy).sum() * (uses != "state only") + (s.double() * ws).sum() * (uses != "y only")

    leaves = [x.float().clone().requires_grad_() for x in (*inputs, s0)]  # the wrapper casts to the kernel's dtypes
    with kernels.poisoned_outputs():
        y, s = wkv7_chunked_cuda(*leaves, split=split)
        loss(y, s).backward()
    ref = [x.detach().double().requires_grad_() for x in (*inputs, s0)]
    y_ref, s_ref = wkv7_recurrent(*ref)
    loss(y_ref, s_ref).backward()

    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert rel_error(y, y_ref) < TOL and rel_error(s, s_ref) < TOL
    for name, got, want in zip(["r", "lw", "k", "v", "a", "b", "state"], leaves, ref):
        err = rel_error(got.grad, want.grad)
        assert err < TOL, f"d{name}: relative error {err:.2e}"
    assert set(emulated) == {("v7-chunked", N)}


def test_value_split_gives_every_multiprocessor_a_block_with_the_fewest_blocks_per_head():
    splits = [1, 2, 4]
    assert value_split(512, splits, 132) == 1  # B=8, H=64 on an H100: one block per head already fills it
    assert value_split(132, splits, 132) == 1
    assert value_split(64, splits, 132) == 4  # B=1, H=64: 128 blocks would leave 4 idle, so 256
    assert value_split(66, splits, 132) == 2
    assert value_split(32, splits, 132) == 4 and value_split(1, splits, 132) == 4  # as many as there are
    assert value_split(1, [1, 2], 132) == 2  # head size 32: no split 4
    assert value_split(1, [1], 132) == 1


def test_an_unsupported_split_is_refused_by_the_op(emulated):
    inputs = model_like_inputs(1, 5, 1, 32, seed=5)
    with pytest.raises(ValueError, match="split 4 is not one of"):
        wkv7_chunked_cuda(*inputs, split=4)  # head size 32: 8 value rows per block is not a whole 16-row tile


def test_backward_fills_no_gradient_for_the_saved_states(emulated):
    """The forward's third and fourth outputs (the chunk start states, [B, H, T/16, N, N], and sa,
    [B, T, H, N]) are saved for the backward and never differentiated: autograd must not zero-fill a
    gradient for them (at B*T*C = 2^27 that is 1 GB written per step for the states). Only the unused
    final state's small gradient is made."""
    B, T, H, N = 1, 40, 2, 32
    leaves = [x.clone().requires_grad_() for x in model_like_inputs(B, T, H, N, seed=41)]
    y, _ = wkv7_chunked_cuda(*leaves)
    filled = zero_filled_shapes(lambda: y.float().sum().backward())
    states_shape = [B, H, math.ceil(T / CHUNK_LEN), N, N]
    assert states_shape not in filled, f"a zero gradient was made for the saved states: {filled}"
    assert [B, T, H, N] not in filled, f"a zero gradient was made for sa: {filled}"
    assert all(x.grad is not None for x in leaves)


def test_views_that_start_unaligned_give_the_same_result(emulated):
    """Views of every input, the state and dy that start unaligned are copied to aligned ones."""
    inputs = model_like_inputs(1, 20, 2, 32, seed=51)
    ops = torch.ops.rwkv_train
    cuda_on_cpu.assert_unaligned_views_change_nothing(ops.wkv7_chunked_forward, ops.wkv7_chunked_backward, inputs)


def test_state_carried_across_calls_equals_one_call(emulated):
    """Chunked BPTT: two calls with the state handed over give one call's outputs (T split mid-chunk)."""
    inputs = model_like_inputs(1, 45, 2, 32, seed=31)
    y_all, s_all = wkv7_chunked_cuda(*inputs)
    y1, s1 = wkv7_chunked_cuda(*(x[:, :21].contiguous() for x in inputs))
    y2, s2 = wkv7_chunked_cuda(*(x[:, 21:].contiguous() for x in inputs), state=s1)
    assert rel_error(torch.cat([y1, y2], 1), y_all) < 1e-2
    assert rel_error(s2, s_all) < 1e-2


def chunked_model(monkeypatch, n_layer: int):
    """An RWKV-7 with kernel cuda and `wkv7_chunked: true` whose WKV runs on the emulation (CPU tensors
    count as the chunked kernel's), its weights perturbed to reach the zero-initialised paths."""
    real_use_cuda = kernels.use_cuda
    monkeypatch.setattr(kernels, "use_cuda", lambda kernel, gen, x, n=None: gen == "v7-chunked" or real_use_cuda(kernel, gen, x, n))
    cfg = ModelConfig(version="v7", n_layer=n_layer, n_embd=64, head_size=32, vocab_size=61, kernel="cuda", wkv7_chunked=True)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return cfg, model


def test_model_with_the_chunked_kernel_matches_the_torch_backend(emulated, monkeypatch):
    """A 2-layer RWKV-7 with `wkv7_chunked: true` and kernel cuda, run on the emulation: loss and every
    parameter gradient against the same model on the PyTorch backend (float64).

    The WKV's bf16 operands set the accuracy: over all gradients together the relative error is 0.2% to
    0.6% for most inputs. One parameter's gradient alone can be a sum of terms that mostly cancel, so its
    relative error is larger (the same code gives 0.7% to 2.4% worst per parameter over input seeds 0, 1,
    3 to 7); the per-parameter bound is there to catch a gradient that is wrong, not rounded."""
    cfg, model = chunked_model(monkeypatch, n_layer=2)
    reference = build_model(dataclasses.replace(cfg, kernel="torch", wkv7_chunked=False))
    reference.load_state_dict(model.state_dict())
    reference.double()

    idx = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(1))
    losses, worst, overall = model_gradient_errors(model, reference, idx)
    assert emulated and all(call == ("v7-chunked", 32) for call in emulated)
    assert math.isclose(losses[0], losses[1], rel_tol=2e-3), losses
    assert worst[0] < 5e-2, f"largest relative gradient error {worst[0]:.2e} in {worst[1]}"
    assert overall < 1e-2



def test_compiled_blocks_trace_around_the_chunked_ops(emulated, monkeypatch):
    """compile_blocks (train.compile) with the chunked kernel: dynamo and AOTAutograd take the custom ops
    through their fake implementations and registered autograd, under gradient checkpointing, without a
    graph break; loss and gradients equal the eager run's."""
    from torch._dynamo.utils import counters

    _, eager = chunked_model(monkeypatch, n_layer=3)
    eager.train()
    eager.grad_cp = True
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks(backend="aot_eager")
    idx, targets = torch.randint(0, 61, (2, 2, 40), generator=torch.Generator().manual_seed(1))

    torch._dynamo.reset()
    counters.clear()
    results = []
    for m in (eager, compiled):
        loss = m.loss(idx, targets)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters()}))
    assert counters["stats"]["unique_graphs"] == 2  # layer 0 and layers 1..2, each one graph: no break
    assert emulated and all(call == ("v7-chunked", 32) for call in emulated)
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=0)
    for name, g in results[0][1].items():
        assert rel_error(results[1][1][name], g) < 1e-5, name


@pytest.mark.parametrize("backend", [None, "aot_eager"], ids=["eager", "compiled"])
def test_selective_wkv_runs_the_kernel_forward_once_with_the_same_gradients(emulated, monkeypatch, backend):
    """grad_cp "selective-wkv" keeps the WKV kernel's outputs, so its forward runs once per block and step
    where full and selective checkpointing run it again in the backward; loss and every gradient equal
    those of the run without checkpointing (the kernel is deterministic, so only the recomputed
    elementwise work's rounding can differ). Eager, and compiled (aot_eager: the traced graphs run by
    eager PyTorch, so the count is of the partitioned backward)."""
    n_layer = 2
    calls = count_kernel_calls(monkeypatch)
    _, base = chunked_model(monkeypatch, n_layer=n_layer)
    base.train()
    idx, targets = torch.randint(0, 61, (2, 2, 40), generator=torch.Generator().manual_seed(1))
    results = {}
    for mode in (False, True, "selective", "selective-wkv"):
        model = copy.deepcopy(base)
        model.grad_cp = mode
        if backend:
            torch._dynamo.reset()
            model.compile_blocks(backend=backend)
        calls.clear()
        loss = model.loss(idx, targets)
        loss.backward()
        results[mode] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()}, dict(calls))
    runs = {mode: got[2] for mode, got in results.items()}
    assert runs[False] == runs["selective-wkv"] == {"forward": n_layer, "backward": n_layer}, runs
    assert runs[True] == runs["selective"] == {"forward": 2 * n_layer, "backward": n_layer}, runs
    loss, grads, _ = results[False]
    for mode in (True, "selective", "selective-wkv"):
        torch.testing.assert_close(results[mode][0], loss, rtol=1e-6, atol=0)
        for name, g in grads.items():
            assert rel_error(results[mode][1][name], g) < 1e-5, (mode, name)


def test_selective_wkv_keeps_the_kernel_outputs_and_nothing_else_more(emulated, monkeypatch):
    """What the blocks' forward leaves for the backward under "selective-wkv" is what "selective" leaves
    plus, per block, the kernel's four outputs: y (bf16), the final state (float32), the chunk start
    states (bf16, one per CHUNK_LEN tokens) and sa (bf16, one value per channel and token)."""
    from tests.test_checkpointing import saved_by_forward

    cfg, model = chunked_model(monkeypatch, n_layer=2)
    model.train()
    B, T = 2, 40
    idx = torch.randint(0, 61, (B, T), generator=torch.Generator().manual_seed(1))
    saved = {}
    for mode in ("selective", "selective-wkv"):
        model.grad_cp = mode
        saved[mode] = saved_by_forward(model, idx)
    H, N = cfg.n_embd // cfg.head_size, cfg.head_size
    outputs = 2 * (B * T * cfg.n_embd * 2) + B * H * N * N * 4 + B * H * -(-T // CHUNK_LEN) * N * N * 2
    assert saved["selective-wkv"] - saved["selective"] == cfg.n_layer * outputs
