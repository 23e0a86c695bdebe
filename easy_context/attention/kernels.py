"""Local (single-device) attention kernels behind one small interface.

Every backend works on ``(batch, heads, seq, head_dim)`` tensors (views of the flash-attn layout are
fine) and offers

* ``forward(q, k, v, causal, scale) -> (out, lse)``: ``out`` in q's dtype, ``lse`` float32
  ``(batch, heads, seq_q)``, natural-log log-sum-exp of the scaled scores of each query row;
* ``backward(dout, q, k, v, out, lse, causal, scale) -> (dq, dk, dv)``.

``backward`` is called by the ring algorithms with the *final* (merged over all key blocks) ``out`` and
``lse``, not the ones this block produced. That is exact: ``exp(s - lse_final)`` is the global softmax
probability of the block's keys, and ``rowsum(dout * out_final)`` is the global softmax Jacobian term.

``causal`` means top-left aligned with ``seq_q == seq_k`` (the ring only ever asks for diagonal blocks).

Score modifications, keyword arguments passed only when set (so a kernel without them keeps the five-argument
form) and only to kernels that list them in ``Kernel.mods``:

* ``band=(lo, hi)`` (``"window"``): query row ``a`` of the block sees key row ``b`` iff ``lo <= a - b <= hi``
  (None: unbounded on that side), with ``causal`` False. A sliding window over the global sequence becomes one band
  per block (documents.plan_block derives it from the block's global offsets; backends.fa4_window maps it to FA4's
  bottom-right window);
* ``softcap`` (``"softcap"``): scores ``softcap * tanh(scale * q.k / softcap)`` (Gemma 2), 0 for none. The varlen
  entry point of a kernel with ``"softcap"`` takes it too.

Attention sinks (gpt-oss) need nothing of the kernels: they enter after the merge (merge.add_sinks).
k/v may have fewer heads than q (GQA: ``heads % kv_heads == 0``); dk/dv come back with kv heads.

Backends and the input dtypes each takes:

* ``cudnn``, ``flash`` (PyTorch's fused aten ops, CUDA): float16 / bfloat16;
* ``efficient`` (PyTorch's memory-efficient aten op, CUDA): float32 / float16 / bfloat16;
* ``fa4`` (the optional flash-attn-4 package, FlashAttention-4; sm90 / sm100 GPUs): float16 / bfloat16;
* ``flash_attn`` (the optional flash-attn package): float16 / bfloat16;
* ``math`` (pure torch, any device and dtype; float32 accumulation at least).

``auto`` picks by device, dtype, head dim and the score modifications asked for (``features``): with a window or
soft-capping only math and fa4 qualify (fa4 for 16-bit inputs on sm90 / sm100, math for float32 / float64 and on the
CPU; 16-bit inputs on a GPU without fa4 raise naming the install). Otherwise: on CUDA fa4 for 16-bit inputs on sm90 /
sm100 when flash-attn-4 imports and takes the head dim, else cudnn (sm90+) or flash (older GPUs); efficient for float32,
math for float64; math elsewhere. fa4 computes the diagonal block of a packed row in one varlen call. Packed rows
(documents): ``flash`` computes the diagonal block's documents in one FA2 varlen call; ``auto`` without fa4 on sm90 too
when they average fewer than ``AUTO_VARLEN_BELOW`` tokens, and one cuDNN call per document otherwise (see
:class:`Varlen`). The environment variable ``EASY_CONTEXT_ATTN_BACKEND`` overrides ``auto``. A backend named explicitly
that does not take the inputs' dtype is an error naming the fix (cuDNN was seen to return NaN for float32 instead of
refusing it).
"""
from __future__ import annotations

import functools
import math
import os
from typing import Callable, NamedTuple

import torch

from . import backends as B
from .merge import merge_eager

BACKENDS = ("auto", "fa4", "cudnn", "flash", "efficient", "flash_attn", "math")
ENV_BACKEND = "EASY_CONTEXT_ATTN_BACKEND"
# Causal forwards over at least this many tokens run as three calls (see split_causal); 0 (the default: no gain
# was measured at 64K-128K on the H200, bench/RESULTS.md) turns it off.
ENV_SPLIT_CAUSAL = "EASY_CONTEXT_SPLIT_CAUSAL"

