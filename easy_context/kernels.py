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
k/v may have fewer heads than q (GQA: ``heads % kv_heads == 0``); dk/dv come back with kv heads.

Backends and the input dtypes each takes:

* ``cudnn``, ``flash`` (PyTorch's fused aten ops, CUDA): float16 / bfloat16;
* ``efficient`` (PyTorch's memory-efficient aten op, CUDA): float32 / float16 / bfloat16;
* ``flash_attn`` (the optional flash-attn package): float16 / bfloat16;
* ``math`` (pure torch, any device and dtype; float32 accumulation at least).

``auto`` picks by device and dtype: on CUDA cudnn (sm90+) or flash (older GPUs) for 16-bit inputs, efficient for
float32, math for float64; math elsewhere. The environment variable ``EASY_CONTEXT_ATTN_BACKEND`` overrides
``auto``. A backend named explicitly that does not take the inputs' dtype is an error naming the fix (cuDNN was
seen to return NaN for float32 instead of refusing it).
"""
from __future__ import annotations

import math
import os
from typing import Callable, NamedTuple

import torch

from .merge import _merge_eager

BACKENDS = ("auto", "cudnn", "flash", "efficient", "flash_attn", "math")
ENV_BACKEND = "EASY_CONTEXT_ATTN_BACKEND"
# Causal forwards over at least this many tokens run as three calls (see split_causal); 0 (the default: no gain
# was measured at 64K-128K on the H200, bench/RESULTS.md) turns it off.
ENV_SPLIT_CAUSAL = "EASY_CONTEXT_SPLIT_CAUSAL"

# Rows of q processed at once by the math kernel: bounds its score matrix to rows x seq_k.
_MATH_ROW_CHUNK = 2048


_HALF = (torch.float16, torch.bfloat16)


class Kernel(NamedTuple):
    name: str
    forward: Callable
    backward: Callable
    dtypes: tuple = (torch.float64, torch.float32, *_HALF)  # input dtypes the kernel takes


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    # (b, hkv, s, d) -> (b, hkv * n_rep, s, d), each kv head repeated for its query-head group
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def _sum_kv(dx: torch.Tensor, n_rep: int) -> torch.Tensor:
    # (b, hkv * n_rep, s, d) -> (b, hkv, s, d): gradient of _repeat_kv
    if n_rep == 1:
        return dx
    b, h, s, d = dx.shape
    return dx.view(b, h // n_rep, n_rep, s, d).sum(2)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- math (pure torch, any device)
def _math_scores(q, k, scale, causal, row0):
    # q: (b, h, r, d) rows [row0, row0 + r) of the block; k: (b, h, sk, d) -> scores (b, h, r, sk)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        rows = torch.arange(row0, row0 + q.shape[2], device=q.device).unsqueeze(1)
        cols = torch.arange(k.shape[2], device=q.device).unsqueeze(0)
        s = s.masked_fill(cols > rows, float("-inf"))
    return s


def _math_forward(q, k, v, causal, scale):
    acc = _acc_dtype(q.dtype)
    n_rep = q.shape[1] // k.shape[1]
    qa, ka, va = q.to(acc), _repeat_kv(k.to(acc), n_rep), _repeat_kv(v.to(acc), n_rep)
    outs, lses = [], []
    for r0 in range(0, q.shape[2], _MATH_ROW_CHUNK):
        s = _math_scores(qa[:, :, r0:r0 + _MATH_ROW_CHUNK], ka, scale, causal, r0)
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.matmul(torch.exp(s - lse.unsqueeze(-1)), va))
        lses.append(lse)
    return torch.cat(outs, 2).to(q.dtype), torch.cat(lses, 2).float() if acc != torch.float64 else torch.cat(lses, 2)


def _math_backward(dout, q, k, v, out, lse, causal, scale):
    acc = _acc_dtype(q.dtype)
    n_rep = q.shape[1] // k.shape[1]
    qa, ka, va = q.to(acc), _repeat_kv(k.to(acc), n_rep), _repeat_kv(v.to(acc), n_rep)
    doa, oa, la = dout.to(acc), out.to(acc), lse.to(acc)
    dq = torch.empty_like(qa)
    dk = torch.zeros_like(ka)
    dv = torch.zeros_like(va)
    for r0 in range(0, q.shape[2], _MATH_ROW_CHUNK):
        r1 = r0 + _MATH_ROW_CHUNK
        p = torch.exp(_math_scores(qa[:, :, r0:r1], ka, scale, causal, r0) - la[:, :, r0:r1].unsqueeze(-1))
        do = doa[:, :, r0:r1]
        dv += torch.matmul(p.transpose(-1, -2), do)
        dp = torch.matmul(do, va.transpose(-1, -2))
        delta = (do * oa[:, :, r0:r1]).sum(-1, keepdim=True)
        ds = p * (dp - delta)
        dq[:, :, r0:r1] = torch.matmul(ds, ka) * scale
        dk += torch.matmul(ds.transpose(-1, -2), qa[:, :, r0:r1]) * scale
    return dq.to(q.dtype), _sum_kv(dk, n_rep).to(k.dtype), _sum_kv(dv, n_rep).to(v.dtype)


# ---------------------------------------------------------------- cuDNN (aten op, sm80+, best on sm90)
# The cuDNN and flash backward ops take the forward's philox seed/offset and cum_seq placeholders. Without dropout and
# for dense inputs their values are unused, but the op wants tensors of the kind the forward returns, so
# the last forward's placeholders are kept per device and reused (small, not sized by any input).
_PLACEHOLDERS: dict = {}


def _placeholders(op: str, device):
    if (op, device) not in _PLACEHOLDERS:
        empty = torch.empty(0, device=device, dtype=torch.int64)
        _PLACEHOLDERS[(op, device)] = (empty, empty, empty, empty)
    return _PLACEHOLDERS[(op, device)]


# Whether the cuDNN ops take fewer kv heads directly (GQA without copying K/V). The forward was seen to
# on cuDNN 9.19; the backward is tried once per process and falls back to repeated heads if refused.
_CUDNN_NATIVE_GQA = {"forward": True, "backward": True}


def _cudnn_forward(q, k, v, causal, scale):
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1 and not _CUDNN_NATIVE_GQA["forward"]:
        k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    try:
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale)
    except RuntimeError:
        if n_rep == 1 or not _CUDNN_NATIVE_GQA["forward"]:
            raise
        _CUDNN_NATIVE_GQA["forward"] = False
        return _cudnn_forward(q, k, v, causal, scale)
    _PLACEHOLDERS[("cudnn", q.device)] = (res[6], res[7], res[2], res[3])  # seed, offset, cum_seq_q/k
    # lse comes back as (b, h, s, 1); keep the (b, h, s) float32 convention
    return res[0], res[1].view(q.shape[0], q.shape[1], q.shape[2]).float()


def _in_layout_of(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``x`` (shaped like ``ref``) in the memory layout an output allocated like ``ref`` has (``empty_like``).

    PyTorch caches cuDNN's backward graph by the shapes and strides of q, k and v alone (aten MHA.cpp), but builds it
    with the strides of out and grad_out too: a second call whose out/grad_out are laid out differently for the same
    q/k/v reuses a graph that reads them wrongly (seen on 2xH200: usp_attn(ring_degree=1) after ulysses_attn in one
    process gave gradients with relative error 1.41). So out and grad_out always get the layout that is a function of
    q's: a zero-copy restride when only size-one dimensions differ, a copy otherwise.
    """
    want = torch.empty_like(ref, device="meta").stride()
    if x.stride() == want:
        return x
    if all(a == b for a, b, n in zip(x.stride(), want, x.shape) if n > 1):
        return x.as_strided(x.shape, want)
    return torch.empty_like(ref).copy_(x)


def _cudnn_backward(dout, q, k, v, out, lse, causal, scale):
    n_rep = q.shape[1] // k.shape[1]
    dout, out = _in_layout_of(dout, q), _in_layout_of(out, q)
    native = n_rep == 1 or _CUDNN_NATIVE_GQA["backward"]
    ke, ve = (k, v) if native else (_repeat_kv(k, n_rep), _repeat_kv(v, n_rep))
    b, h, sq, _ = q.shape
    seed, offset, cum_q, cum_k = _placeholders("cudnn", q.device)
    lse4 = lse.reshape(b, h, sq, 1).contiguous()
    try:
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, ke, ve, out, lse4, seed, offset, None, cum_q, cum_k, sq, ke.shape[2], 0.0, causal,
            scale=scale)
    except RuntimeError:
        if n_rep == 1 or not native:
            raise
        _CUDNN_NATIVE_GQA["backward"] = False
        return _cudnn_backward(dout, q, k, v, out, lse, causal, scale)
    if native and n_rep > 1 and dk.shape[1] != k.shape[1]:  # returned per query head: sum the groups
        dk, dv = _sum_kv(dk, n_rep), _sum_kv(dv, n_rep)
    return dq, (dk if native else _sum_kv(dk, n_rep)), (dv if native else _sum_kv(dv, n_rep))


