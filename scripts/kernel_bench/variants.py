"""Each variant's inputs and call: one function per variant returns (a forward returning y, the leaves
whose gradients the backward computes)."""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kernel_bench.jobs import V7_DECAY_SCALE, Shape
from kernel_bench.reference import _RwkvLm4, _RwkvLm5, _RwkvLm6, _RwkvLm7


def make_inputs(generation: str, shape: Shape, seed: int, device: str) -> dict[str, Tensor]:
    """Random inputs shaped like the model's, never zeros; bf16 where the models hand bf16 over.

    v7: r, k, v ~ N(0, 1) * scale; z ~ N(0, 1) the decay pre-activation, lw = -e^-0.5 sigmoid(z) in
        (-0.61, 0); kk unit-normalised per head, a = -kk, b = kk * sigmoid(N(0, 1)).
    v6: lw = -exp(x), x ~ N(-1, 0.5) clipped to [-2.5, 0.5]; u ~ N(0, 0.5) [H, N].
    v5: one log-decay per channel, lw = -exp(x), x ~ U(-6, -1) (the init's range) [H, N]; u as v6.
    v4: time_decay ~ U(-5, 3) (the init's range), w = -exp(time_decay); u ~ N(-1.2, 0.5); k, v ~ N(0, 1).
    dy ~ N(0, 1) is the gradient of y.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    B, T, C, H, N = shape.B, shape.T, shape.C, shape.H, shape.N
    bf16 = torch.bfloat16

    def normal(*size: int, mean: float = 0.0, std: float = 1.0) -> Tensor:
        return torch.randn(*size, generator=gen, device=device).mul_(std).add_(mean)

    def uniform(*size: int, low: float, high: float) -> Tensor:
        return torch.rand(*size, generator=gen, device=device).mul_(high - low).add_(low)

    x: dict[str, Tensor] = {"dy": normal(B, T, C).to(bf16)}
    if generation == "v4":
        x["k"], x["v"] = normal(B, T, C).to(bf16), normal(B, T, C).to(bf16)
        x["time_decay"] = uniform(C, low=-5.0, high=3.0).to(bf16)
        x["u"] = normal(C, mean=-1.2, std=0.5).to(bf16)
        return x
    x["r"], x["k"] = normal(B, T, H, N, std=0.5).to(bf16), normal(B, T, H, N, std=0.5).to(bf16)
    x["v"] = normal(B, T, H, N).to(bf16)
    if generation == "v7":
        x["z"] = normal(B, T, H, N).to(bf16)
        x["lw"] = -V7_DECAY_SCALE * torch.sigmoid(x["z"].float())
        kk = F.normalize(normal(B, T, H, N), dim=-1)
        x["a"], x["b"] = (-kk).to(bf16), (kk * torch.sigmoid(normal(B, T, H, N))).to(bf16)
        return x
    x["u"] = normal(H, N, std=0.5).to(bf16)
    if generation == "v6":
        x["x"] = normal(B, T, H, N, mean=-1.0, std=0.5).clamp_(-2.5, 0.5).to(bf16)
    else:
        x["x"] = uniform(H, N, low=-6.0, high=-1.0).to(bf16)
    x["lw"] = -torch.exp(x["x"].float())
    return x


Prepared = tuple[Callable[[], Tensor], list[Tensor]]


def _leaves(x: dict[str, Tensor], *names: str) -> list[Tensor]:
    """Fresh autograd leaves sharing the inputs' storage."""
    return [x[n].detach().requires_grad_() for n in names]


def _leaf(t: Tensor) -> Tensor:
    return t.detach().requires_grad_()


def _v4_ours(x: dict[str, Tensor], backend: str) -> Prepared:
    w, u = _leaf(-torch.exp(x["time_decay"].float())), _leaf(x["u"].float())
    k, v = _leaves(x, "k", "v")
    if backend == "cuda":
        from rwkv_train.ops.wkv4_cuda import wkv4_cuda

        return (lambda: wkv4_cuda(w, u, k, v)[0]), [w, u, k, v]
    from rwkv_train.ops.wkv4 import wkv4

    return (lambda: wkv4(w, u, k, v, backend="torch")[0]), [w, u, k, v]


