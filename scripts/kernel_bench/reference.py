"""BlinkDL/RWKV-LM's training kernels: their sources, flags and names as its trainers build them, and
autograd wrappers that call them as its trainers do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kernel_bench.jobs import REF_V7_CHUNK, BuildSpec, Shape, Variant

# The trainers' nvcc flags: RWKV-v4neo/src/model.py (bf16), RWKV-v5/src/model.py (x052, x060, x070) and
# RWKV-v7/train_temp/src/model.py; each kernel adds its -D parameters.
_REF_FLAGS = ("-res-usage", "--use_fast_math", "-O3", "-Xptxas -O3", "--extra-device-vectorization")
_REF_V4_FLAGS = ("-t 4", "-std=c++17", "-res-usage", "--maxrregcount 60", *_REF_FLAGS[1:])


def _ref_spec(
    name: str, folder: Path, sources: tuple[str, ...], flags: tuple[str, ...], namespace: str = ""
) -> BuildSpec:
    """An RWKV-LM extension; `namespace` for the ones that only register torch.ops.<namespace>."""
    files = tuple(str(folder / s) for s in sources)
    return BuildSpec(f"rwkvlm-{name}", f"rwkvlm_{name}", files, flags, not namespace, namespace)


def reference_variants(generation: str, shape: Shape, ref: Path) -> list[tuple[Variant, BuildSpec]]:
    """RWKV-LM's training kernel(s) for one generation and shape, with the build each needs.

    v4 and v6 bake T in (Tmax, _T_): one build per T, each run in a process of its own.
    """
    N, T = shape.N, shape.T
    if generation == "v4":
        spec = _ref_spec(
            f"wkv4_bf16_T{T}", ref / "RWKV-v4neo" / "cuda", ("wkv_op_bf16.cpp", "wkv_cuda_bf16.cu"),
            (*_REF_V4_FLAGS, f"-DTmax={T}"),
        )  # fmt: skip
        return [(Variant("v4:rwkvlm", "rwkv-lm", "RWKV-v4neo wkv_cuda_bf16.cu", spec.key, isolate=True), spec)]
    v5 = ref / "RWKV-v5" / "cuda"
    if generation == "v5":
        spec = _ref_spec(f"wkv5_h{N}", v5, ("wkv5_op.cpp", "wkv5_cuda.cu"), (*_REF_FLAGS, f"-D_N_={N}"))
        return [(Variant("v5:rwkvlm", "rwkv-lm", "RWKV-v5 wkv5_cuda.cu", spec.key), spec)]
    if generation == "v6":
        flags = (*_REF_FLAGS, f"-D_N_={N}", f"-D_T_={T}")
        spec = _ref_spec(f"wkv6_h{N}_T{T}", v5, ("wkv6_op.cpp", "wkv6_cuda.cu"), flags, namespace="wkv6")
        return [(Variant("v6:rwkvlm", "rwkv-lm", "RWKV-v5 wkv6_cuda.cu", spec.key, isolate=True), spec)]
    v7 = ref / "RWKV-v7" / "train_temp" / "cuda"
    chunk = f"-D_CHUNK_LEN_={REF_V7_CHUNK}"
    clampw_flags = ("-res-usage", f"-D_N_={N}", chunk, *_REF_FLAGS[1:])
    v3_sources = ("rwkv7_clampw_v3_for_h100.cu", "rwkv7_clampw_v3_for_h100_alt.cu")
    kernels = [  # (variant, source, build, own process)
        ("v7:rwkvlm-clampw", "rwkv7_clampw.cu", _ref_spec(
            f"rwkv7_clampw_h{N}", v7, ("rwkv7_clampw.cu", "rwkv7_clampw.cpp"), clampw_flags, "rwkv7_clampw"), False),
        ("v7:rwkvlm-clampw-v3", v3_sources[0], _ref_spec(
            f"rwkv7_clampw_v3_h{N}", v7, (v3_sources[0], "rwkv7_clampw_v3.cpp"), clampw_flags, "rwkv7_clampw_v3"),
            False),
        # the trainer's other H100 option ("sometimes faster"): the same op names, so a process of its own
        ("v7:rwkvlm-clampw-v3-alt", v3_sources[1], _ref_spec(
            f"rwkv7_clampw_v3_alt_h{N}", v7, (v3_sources[1], "rwkv7_clampw_v3.cpp"), clampw_flags, "rwkv7_clampw_v3"),
            True),
        ("v7:rwkvlm-wkv7", "wkv7_cuda.cu", _ref_spec(
            f"wind_backstepping_h{N}", v7, ("wkv7_cuda.cu", "wkv7_op.cpp"),
            ("-res-usage", f"-D_C_={N}", chunk, *_REF_FLAGS[1:]), "wind_backstepping"), False),
    ]  # fmt: skip
    return [
        (Variant(key, "rwkv-lm", f"RWKV-v7/train_temp {source}", spec.key, isolate=alone), spec)
        for key, source, spec, alone in kernels
    ]


def load_reference(name: str, spec: BuildSpec, flags: tuple[str, ...]) -> Any:
    """Build or load one RWKV-LM extension; its ops object (a module, or torch.ops.<namespace>)."""
    from torch.utils.cpp_extension import load

    module = load(
        name=name,
        sources=list(spec.sources),
        extra_cuda_cflags=list(flags),
        is_python_module=spec.python_module,
        verbose=False,
    )
    return module if spec.python_module else getattr(torch.ops, spec.namespace)


def _buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An output or gradient buffer of the RWKV-LM wrappers: allocated as the project's op wrappers do,
    so `kernels.poisoned_outputs()` NaN-fills them too."""
    from rwkv_train.ops import kernels

    return kernels.new_output(shape, dtype, device)