_HALF = (torch.float16, torch.bfloat16)


class Varlen(NamedTuple):
    """One call over many documents (the diagonal block of a packed row): ``forward(q, k, v, cu, max_len, causal,
    scale) -> (out, lse)`` over ``(tokens, heads, head_dim)`` with ``lse (heads, tokens)``, and its backward
    (backends.py). Used when a block's documents average fewer than ``below`` tokens each."""
    forward: Callable
    backward: Callable
    below: float


class Kernel(NamedTuple):
    name: str
    forward: Callable
    backward: Callable
    dtypes: tuple = (torch.float64, torch.float32, *_HALF)  # input dtypes the kernel takes
    varlen: Varlen | None = None  # None: one call per document
    mods: frozenset = frozenset()  # score modifications it implements: "window" (band=), "softcap" (softcap=)


# What the score modifications are called in errors.
FEATURES = {"window": "a sliding window (band of keys per block)", "softcap": "attention logit soft-capping"}
_ALL_MODS = frozenset(FEATURES)


def score_mods(band=None, softcap: float = 0.0) -> dict:
    """The keyword arguments of a kernel call for ``band`` and ``softcap`` (empty when neither is set)."""
    mods = {}
    if band is not None:
        mods["band"] = band
    if softcap:
        mods["softcap"] = softcap
    return mods


FLASH_VARLEN = Varlen(B.flash_varlen_forward, B.flash_varlen_backward, float("inf"))
# auto on sm90 (cuDNN): the diagonal block of a packed row goes to FA2's varlen call when its documents average fewer
# tokens than this. One H200, 128K rows, in-document TFLOP/s warm, and seconds cuDNN spends on plans for a row of new
# lengths (bench/RESULTS.md 12b):   mean length   cuDNN per document   FA2 varlen
#                                      9.4K (1K-64K)    504, 1.2 s       315
#                                      6.5K (2K-16K)    497, 1.7 s       311
#                                      2.5K (512-8K)    420, 5.0 s       284
#                                      655 (128-2K)     131, 16.7 s      198
# A training step of packed rows meets new lengths (its 32 layers share one set of plans): on such a step cuDNN loses
# 4x at 2.5K (6.0 s against 1.5 s), 17% at 6.5K (3.6 against 3.0; once its plans exist it wins 1.6x) and wins 11% at
# 9.4K. Below 4096 varlen; at or above it cuDNN. backend="cudnn" / "flash" choose one for every row.
AUTO_VARLEN_BELOW = 4096

# FA4 builds no plans per document length (its kernels are compiled per configuration, not per length) and its varlen
# call ran at 590 TFLOP/s on 16 x 4K documents (one H200, 2026-12-03): every packed diagonal block is one call.
FA4_VARLEN = Varlen(B.fa4_varlen_forward, B.fa4_varlen_backward, float("inf"))
# GPU architectures (compute capability major) FlashAttention-4 is built for
FA4_ARCHS = (9, 10)

KERNELS = {
    "math": Kernel("math", B.math_forward, B.math_backward, mods=_ALL_MODS),
    "fa4": Kernel("fa4", B.fa4_forward, B.fa4_backward, _HALF, FA4_VARLEN, _ALL_MODS),
    "cudnn": Kernel("cudnn", B.cudnn_forward, B.cudnn_backward, _HALF),
    "flash": Kernel("flash", B.flash_forward, B.flash_backward, _HALF, FLASH_VARLEN),
    "efficient": Kernel("efficient", B.efficient_forward, B.efficient_backward, (torch.float32, *_HALF)),
    "flash_attn": Kernel("flash_attn", B.flash_attn_forward, B.flash_attn_backward, _HALF),
}
# what "auto" gives where it resolves to cudnn: cuDNN per document, FA2 varlen for rows of short documents
AUTO_CUDNN = KERNELS["cudnn"]._replace(varlen=FLASH_VARLEN._replace(below=AUTO_VARLEN_BELOW))


def _requested(backend: str | None) -> str:
    """The backend asked for: ``backend``, or for None/"auto" the environment's override (default "auto")."""
    if backend in (None, "auto"):
        return os.environ.get(ENV_BACKEND, "auto") or "auto"
    return backend