def _diag_ours(x: dict[str, Tensor], generation: str, backend: str) -> Prepared:
    r, k, v = _leaves(x, "r", "k", "v")
    lw, u = _leaf(x["lw"]), _leaf(x["u"].float())
    if backend in ("cuda", "cuda-chunked"):
        from rwkv_train.ops import wkv_diag_cuda

        fn, chunked = getattr(wkv_diag_cuda, f"wkv{generation[1]}_cuda"), backend == "cuda-chunked"
        return (lambda: fn(r, lw, k, v, u, chunked=chunked)[0]), [r, lw, k, v, u]
    from rwkv_train.ops import wkv_diag

    fn = getattr(wkv_diag, f"wkv{generation[1]}")
    return (lambda: fn(r, lw, k, v, u, backend="torch")[0]), [r, lw, k, v, u]


def _v7_ours(x: dict[str, Tensor], backend: str) -> Prepared:
    r, lw, k, v, a, b = _leaves(x, "r", "lw", "k", "v", "a", "b")
    if backend == "cuda-chunked":
        from rwkv_train.ops.wkv7_chunked_cuda import wkv7_chunked_cuda

        return (lambda: wkv7_chunked_cuda(r, lw, k, v, a, b)[0]), [r, lw, k, v, a, b]
    if backend == "cuda":
        from rwkv_train.ops.wkv7_cuda import wkv7_cuda

        return (lambda: wkv7_cuda(r, lw, k, v, a, b)[0]), [r, lw, k, v, a, b]
    from rwkv_train.ops.wkv7 import wkv7

    return (lambda: wkv7(r, lw, k, v, a, b, backend="torch")[0]), [r, lw, k, v, a, b]


def _v4_rwkvlm(x: dict[str, Tensor], ext: Any) -> Prepared:
    time_decay, u, k, v = _leaves(x, "time_decay", "u", "k", "v")  # all bf16, as in a bf16 run
    return (lambda: _RwkvLm4.apply(ext, time_decay, u, k, v)), [time_decay, u, k, v]


def _v5_rwkvlm(x: dict[str, Tensor], ext: Any) -> Prepared:
    r, k, v, time_decay, u = _leaves(x, "r", "k", "v", "x", "u")  # x is time_decay here
    return (lambda: _RwkvLm5.apply(ext, r, k, v, time_decay, u)), [r, k, v, time_decay, u]


def _v6_rwkvlm(x: dict[str, Tensor], ops: Any) -> Prepared:
    r, k, v, w, u = _leaves(x, "r", "k", "v", "x", "u")  # decay exp(-exp(x)), x in bf16 as the trainer's w
    return (lambda: _RwkvLm6.apply(ops, r, k, v, w, u)), [r, k, v, w, u]


def _v7_rwkvlm_clampw(x: dict[str, Tensor], ops: Any) -> Prepared:
    # The clampw kernels take the decay's pre-activation z and apply exp(-e^-0.5 sigmoid(z)) themselves.
    r, z, k, v, a, b = _leaves(x, "r", "z", "k", "v", "a", "b")
    return (lambda: _RwkvLm7.apply(ops, False, r, z, k, v, a, b)), [r, z, k, v, a, b]


def _v7_rwkvlm_wkv7(x: dict[str, Tensor], ops: Any) -> Prepared:
    # wkv7_cuda takes w with decay exp(-exp(w)): w = log(-lw) = -softplus(-z) - 0.5, in bf16 as its trainer's.
    w = _leaf(torch.log(-x["lw"]).to(torch.bfloat16))
    r, k, v, a, b = _leaves(x, "r", "k", "v", "a", "b")
    return (lambda: _RwkvLm7.apply(ops, True, r, w, k, v, a, b)), [r, w, k, v, a, b]


_FLA_STUBBED = False


def _fla(module: str) -> Any:
    """Import an fla.ops module, leaving fla's model zoo out if that is what fails to import.

    fla/__init__ also imports fla.layers and fla.models, which need a recent transformers; the ops do
    not. If the import fails, those two are marked absent (fla's __init__ skips a missing one) and the
    ops are imported alone.
    """
    global _FLA_STUBBED
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name in ("fla", "fla.ops"):
            raise ModuleNotFoundError("fla is not installed (pip install flash-linear-attention)") from exc
        if _FLA_STUBBED:
            raise
    except ImportError:
        if _FLA_STUBBED:
            raise
    for name in [m for m in sys.modules if m == "fla" or m.startswith("fla.")]:
        del sys.modules[name]
    sys.modules["fla.layers"] = None  # type: ignore[assignment]
    sys.modules["fla.models"] = None  # type: ignore[assignment]
    _FLA_STUBBED = True
    return importlib.import_module(module)


