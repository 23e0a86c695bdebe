"""Zigzag ring attention: exact causal attention over a sequence split across the ranks of a ring.

Layout: the global sequence is cut into ``2W`` equal chunks; rank ``r`` holds chunks ``r`` and
``2W-1-r`` (concatenated). K/V blocks travel around the ring (send to r+1, receive from r-1) while the
current block is computed, and every step costs the same: the causal work is balanced. The ring itself, its
block plans (which local queries meet which chunk of the travelling block at each step) and the packed-document
schedule are the shared engine in ring.py; this module is the algorithm: its checks and its entry point.
"""
from __future__ import annotations

from .comm import group_rank_size
from .documents import normalize as normalize_docs
from .features import check_features
from .kernels import autocast_inputs, check_qkv, default_scale, get_kernel
from .ring import check_even, check_ring_inputs, ring_attn


@autocast_inputs
def zigzag_ring_attn_func(q, k, v, causal: bool = True, softmax_scale: float | None = None, group=None, *,
                          backend: str | None = None, check: bool = True, cu_seqlens=None, window: int | None = None,
                          softcap: float | None = None, sinks=None, stats: dict | None = None):
    """Exact attention over a zigzag-sharded sequence (see module docstring for the layout).

    Args:
        q: ``(batch, local_seqlen, nheads, head_dim)`` this rank's zigzag shard of the queries.
        k, v: ``(batch, local_seqlen, nheads_kv, head_dim)``; ``nheads % nheads_kv == 0`` (GQA).
        causal: causal attention in *global* positions. softmax_scale: default ``head_dim ** -0.5``.
        group: process group of the ring (None = world). backend: kernel backend (see kernels.py).
        check: run the cross-rank shape check first (one tiny all-gather per call). ``False``: the caller
            guarantees the same shapes and ``cu_seqlens`` on every rank (the ring's message sizes follow from the
            documents; ranks that disagree would post different sizes).
        cu_seqlens: packed documents: the boundaries ``[0, ..., S]`` of the documents in the *global* sequence
            (``S = local_seqlen * world``, padding included), the same on every rank; one list for every batch row or
            one per row. Each token then attends only within its document (documents.py). None: one document.
        window: a sliding window: each query attends at most ``window`` keys, itself included (transformers'
            ``sliding_window``; causal only); blocks outside it cost no kernel call (features.py). None: none.
        softcap: attention logit soft-capping ``softcap * tanh(s / softcap)`` (Gemma 2); None: none.
        sinks: ``(nheads,)`` attention-sink logits (gpt-oss ``s_aux``), differentiable; None: none.
        stats: optional dict; receives ``forward_calls`` / ``backward_calls`` (kernel calls), ``forward_blocks`` /
            ``backward_blocks`` (ring blocks with a call) and ``skipped_blocks`` (forward blocks with none), summed
            over calls.
    Returns:
        ``(batch, local_seqlen, nheads, head_dim)`` in q's dtype.
    Raises:
        ValueError: bad shapes, odd local length (causal or documents), bad ``cu_seqlens``, ``window``, ``softcap``
        or ``sinks``, a backend that cannot apply the window or soft-cap, or ranks that pass different shapes,
        documents or windows.
    """
    world = group_rank_size(group)[1]
    docs = normalize_docs(cu_seqlens, q.shape[0], q.shape[1] * world, "zigzag_ring_attn")
    window, softcap, features = check_features("zigzag_ring_attn", q, causal, q.shape[1] * world, window, softcap,
                                               sinks)
    if check:
        check_ring_inputs(q, k, v, causal, group, "zigzag_ring_attn", docs=docs, window=window)
    else:
        check_qkv(q, k, v)
        check_even(q.shape[1], causal or docs is not None, group, "zigzag_ring_attn")
    kernel = get_kernel(backend, q.device, q.dtype, q.shape[-1], features)
    return ring_attn(q, k, v, causal, default_scale(q.shape[-1], softmax_scale), kernel, group, docs, window=window,
                     softcap=softcap, sinks=sinks, stats=stats)