@functools.lru_cache(maxsize=1)
def fa4_importable() -> bool:
    """Whether FlashAttention-4 imports here (tried once per process)."""
    try:
        B.fa4_interface()
    except ImportError:
        return False
    return True


def fa4_takes_head_dim(head_dim: int | None, arch: int) -> bool:
    """FlashAttention-4's head dims: 8-256 in steps of 8 on sm90; 8-128 in steps of 8, or 256, on sm100."""
    if head_dim is None:
        return True
    if head_dim % 8:
        return False
    return 8 <= head_dim <= 256 if arch == 9 else (8 <= head_dim <= 128 or head_dim == 256)


def _no_mods_here(backend: str, features, device, dtype, head_dim) -> str:
    what = " and ".join(FEATURES[f] for f in sorted(features))
    if device.type != "cuda":
        return f"{backend!r} cannot apply {what}; use backend='math' (or 'auto') on {device.type}"
    arch = torch.cuda.get_device_capability(device)[0]
    if arch in FA4_ARCHS and fa4_takes_head_dim(head_dim, arch):
        fa4 = "backend='fa4' (FlashAttention-4" + ("" if fa4_importable() else f": {B.FA4_INSTALL}") + ")"
    else:
        fa4 = "FlashAttention-4 (sm90 / sm100 GPUs, head dims 8-256)"
    return (f"{backend!r} cannot apply {what}; use {fa4}, or backend='math' (exact in any dtype, but a "
            "reference speed on GPUs)")


def resolve_backend(backend: str | None, device: torch.device, dtype: torch.dtype | None = None,
                    head_dim: int | None = None, features=()) -> str:
    """Return the concrete backend name for ``backend`` (None/"auto" -> env override or the default for the device,
    ``dtype``, ``head_dim`` and the score modifications ``features`` (``"window"``, ``"softcap"``), see the module
    docstring).

    Raises:
        ValueError: an unknown name, a CUDA backend on another device, a backend that does not take ``dtype``, fa4 on
            a GPU or head dim it is not built for, or a backend (named, or the only one auto could pick) that cannot
            apply ``features`` (the message names the backend that can, and its install).
        ImportError: fa4 named without flash-attn-4 installed (the message names the install).
    """
    features = frozenset(features)
    backend = _requested(backend)
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS} "
                         f"(argument `backend` or env {ENV_BACKEND})")
    if backend == "auto" and features:
        if device.type != "cuda" or dtype in (torch.float64, torch.float32):
            return "math"
        arch = torch.cuda.get_device_capability(device)[0]
        if arch in FA4_ARCHS and fa4_takes_head_dim(head_dim, arch) and fa4_importable():
            return "fa4"
        raise ValueError("attention backend 'auto' for 16-bit inputs: the fused PyTorch kernels " +
                         _no_mods_here("cudnn", features, device, dtype, head_dim))
    if backend != "auto" and not features <= KERNELS[backend].mods:
        missing = features - KERNELS[backend].mods
        raise ValueError("attention backend " + _no_mods_here(backend, missing, device, dtype, head_dim))
    if backend == "auto":
        if device.type != "cuda" or dtype == torch.float64:
            return "math"
        if dtype == torch.float32:
            return "efficient"
        arch = torch.cuda.get_device_capability(device)[0]
        if arch in FA4_ARCHS and fa4_takes_head_dim(head_dim, arch) and fa4_importable():
            return "fa4"
        return "cudnn" if arch >= 9 else "flash"
    if backend != "math" and device.type != "cuda":
        raise ValueError(f"attention backend {backend!r} needs CUDA tensors, got device {device}; "
                         f"use backend='math' (or 'auto') on {device.type}")
    if dtype is not None and dtype not in KERNELS[backend].dtypes:
        takes = ", ".join(str(t).removeprefix("torch.") for t in KERNELS[backend].dtypes)
        raise ValueError(f"attention backend {backend!r} takes {takes} inputs, got {dtype}; run the model in bfloat16 "
                         f"(train.py: --mixed-precision bf16, or --dtype bfloat16) or choose a backend that takes "
                         f"{dtype}: 'auto' picks one ('efficient' for float32 on CUDA), 'math' takes any")
    if backend == "fa4":
        arch = torch.cuda.get_device_capability(device)[0]
        if arch not in FA4_ARCHS:
            raise ValueError(f"attention backend 'fa4' runs on sm90 / sm100 GPUs (H100/H200, B200), and {device} is "
                             f"sm{arch}x; use backend='auto' (it picks '{'cudnn' if arch >= 9 else 'flash'}' here)")
        if not fa4_takes_head_dim(head_dim, arch):
            raise ValueError(f"attention backend 'fa4' does not take head dim {head_dim} on sm{arch}0 (8-256 in "
                             f"steps of 8 on sm90; up to 128, or 256, on sm100); use backend='cudnn' or 'auto'")
        B.fa4_interface()  # ImportError naming the install, before any work
    return backend


