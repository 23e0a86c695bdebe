"""The local attention backends: each a ``forward(q, k, v, causal, scale) -> (out, lse)`` and a
``backward(dout, q, k, v, out, lse, causal, scale) -> (dq, dk, dv)`` over ``(batch, heads, seq, head_dim)`` tensors
(see kernels.py for the contract and the table that names them).

math (pure torch, any device and dtype), cuDNN / flash / memory-efficient (PyTorch's fused aten ops, CUDA),
FlashAttention-4 (the optional flash-attn-4 package, sm90/sm100) and the optional flash-attn package.
"""
from __future__ import annotations

import functools
import os
import threading

import torch

# Rows of q processed at once by the math kernel: bounds its score matrix to rows x seq_k.
_MATH_ROW_CHUNK = 2048


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    # (b, hkv, s, d) -> (b, hkv * n_rep, s, d), each kv head repeated for its query-head group
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def sum_kv(dx: torch.Tensor, n_rep: int) -> torch.Tensor:
    # (b, hkv * n_rep, s, d) -> (b, hkv, s, d): gradient of repeat_kv
    if n_rep == 1:
        return dx
    b, h, s, d = dx.shape
    return dx.view(b, h // n_rep, n_rep, s, d).sum(2)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- math (pure torch, any device)
# Score modifications beyond ``causal`` (kernels.py): ``band=(lo, hi)``, query row a of the block sees key row b iff
# ``lo <= a - b <= hi`` (None: unbounded on that side; how a sliding window reaches one ring block, documents.py), and
# ``softcap``: scores ``softcap * tanh(s / softcap)`` (Gemma 2's logit soft-capping; 0: none).
def _math_scores(q, k, scale, causal, row0, band=None, softcap=0.0):
    """Scores of q rows ``[row0, row0 + r)`` of the block against k: ``(scores, t)``, ``t`` the tanh of the capped
    scores (None without ``softcap``), which the backward's chain rule needs."""
    # q: (b, h, r, d) rows [row0, row0 + r) of the block; k: (b, h, sk, d) -> scores (b, h, r, sk)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    t = None
    if softcap:
        t = torch.tanh(s / softcap)
        s = t * softcap
    if causal or band is not None:
        rows = torch.arange(row0, row0 + q.shape[2], device=q.device).unsqueeze(1)
        cols = torch.arange(k.shape[2], device=q.device).unsqueeze(0)
        lo, hi = (0, None) if band is None else band
        drop = torch.zeros(rows.shape[0], cols.shape[1], dtype=torch.bool, device=q.device)
        if lo is not None:
            drop |= rows - cols < lo
        if hi is not None:
            drop |= rows - cols > hi
        s = s.masked_fill(drop, float("-inf"))
    return s, t


def math_forward(q, k, v, causal, scale, band=None, softcap=0.0):
    acc = acc_dtype(q.dtype)
    n_rep = q.shape[1] // k.shape[1]
    qa, ka, va = q.to(acc), repeat_kv(k.to(acc), n_rep), repeat_kv(v.to(acc), n_rep)
    outs, lses = [], []
    for r0 in range(0, q.shape[2], _MATH_ROW_CHUNK):
        s = _math_scores(qa[:, :, r0:r0 + _MATH_ROW_CHUNK], ka, scale, causal, r0, band, softcap)[0]
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.matmul(torch.exp(s - lse.unsqueeze(-1)), va))
        lses.append(lse)
    return torch.cat(outs, 2).to(q.dtype), torch.cat(lses, 2).float() if acc != torch.float64 else torch.cat(lses, 2)