# ---------------------------------------------------------------- torch flash (aten op, sm80+)
def _flash_forward(q, k, v, causal, scale):
    n_rep = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    _PLACEHOLDERS[("flash", q.device)] = (res[6], res[7], res[2], res[3])  # seed, offset, cum_seq_q/k
    return res[0], res[1].float()


def _flash_backward(dout, q, k, v, out, lse, causal, scale):
    n_rep = q.shape[1] // k.shape[1]
    ke, ve = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    seed, offset, cum_q, cum_k = _placeholders("flash", q.device)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout, q, ke, ve, out, lse.contiguous(), cum_q, cum_k, q.shape[2], ke.shape[2], 0.0, causal,
        seed, offset, scale=scale)
    return dq, _sum_kv(dk, n_rep), _sum_kv(dv, n_rep)


# ---------------------------------------------------------------- torch memory-efficient (aten op; takes float32)
# Its lse comes back padded to a multiple of this many rows per head; the backward wants that padded shape back.
_EFFICIENT_LSE_ALIGN = 32


def _efficient_forward(q, k, v, causal, scale):
    n_rep = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, None, True, 0.0, causal, scale=scale)
    _PLACEHOLDERS[("efficient", q.device)] = (seed, offset, seed, offset)  # the 4-tuple shape of the others
    return out, lse[:, :, :q.shape[2]].float()