def describe_kernel(backend: str | None, device: torch.device, dtype: torch.dtype,
                    head_dim: int | None = None) -> str:
    """One line for a run's start: the kernel that runs and why, e.g. ``attention kernel: fa4 (flash-attn-4 4.0.0b36;
    chosen by auto for bfloat16 on sm90; packed rows: one varlen call per diagonal block)``."""
    name = resolve_backend(backend, device, dtype, head_dim)
    why = "named" if _requested(backend) != "auto" else "chosen by auto"
    where = f"sm{torch.cuda.get_device_capability(device)[0]}0" if device.type == "cuda" else device.type
    parts = [f"{why} for {str(dtype).removeprefix('torch.')} on {where}"]
    if name == "fa4":
        from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

        try:
            parts.insert(0, f"flash-attn-4 {version('flash-attn-4')}")
        except PackageNotFoundError:
            pass
    kernel = get_kernel(backend, device, dtype, head_dim)
    if kernel.varlen is not None:
        below = kernel.varlen.below
        parts.append("packed rows: one varlen call per diagonal block" if below == float("inf") else
                     f"packed rows: one varlen call per diagonal block when its documents average < {below:.0f} "
                     f"tokens")
    return f"attention kernel: {name} ({'; '.join(parts)})"


def split_causal(kernel: Kernel, min_len: int) -> Kernel:
    """``kernel`` whose causal forwards over ``>= min_len`` queries run as three calls merged in float32.

    Queries ``[0, s/2)`` attend causally to keys ``[0, s/2)``; queries ``[s/2, s)`` attend to keys ``[0, s/2)``
    without a mask and causally to ``[s/2, s)``. Half the work moves into a non-causal call, which cuDNN runs
    faster than long causal ones at 256K (bench/RESULTS.md: one causal call 518 TFLOP/s, the rings' blocks
    580-608). The result is the same attention (merged ``out``/``lse`` in float32); backward is one call with
    the merged ``out``/``lse``, as in the rings (it gains nothing from splitting). Measured on one H200: 0.97x
    forward at 64K and no step-time gain at 128K, so it is off unless ``EASY_CONTEXT_SPLIT_CAUSAL`` asks.
    """
    if min_len <= 0:
        return kernel
    forward = kernel.forward

    def split_forward(q, k, v, causal, scale, **mods):
        s = q.shape[2]
        if not causal or s < min_len or s % 2 or mods:  # a band or soft-capping: one call as asked
            return forward(q, k, v, causal, scale, **mods)
        c = s // 2
        b, h, _, d = q.shape
        out = torch.empty(b, s, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)  # flash layout in memory
        top, lse_top = forward(q[:, :, :c], k[:, :, :c], v[:, :, :c], True, scale)
        out[:, :, :c] = top
        del top
        below, lse_below = forward(q[:, :, c:], k[:, :, :c], v[:, :, :c], False, scale)
        acc, lse_acc = below.to(B.acc_dtype(q.dtype)), lse_below.to(B.acc_dtype(q.dtype))
        del below
        diag, lse_diag = forward(q[:, :, c:], k[:, :, c:], v[:, :, c:], True, scale)
        merge_eager(acc, lse_acc, diag, lse_diag)  # eager: a first-call torch.compile stalled a 128K step 11 s
        out[:, :, c:] = acc
        return out, torch.cat([lse_top.to(lse_acc.dtype), lse_acc], dim=2)

    return kernel._replace(forward=split_forward)