def math_backward(dout, q, k, v, out, lse, causal, scale, band=None, softcap=0.0):
    acc = acc_dtype(q.dtype)
    n_rep = q.shape[1] // k.shape[1]
    qa, ka, va = q.to(acc), repeat_kv(k.to(acc), n_rep), repeat_kv(v.to(acc), n_rep)
    doa, oa, la = dout.to(acc), out.to(acc), lse.to(acc)
    dq = torch.empty_like(qa)
    dk = torch.zeros_like(ka)
    dv = torch.zeros_like(va)
    for r0 in range(0, q.shape[2], _MATH_ROW_CHUNK):
        r1 = r0 + _MATH_ROW_CHUNK
        s, t = _math_scores(qa[:, :, r0:r1], ka, scale, causal, r0, band, softcap)
        p = torch.exp(s - la[:, :, r0:r1].unsqueeze(-1))
        do = doa[:, :, r0:r1]
        dv += torch.matmul(p.transpose(-1, -2), do)
        dp = torch.matmul(do, va.transpose(-1, -2))
        delta = (do * oa[:, :, r0:r1]).sum(-1, keepdim=True)
        ds = p * (dp - delta)
        if t is not None:  # d(softcap * tanh(x / softcap)) / dx = 1 - tanh^2
            ds = ds * (1 - t * t)
        dq[:, :, r0:r1] = torch.matmul(ds, ka) * scale
        dk += torch.matmul(ds.transpose(-1, -2), qa[:, :, r0:r1]) * scale
    return dq.to(q.dtype), sum_kv(dk, n_rep).to(k.dtype), sum_kv(dv, n_rep).to(v.dtype)


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


# cuDNN refuses one query against one key ("s_q = s_kv = 1 is not supported", seen in backward on cuDNN 9.19): such a
# block (a one-token document of a packed row) is one dot product per head, done by the math kernel.
def _cudnn_refuses(q, k) -> bool:
    return q.shape[2] == 1 and k.shape[2] == 1


def cudnn_forward(q, k, v, causal, scale):
    if _cudnn_refuses(q, k):
        return math_forward(q, k, v, causal, scale)
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1 and not _CUDNN_NATIVE_GQA["forward"]:
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    try:
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale)
    except RuntimeError:
        if n_rep == 1 or not _CUDNN_NATIVE_GQA["forward"]:
            raise
        _CUDNN_NATIVE_GQA["forward"] = False
        return cudnn_forward(q, k, v, causal, scale)
    _PLACEHOLDERS[("cudnn", q.device)] = (res[6], res[7], res[2], res[3])  # seed, offset, cum_seq_q/k
    # lse comes back as (b, h, s, 1); keep the (b, h, s) float32 convention
    return res[0], res[1].view(q.shape[0], q.shape[1], q.shape[2]).float()


def in_layout_of(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
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


def cudnn_backward(dout, q, k, v, out, lse, causal, scale):
    if _cudnn_refuses(q, k):
        return math_backward(dout, q, k, v, out, lse, causal, scale)
    n_rep = q.shape[1] // k.shape[1]
    dout, out = in_layout_of(dout, q), in_layout_of(out, q)
    native = n_rep == 1 or _CUDNN_NATIVE_GQA["backward"]
    ke, ve = (k, v) if native else (repeat_kv(k, n_rep), repeat_kv(v, n_rep))
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
        return cudnn_backward(dout, q, k, v, out, lse, causal, scale)
    if native and n_rep > 1 and dk.shape[1] != k.shape[1]:  # returned per query head: sum the groups
        dk, dv = sum_kv(dk, n_rep), sum_kv(dv, n_rep)
    return dq, (dk if native else sum_kv(dk, n_rep)), (dv if native else sum_kv(dv, n_rep))


# ---------------------------------------------------------------- torch flash (aten op, sm80+)
def flash_forward(q, k, v, causal, scale):
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    _PLACEHOLDERS[("flash", q.device)] = (res[6], res[7], res[2], res[3])  # seed, offset, cum_seq_q/k
    return res[0], res[1].float()


def flash_backward(dout, q, k, v, out, lse, causal, scale):
    n_rep = q.shape[1] // k.shape[1]
    ke, ve = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    seed, offset, cum_q, cum_k = _placeholders("flash", q.device)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout, q, ke, ve, out, lse.contiguous(), cum_q, cum_k, q.shape[2], ke.shape[2], 0.0, causal,
        seed, offset, scale=scale)
    return dq, sum_kv(dk, n_rep), sum_kv(dv, n_rep)