def _supported(fn: Callable, **kwargs: Any) -> dict[str, Any]:
    """The keyword arguments this fla version's function accepts (older versions lack some)."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def _v4_fla(x: dict[str, Tensor]) -> Prepared:
    rwkv4 = _fla("fla.ops.rwkv4").fused_recurrent_rwkv4  # takes time_decay, does -exp itself
    time_decay, u, k, v = _leaves(x, "time_decay", "u", "k", "v")
    B, _, C = k.shape
    state = torch.zeros(B, 3, 1, C, dtype=k.dtype, device=k.device)  # (alpha, beta, eps): the empty state
    state[:, 2] = -1e38
    return (lambda: rwkv4(time_decay, u, k, v, state)[0]), [time_decay, u, k, v]


def _diag_fla(x: dict[str, Tensor], generation: str) -> Prepared:
    chunk_rwkv6 = _fla("fla.ops.rwkv6").chunk_rwkv6
    r, k, v, u = _leaves(x, "r", "k", "v", "u")
    lw = _leaf(x["lw"].to(torch.bfloat16))  # fla's RWKV-6 layer hands over w = -exp(.) in the model dtype
    if generation == "v6":
        return (lambda: chunk_rwkv6(r, k, v, lw, u, scale=1.0)[0]), [r, k, v, lw, u]
    # RWKV-5 is RWKV-6 with a decay that does not depend on t: broadcast it (its gradient sums back).
    return (lambda: chunk_rwkv6(r, k, v, lw.expand(r.shape), u, scale=1.0)[0]), [r, k, v, lw, u]


def _v7_fla(x: dict[str, Tensor]) -> Prepared:
    chunk_rwkv7 = _fla("fla.ops.rwkv7").chunk_rwkv7
    r, k, v, a, b = _leaves(x, "r", "k", "v", "a", "b")
    w = _leaf(x["lw"].to(torch.bfloat16))  # log-decay, state layout [K, V]
    # As fla's RWKV-7 layer calls it: the decay bound licenses its tensor-core path and 64-step chunks.
    extra = _supported(chunk_rwkv7, safe_gate=True, lower_bound=-V7_DECAY_SCALE, chunk_size=64)
    return (lambda: chunk_rwkv7(r, w, k, v, a, b, scale=1.0, **extra)[0]), [r, w, k, v, a, b]


PREPARE: dict[str, Callable[[dict[str, Tensor], Any], Prepared]] = {
    "v4:ours-cuda": lambda x, _: _v4_ours(x, "cuda"),
    "v4:ours-torch": lambda x, _: _v4_ours(x, "torch"),
    "v4:rwkvlm": _v4_rwkvlm,
    "v4:fla": lambda x, _: _v4_fla(x),
    "v5:ours-cuda": lambda x, _: _diag_ours(x, "v5", "cuda"),
    "v5:ours-torch": lambda x, _: _diag_ours(x, "v5", "torch"),
    "v5:ours-cuda-chunked": lambda x, _: _diag_ours(x, "v5", "cuda-chunked"),
    "v5:rwkvlm": _v5_rwkvlm,
    "v5:fla": lambda x, _: _diag_fla(x, "v5"),
    "v6:ours-cuda": lambda x, _: _diag_ours(x, "v6", "cuda"),
    "v6:ours-torch": lambda x, _: _diag_ours(x, "v6", "torch"),
    "v6:ours-cuda-chunked": lambda x, _: _diag_ours(x, "v6", "cuda-chunked"),
    "v6:rwkvlm": _v6_rwkvlm,
    "v6:fla": lambda x, _: _diag_fla(x, "v6"),
    "v7:ours-cuda": lambda x, _: _v7_ours(x, "cuda"),
    "v7:ours-cuda-chunked": lambda x, _: _v7_ours(x, "cuda-chunked"),
    "v7:ours-torch": lambda x, _: _v7_ours(x, "torch"),
    "v7:rwkvlm-clampw": _v7_rwkvlm_clampw,
    "v7:rwkvlm-clampw-v3": _v7_rwkvlm_clampw,
    "v7:rwkvlm-clampw-v3-alt": _v7_rwkvlm_clampw,
    "v7:rwkvlm-wkv7": _v7_rwkvlm_wkv7,
    "v7:fla": lambda x, _: _v7_fla(x),
}