def _efficient_backward(dout, q, k, v, out, lse, causal, scale):
    n_rep = q.shape[1] // k.shape[1]
    ke, ve = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    seed, offset = _placeholders("efficient", q.device)[:2]  # read only with dropout, which is never on
    lse = torch.nn.functional.pad(lse.float(), (0, -q.shape[2] % _EFFICIENT_LSE_ALIGN))  # (b, h, s) -> padded, copy
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        dout, q, ke, ve, None, out, lse, seed, offset, 0.0, [True, True, True, False], causal, scale=scale)
    return dq, _sum_kv(dk, n_rep), _sum_kv(dv, n_rep)


# ---------------------------------------------------------------- flash-attn package (optional)
def _flash_attn_module():
    try:
        from flash_attn import flash_attn_interface  # noqa: PLC0415 - optional dependency
    except ImportError as e:
        raise ImportError("backend 'flash_attn' needs the flash-attn package: pip install 'easy-context[flash]' "
                          "(or use backend='cudnn'/'flash', which need only PyTorch)") from e
    return flash_attn_interface


def _flash_attn_forward(q, k, v, causal, scale):
    fa = _flash_attn_module()
    # flash-attn wants (b, s, h, d); our (b, h, s, d) views of that layout transpose back for free
    out, lse, _ = fa.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                      softmax_scale=scale, causal=causal, return_attn_probs=True)
    return out.transpose(1, 2), lse.float()


def _flash_attn_backward(dout, q, k, v, out, lse, causal, scale):
    fa = _flash_attn_module()
    t = (lambda x: x.transpose(1, 2))  # noqa: E731
    dq, dk, dv = (torch.empty_like(t(x)) for x in (q, k, v))
    # flash-attn >= 2.6 signature (dropout 0, no window, no softcap, no alibi, deterministic off)
    fa._flash_attn_backward(t(dout), t(q), t(k), t(v), t(out), lse.contiguous(), dq, dk, dv, 0.0, scale,
                            causal, -1, -1, 0.0, None, False, None)
    return t(dq), t(dk), t(dv)


_KERNELS = {
    "math": Kernel("math", _math_forward, _math_backward),
    "cudnn": Kernel("cudnn", _cudnn_forward, _cudnn_backward, _HALF),
    "flash": Kernel("flash", _flash_forward, _flash_backward, _HALF),
    "efficient": Kernel("efficient", _efficient_forward, _efficient_backward, (torch.float32, *_HALF)),
    "flash_attn": Kernel("flash_attn", _flash_attn_forward, _flash_attn_backward, _HALF),
}