# ---------------------------------------------------------------- varlen: many documents in one call
# ``(T, heads, head_dim)`` tokens of documents back to back, ``cu`` ``(N+1,)`` int32 their boundaries; attention only
# within each document (causal: top-left within it). Returns ``out (T, H, D)`` and ``lse (H, T)`` float32 (FA2's
# varlen layout); backward takes the same with the final out/lse.
def _repeat_kv3(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def _sum_kv3(dx: torch.Tensor, n_rep: int) -> torch.Tensor:
    return dx if n_rep == 1 else dx.view(dx.shape[0], dx.shape[1] // n_rep, n_rep, dx.shape[2]).sum(2)


def flash_varlen_forward(q, k, v, cu, max_len, causal, scale):
    n_rep = q.shape[1] // k.shape[1]
    k, v = _repeat_kv3(k, n_rep), _repeat_kv3(v, n_rep)
    out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu, cu, max_len, max_len, 0.0, causal, False, scale=scale)
    _PLACEHOLDERS[("flash_varlen", q.device)] = (seed, offset, seed, offset)  # read only with dropout (never on)
    return out, lse.float().view(q.shape[1], q.shape[0])


def flash_varlen_backward(dout, q, k, v, out, lse, cu, max_len, causal, scale):
    n_rep = q.shape[1] // k.shape[1]
    ke, ve = _repeat_kv3(k, n_rep), _repeat_kv3(v, n_rep)
    seed, offset = _placeholders("flash_varlen", q.device)[:2]
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        dout.contiguous(), q, ke, ve, out.contiguous(), lse.contiguous(), cu, cu, max_len, max_len, 0.0, causal,
        seed, offset, scale=scale)
    return dq, _sum_kv3(dk, n_rep), _sum_kv3(dv, n_rep)


def _per_document(cu):
    bounds = cu.tolist()
    return zip(bounds[:-1], bounds[1:])


def math_varlen_forward(q, k, v, cu, max_len, causal, scale, softcap=0.0):
    """The varlen contract with the math kernel, one document at a time (the CPU reference of the varlen path)."""
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=acc_dtype(q.dtype), device=q.device)
    for a, b in _per_document(cu):
        o, l = math_forward(*(x[a:b].transpose(0, 1)[None] for x in (q, k, v)), causal, scale, softcap=softcap)
        out[a:b] = o[0].transpose(0, 1)
        lse[:, a:b] = l[0]
    return out, lse


def math_varlen_backward(dout, q, k, v, out, lse, cu, max_len, causal, scale, softcap=0.0):
    dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))
    for a, b in _per_document(cu):
        g = math_backward(*(x[a:b].transpose(0, 1)[None] for x in (dout, q, k, v, out)), lse[None, :, a:b], causal,
                          scale, softcap=softcap)
        for d, gx in zip((dq, dk, dv), g):
            d[a:b] = gx[0].transpose(0, 1)
    return dq, dk, dv


# ---------------------------------------------------------------- torch memory-efficient (aten op; takes float32)
# Its lse comes back padded to a multiple of this many rows per head; the backward wants that padded shape back.
_EFFICIENT_LSE_ALIGN = 32


def efficient_forward(q, k, v, causal, scale):
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, None, True, 0.0, causal, scale=scale)
    _PLACEHOLDERS[("efficient", q.device)] = (seed, offset, seed, offset)  # the 4-tuple shape of the others
    return out, lse[:, :, :q.shape[2]].float()


