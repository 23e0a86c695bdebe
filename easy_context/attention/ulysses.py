"""DeepSpeed-Ulysses attention: all-to-all from sequence shards to head shards and back.

Layout: contiguous shards (rank r holds chunk r of W). Inside the function each rank gathers the whole
sequence for ``heads / W`` of the heads, runs ordinary local attention, and scatters the result back to sequence
shards: :func:`head_parallel.head_parallel_attn` over the group around a ring of one rank (the mechanism, shared
with USP; its docstring has the GQA kv-head replication). Exact by construction.
"""
from __future__ import annotations

from .comm import group_rank_size
from .documents import normalize as normalize_docs
from .features import check_features
from .head_parallel import head_parallel_attn
from .kernels import autocast_inputs, check_qkv, default_scale, get_kernel
from .ring import check_ring_inputs


@autocast_inputs
def ulysses_attn_func(q, k, v, causal: bool = True, softmax_scale: float | None = None, group=None, *,
                      backend: str | None = None, check: bool = True, cu_seqlens=None, window: int | None = None,
                      softcap: float | None = None, sinks=None, stats: dict | None = None):
    """Exact attention over a contiguously sharded sequence by head all-to-all (DeepSpeed-Ulysses).

    Args:
        q: ``(batch, local_seqlen, nheads, head_dim)``; k, v: ``(batch, local_seqlen, nheads_kv, head_dim)``.
        causal, softmax_scale, group, backend, check, cu_seqlens, window, softcap, sinks, stats: as
            :func:`zigzag_ring_attn_func`. Every rank attends over the whole sequence for its heads, so packed
            documents cost each rank the same, and a window goes straight to the kernel (one banded call per
            document).
    Returns:
        ``(batch, local_seqlen, nheads, head_dim)``.
    Raises:
        ValueError: heads not divisible by the group size (see :func:`head_parallel.ulysses_kv_replication`), or
        ranks that disagree on shapes.
    """
    seq_len = q.shape[1] * group_rank_size(group)[1]
    docs = normalize_docs(cu_seqlens, q.shape[0], seq_len, "ulysses_attn")
    window, softcap, features = check_features("ulysses_attn", q, causal, seq_len, window, softcap, sinks)
    if check:
        check_ring_inputs(q, k, v, causal, group, "ulysses_attn", zigzag=False, docs=docs, window=window)
    else:
        check_qkv(q, k, v)
    return head_parallel_attn(q, k, v, causal, default_scale(q.shape[-1], softmax_scale),
                              get_kernel(backend, q.device, q.dtype, q.shape[-1], features), group, docs=docs,
                              window=window, softcap=softcap, sinks=sinks, stats=stats)