def resolve_backend(backend: str | None, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Return the concrete backend name for ``backend`` (None/"auto" -> env override or the default for the device
    and ``dtype``, see the module docstring).

    Raises:
        ValueError: an unknown name, a CUDA backend on another device, or a backend that does not take ``dtype``.
    """
    if backend in (None, "auto"):
        backend = os.environ.get(ENV_BACKEND, "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS} "
                         f"(argument `backend` or env {ENV_BACKEND})")
    if backend == "auto":
        if device.type != "cuda" or dtype == torch.float64:
            return "math"
        if dtype == torch.float32:
            return "efficient"
        return "cudnn" if torch.cuda.get_device_capability(device) >= (9, 0) else "flash"
    if backend != "math" and device.type != "cuda":
        raise ValueError(f"attention backend {backend!r} needs CUDA tensors, got device {device}; "
                         f"use backend='math' (or 'auto') on {device.type}")
    if dtype is not None and dtype not in _KERNELS[backend].dtypes:
        takes = ", ".join(str(t).removeprefix("torch.") for t in _KERNELS[backend].dtypes)
        raise ValueError(f"attention backend {backend!r} takes {takes} inputs, got {dtype}; run the model in bfloat16 "
                         f"(train.py: --mixed-precision bf16, or --dtype bfloat16) or choose a backend that takes "
                         f"{dtype}: 'auto' picks one ('efficient' for float32 on CUDA), 'math' takes any")
    return backend


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

    def split_forward(q, k, v, causal, scale):
        s = q.shape[2]
        if not causal or s < min_len or s % 2:
            return forward(q, k, v, causal, scale)
        c = s // 2
        b, h, _, d = q.shape
        out = torch.empty(b, s, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)  # flash layout in memory
        top, lse_top = forward(q[:, :, :c], k[:, :, :c], v[:, :, :c], True, scale)
        out[:, :, :c] = top
        del top
        below, lse_below = forward(q[:, :, c:], k[:, :, :c], v[:, :, :c], False, scale)
        acc, lse_acc = below.to(_acc_dtype(q.dtype)), lse_below.to(_acc_dtype(q.dtype))
        del below
        diag, lse_diag = forward(q[:, :, c:], k[:, :, c:], v[:, :, c:], True, scale)
        _merge_eager(acc, lse_acc, diag, lse_diag)  # eager: a first-call torch.compile stalled a 128K step 11 s
        out[:, :, c:] = acc
        return out, torch.cat([lse_top.to(lse_acc.dtype), lse_acc], dim=2)

    return kernel._replace(forward=split_forward)


_SPLIT_KERNELS: dict = {}


def get_kernel(backend: str | None, device: torch.device, dtype: torch.dtype | None = None) -> Kernel:
    """The :class:`Kernel` (name, forward, backward, dtypes) for ``backend`` on ``device`` for inputs of ``dtype``
    (see :func:`resolve_backend`); causal forwards of at least ``EASY_CONTEXT_SPLIT_CAUSAL`` tokens split
    (:func:`split_causal`; default off)."""
    name = resolve_backend(backend, device, dtype)
    env = os.environ.get(ENV_SPLIT_CAUSAL, "")
    try:
        min_len = int(env) if env else 0
    except ValueError:
        raise ValueError(f"{ENV_SPLIT_CAUSAL}={env!r}: expected a token count (0 turns splitting off)") from None
    if min_len <= 0:
        return _KERNELS[name]
    if (name, min_len) not in _SPLIT_KERNELS:
        _SPLIT_KERNELS[(name, min_len)] = split_causal(_KERNELS[name], min_len)
    return _SPLIT_KERNELS[(name, min_len)]


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


def local_attn_func(q, k, v, causal: bool = True, softmax_scale: float | None = None, *, backend: str | None = None):
    """Single-device attention with our kernels, flash-attn layout.

    Args:
        q: ``(batch, seq, heads, head_dim)``; k, v: ``(batch, seq, kv_heads, head_dim)``.
    Returns:
        ``(batch, seq, heads, head_dim)``.
    """
    check_qkv(q, k, v)
    kernel = get_kernel(backend, q.device, q.dtype)
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