def efficient_backward(dout, q, k, v, out, lse, causal, scale):
    n_rep = q.shape[1] // k.shape[1]
    ke, ve = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    seed, offset = _placeholders("efficient", q.device)[:2]  # read only with dropout, which is never on
    lse = torch.nn.functional.pad(lse.float(), (0, -q.shape[2] % _EFFICIENT_LSE_ALIGN))  # (b, h, s) -> padded, copy
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        dout, q, ke, ve, None, out, lse, seed, offset, 0.0, [True, True, True, False], causal, scale=scale)
    return dq, sum_kv(dk, n_rep), sum_kv(dv, n_rep)


# ---------------------------------------------------------------- flash-attn package (optional)
def flash_attn_module():
    try:
        from flash_attn import flash_attn_interface  # noqa: PLC0415 - optional dependency
    except ImportError as e:
        raise ImportError("backend 'flash_attn' needs the flash-attn package: pip install 'easy-context[flash]' "
                          "(or use backend='cudnn'/'flash', which need only PyTorch)") from e
    return flash_attn_interface


def flash_attn_forward(q, k, v, causal, scale):
    fa = flash_attn_module()
    # flash-attn wants (b, s, h, d); our (b, h, s, d) views of that layout transpose back for free
    out, lse, _ = fa.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                      softmax_scale=scale, causal=causal, return_attn_probs=True)
    return out.transpose(1, 2), lse.float()


def flash_attn_backward(dout, q, k, v, out, lse, causal, scale):
    fa = flash_attn_module()
    t = (lambda x: x.transpose(1, 2))  # noqa: E731
    dq, dk, dv = (torch.empty_like(t(x)) for x in (q, k, v))
    # flash-attn >= 2.6 signature (dropout 0, no window, no softcap, no alibi, deterministic off)
    fa.flash_attn_backward(t(dout), t(q), t(k), t(v), t(out), lse.contiguous(), dq, dk, dv, 0.0, scale,
                            causal, -1, -1, 0.0, None, False, None)
    return t(dq), t(dk), t(dv)


# ---------------------------------------------------------------- FlashAttention-4 (optional flash-attn-4, sm90/sm100)
# flash_attn.cute: CuTe-DSL kernels compiled just in time (4-8 s per new configuration on the H200: dtype, head dim,
# GQA ratio, causal, dense or varlen; not the lengths). Its lse-returning low-level entry points take the flash
# layout (b, s, h, d) with a unit last stride, which our (b, h, s, d) views of flash-layout memory transpose back to
# for free, and return lse as (b, h, s) float32 (varlen: (h, tokens)), our convention: no layout copies. GQA is native
# (dk/dv come back with kv heads).
FA4_INSTALL = "pip install 'easy-context[fa4]'"
# FA4 keeps compiled kernels on disk when this variable is "1" (read once, when flash_attn.cute is first imported).
# easy_context turns it on unless the environment says otherwise, so a configuration compiles once per machine, not
# once per process; the cache lives in $FLASH_ATTENTION_CUTE_DSL_CACHE_DIR (default /tmp/$USER/...).
FA4_DISK_CACHE = "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"


# FA4's just-in-time compiler keeps per-process state that two threads compiling at once corrupt (seen on the H200:
# TypeError inside cutlass_dsl when the simulated world's rank threads met a new configuration together), so calls
# from several threads take turns (uncontended in a training process: one thread runs the kernels).
_FA4_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def fa4_interface():
    """``flash_attn.cute.interface``, imported on first use (with FA4's on-disk kernel cache on unless
    ``FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED`` is set). Raises ImportError naming the install otherwise."""
    os.environ.setdefault(FA4_DISK_CACHE, "1")
    try:
        from flash_attn.cute import interface  # noqa: PLC0415 - optional dependency
    except Exception as e:  # noqa: BLE001 - ImportError, or a CUDA/DSL library that fails to load
        raise ImportError(f"backend 'fa4' needs FlashAttention-4: {FA4_INSTALL} (flash-attn-4 and "
                          f"nvidia-cutlass-dsl; see the README for the CUDA build), or use backend='cudnn', which "
                          f"needs only PyTorch ({type(e).__name__}: {e})") from e
    return interface


