"""torch.compile with the settings the RWKV blocks train correctly under.

Compiling fuses the elementwise work between the matrix products and the WKV kernel (token shift,
the lerps, the low-rank decay and gates, the norms): the largest share of an eager training step.

Inductor's mix-order reduction is turned off. It fuses a norm's reduction over channels with the
reduction over tokens that forms a [1, 1, C] parameter's gradient into one backward kernel, and on
torch 2.10 and 2.11 it gave that gradient the shape [C] at training sizes (RWKV-7 1.5B at 4096 tokens
x 16: "CompiledFunctionBackward returned an invalid gradient at index 32 - got [2048] but expected
[1, 1, 2048]"; pytorch/pytorch#178080) and could write wrong gradients silently (pytorch/pytorch#193061).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

BACKENDS = ("inductor", "aot_eager", "eager")


def inductor_options() -> dict[str, Any]:
    """Inductor settings for the blocks; only those this torch version knows."""
    import torch._inductor.config as inductor_config

    return {"triton.mix_order_reduction": False} if hasattr(inductor_config.triton, "mix_order_reduction") else {}


def compile_fn(fn: Callable, backend: str = "inductor", autotune: bool = False) -> Callable:
    """torch.compile(fn) with inductor_options() when the backend is inductor.

    `backend`: "inductor" (fused kernels), "aot_eager" (traced forward and backward run by eager
    PyTorch: checks the capture without code generation) or "eager" (capture only).
    `autotune`: inductor's max_autotune, which times its own matrix-product kernels against the
    library's for each shape, with the neighbouring elementwise work fused into them (a GPU's
    compile then takes minutes longer).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown compile backend {backend!r}; valid choices: {', '.join(BACKENDS)}")
    if autotune and backend != "inductor":
        raise ValueError(f"autotune is an inductor setting; the {backend!r} backend has none")
    options = inductor_options() if backend == "inductor" else {}
    if autotune:
        options["max_autotune"] = True
    return torch.compile(fn, backend=backend, options=options or None)