class _RwkvLm4(torch.autograd.Function):
    """RWKV-v4neo's bf16 WKV: the op takes w = -exp(time_decay) in float32, u, k, v in bf16."""

    @staticmethod
    def forward(ctx, ext, time_decay: Tensor, u: Tensor, k: Tensor, v: Tensor) -> Tensor:
        B, T, C = k.shape
        w = -torch.exp(time_decay.float().contiguous())
        y = _buffer((B, T, C), torch.bfloat16, k.device)
        ext.forward(B, T, C, w, u, k, v, y)
        ctx.ext = ext
        ctx.save_for_backward(w, u, k, v, y)
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):
        w, u, k, v, y = ctx.saved_tensors
        B, T, C = k.shape
        gw, gu = (_buffer((B, C), torch.bfloat16, k.device) for _ in range(2))
        gk, gv = (_buffer((B, T, C), torch.bfloat16, k.device) for _ in range(2))
        ctx.ext.backward(B, T, C, w, u, k, v, y, gy.contiguous(), gw, gu, gk, gv)
        return None, gw.sum(0), gu.sum(0), gk, gv  # the op's gw is already d/d time_decay


class _RwkvLm5(torch.autograd.Function):
    """RWKV-v5's x052 WKV: time_decay and u [H, N] bf16; the op takes exp(-exp(time_decay)) in float32."""

    @staticmethod
    def forward(ctx, ext, r: Tensor, k: Tensor, v: Tensor, time_decay: Tensor, u: Tensor) -> Tensor:
        B, T, H, N = r.shape
        ew = (-torch.exp(time_decay.float())).contiguous()
        eew = torch.exp(ew).contiguous()
        y = _buffer((B, T, H * N), torch.bfloat16, r.device)
        ext.forward(B, T, H * N, H, r, k, v, eew, u, y)
        ctx.ext = ext
        ctx.save_for_backward(r, k, v, eew, ew, u)
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):
        r, k, v, eew, ew, u = ctx.saved_tensors
        B, T, H, N = r.shape
        gr, gk, gv = (_buffer((B, T, H * N), torch.bfloat16, r.device) for _ in range(3))
        gw, gu = (_buffer((B, H * N), torch.bfloat16, r.device) for _ in range(2))
        ctx.ext.backward(B, T, H * N, H, r, k, v, eew, ew, u, gy.contiguous(), gr, gk, gv, gw, gu)
        shape = r.shape
        return None, gr.view(shape), gk.view(shape), gv.view(shape), gw.sum(0).view(H, N), gu.sum(0).view(H, N)


class _RwkvLm6(torch.autograd.Function):
    """RWKV-v5's x060 WKV: r, k, v, w [B, T, H, N] bf16 with decay exp(-exp(w)), u [H, N] bf16."""

    @staticmethod
    def forward(ctx, ops, r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor) -> Tensor:
        B, T, H, N = r.shape
        y = _buffer((B, T, H * N), torch.bfloat16, r.device)
        ops.forward(B, T, H * N, H, r, k, v, w, u, y)
        ctx.ops = ops
        ctx.save_for_backward(r, k, v, w, u)
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):
        r, k, v, w, u = ctx.saved_tensors
        B, T, H, N = r.shape
        gr, gk, gv, gw = (_buffer(tuple(r.shape), torch.bfloat16, r.device) for _ in range(4))
        gu = _buffer((B, H * N), torch.bfloat16, r.device)
        ctx.ops.backward(B, T, H * N, H, r, k, v, w, u, gy.contiguous(), gr, gk, gv, gw, gu)
        return None, gr, gk, gv, gw, gu.sum(0).view(H, N)


class _RwkvLm7(torch.autograd.Function):
    """RWKV-LM's v7 kernels (rwkv7_clampw, rwkv7_clampw_v3, wkv7_cuda), all inputs [B, T, H, N] bf16.

    The forward also fills s, the state every 16 steps, and sa = S_{t-1} a_t, both float32, which the
    backward reads. wkv7_cuda's ops take (w, r, ...) where the clampw ones take (r, w, ...).
    """

    @staticmethod
    def forward(ctx, ops, w_first: bool, r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor) -> Tensor:
        B, T, H, N = r.shape
        if T % REF_V7_CHUNK:
            raise ValueError(f"RWKV-LM's v7 kernels need T % {REF_V7_CHUNK} == 0, got T={T}")
        y = _buffer(tuple(v.shape), torch.bfloat16, r.device)
        s = torch.empty(B, H, T // REF_V7_CHUNK, N, N, dtype=torch.float32, device=r.device)
        sa = torch.empty(B, T, H, N, dtype=torch.float32, device=r.device)
        ops.forward(*((w, r) if w_first else (r, w)), k, v, a, b, y, s, sa)
        ctx.ops, ctx.w_first = ops, w_first
        ctx.save_for_backward(r, w, k, v, a, b, s, sa)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        r, w, k, v, a, b, s, sa = ctx.saved_tensors
        dr, dw, dk, dv, da, db = (_buffer(tuple(x.shape), torch.bfloat16, x.device) for x in (r, w, k, v, a, b))
        first, d_first = ((w, r), (dw, dr)) if ctx.w_first else ((r, w), (dr, dw))
        ctx.ops.backward(*first, k, v, a, b, dy.contiguous(), s, sa, *d_first, dk, dv, da, db)
        return None, None, dr, dw, dk, dv, da, db