def fa4_window(band, seqlen_q: int, seqlen_k: int) -> dict:
    """FA4's ``window_size_left`` / ``window_size_right`` for a block's ``band`` (kernels.py): keyword arguments of
    ``_flash_attn_fwd`` / ``_flash_attn_bwd`` (empty without a band).

    FA4 aligns a window bottom-right (flash_attn/cute/mask.py): query row ``a`` sees key row ``b`` iff
    ``a + sk - sq - left <= b <= a + sk - sq + right`` (``sq``, ``sk`` the block's query and key rows; None: unbounded
    on that side), i.e. ``sq - sk - right <= a - b <= sq - sk + left``. The band ``lo <= a - b <= hi`` is so
    ``right = sq - sk - lo`` and ``left = hi - (sq - sk)``. A ring block's band comes from global offsets (a query
    at global index ``i``, a key at ``j``, window ``w``: ``0 <= i - j <= w - 1``, shifted by the block's first
    query and key, documents.py), and the planner trims the rows no pair reaches, so the last query row sees the
    last key row or a later one (``right >= 0``) and the last query row's window reaches a key of the block
    (``left >= 0``); a negative value would mean "unbounded" to FA4 (both -1) and is refused here.
    """
    if band is None:
        return {}
    lo, hi = band
    right = None if lo is None else seqlen_q - seqlen_k - lo
    left = None if hi is None else hi - (seqlen_q - seqlen_k)
    if (right is not None and right < 0) or (left is not None and left < 0):
        raise ValueError(f"fa4: band {band} of a {seqlen_q} x {seqlen_k} block leaves rows without keys (window "
                         f"left {left}, right {right}); trim the block's rows first (documents.plan_block does)")
    return {"window_size_left": left, "window_size_right": right}


def fa4_forward(q, k, v, causal, scale, band=None, softcap=0.0):
    t = (lambda x: x.transpose(1, 2))  # noqa: E731 - (b, h, s, d) view <-> (b, s, h, d) memory
    extra = fa4_window(band, q.shape[2], k.shape[2])
    if softcap:
        extra["softcap"] = softcap
    with _FA4_LOCK:
        out, lse = fa4_interface()._flash_attn_fwd(t(q), t(k), t(v), softmax_scale=scale, causal=causal,
                                                   return_lse=True, **extra)[:2]
    return t(out), lse


def fa4_backward(dout, q, k, v, out, lse, causal, scale, band=None, softcap=0.0):
    t = (lambda x: x.transpose(1, 2))  # noqa: E731
    extra = fa4_window(band, q.shape[2], k.shape[2])
    with _FA4_LOCK:
        dq, dk, dv = fa4_interface()._flash_attn_bwd(t(q), t(k), t(v), t(out), t(dout), lse, scale, causal,
                                                     softcap=float(softcap), **extra)[:3]
    return t(dq), t(dk), t(dv)


def fa4_varlen_forward(q, k, v, cu, max_len, causal, scale, softcap=0.0):
    extra = {"softcap": softcap} if softcap else {}
    with _FA4_LOCK:
        out, lse = fa4_interface()._flash_attn_fwd(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                                                   max_seqlen_k=max_len, softmax_scale=scale, causal=causal,
                                                   return_lse=True, **extra)[:2]
    return out, lse


def fa4_varlen_backward(dout, q, k, v, out, lse, cu, max_len, causal, scale, softcap=0.0):
    with _FA4_LOCK:
        return fa4_interface()._flash_attn_bwd(q, k, v, out, dout, lse, scale, causal, softcap=float(softcap),
                                               cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                                               max_seqlen_k=max_len)[:3]