_SPLIT_KERNELS: dict = {}


def get_kernel(backend: str | None, device: torch.device, dtype: torch.dtype | None = None,
               head_dim: int | None = None, features=()) -> Kernel:
    """The :class:`Kernel` (name, forward, backward, dtypes) for ``backend`` on ``device`` for inputs of ``dtype``
    and ``head_dim`` that can apply the score modifications ``features`` (see :func:`resolve_backend`); causal
    forwards of at least ``EASY_CONTEXT_SPLIT_CAUSAL`` tokens split (:func:`split_causal`; default off)."""
    name = resolve_backend(backend, device, dtype, head_dim, features)
    kernel = AUTO_CUDNN if name == "cudnn" and _requested(backend) == "auto" else KERNELS[name]
    env = os.environ.get(ENV_SPLIT_CAUSAL, "")
    try:
        min_len = int(env) if env else 0
    except ValueError:
        raise ValueError(f"{ENV_SPLIT_CAUSAL}={env!r}: expected a token count (0 turns splitting off)") from None
    if min_len <= 0:
        return kernel
    if (kernel, min_len) not in _SPLIT_KERNELS:
        _SPLIT_KERNELS[(kernel, min_len)] = split_causal(kernel, min_len)
    return _SPLIT_KERNELS[(kernel, min_len)]


def head_major(x: torch.Tensor) -> torch.Tensor:
    """``(b, s, h, d)`` <-> ``(b, h, s, d)`` view: the kernels take the head-major view of flash-layout memory."""
    return x.transpose(1, 2)


def default_scale(head_dim: int, softmax_scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)


class _LocalAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, kernel):
        out, lse = kernel.forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale, ctx.kernel = causal, scale, kernel
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.kernel.backward(dout.contiguous().view_as(dout), q, k, v, out, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None


def autocast_inputs(attn_func: Callable) -> Callable:
    """Decorate an attention function ``f(q, k, v, ...)`` to follow torch.autocast as SDPA does: inside an autocast
    region of q's device, q, k and v are cast to the autocast dtype first (float64 ones excepted, as autocast does;
    the casts are differentiable: gradients reach float32 inputs in float32) and the output comes back in that dtype.
    The function itself then runs with autocast off, as a fused kernel would: the math backend's float32 accumulation
    and the float32 merges stay so.

    Why: a float32 model trained under bf16 autocast (``--dtype float32 --mixed-precision bf16``) hands attention
    float32 q/k (rotary embeddings multiply in float32) and a bfloat16 v. HF's SDPA path casts them to bf16; the
    sequence-parallel functions must do the same, not refuse the mixed dtypes.
    """
    @functools.wraps(attn_func)
    def wrapper(q, k, v, *args, **kwargs):
        device_type = q.device.type
        if not torch.is_autocast_enabled(device_type):
            return attn_func(q, k, v, *args, **kwargs)
        dtype = torch.get_autocast_dtype(device_type)
        # autocast's own rule: floating tensors are cast, float64 ones are left as they are
        q, k, v = (t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t for t in (q, k, v))
        with torch.autocast(device_type, enabled=False):  # like a fused kernel: our own accumulation precision
            return attn_func(q, k, v, *args, **kwargs)
    return wrapper


@autocast_inputs
def local_attn_func(q, k, v, causal: bool = True, softmax_scale: float | None = None, *, backend: str | None = None):
    """Single-device attention with our kernels, flash-attn layout.

    Args:
        q: ``(batch, seq, heads, head_dim)``; k, v: ``(batch, seq, kv_heads, head_dim)``.
    Returns:
        ``(batch, seq, heads, head_dim)``.
    """
    check_qkv(q, k, v)
    kernel = get_kernel(backend, q.device, q.dtype, q.shape[-1])
    scale = default_scale(q.shape[-1], softmax_scale)
    out = _LocalAttn.apply(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal, scale, kernel)
    return out.transpose(1, 2)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Validate flash-layout q/k/v shapes locally (no communication); raise ValueError naming the fix."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (batch, seq, heads, head_dim); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, seq and head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]}) for GQA")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
