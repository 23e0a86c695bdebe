"""USP (unified sequence parallelism): Ulysses inside groups of ``W / ring_degree`` ranks, zigzag ring
across them.

Group rank ``g * U + u`` (``U`` = Ulysses degree, ``R`` = ring degree) is Ulysses rank ``u`` of ring
position ``g``. The sequence is cut into ``2R`` zigzag chunks; ring position ``g`` owns chunks ``g`` and
``2R-1-g`` (concatenated), and Ulysses rank ``u`` holds the ``u``-th of ``U`` contiguous pieces of that
concatenation (see layouts.py). The Ulysses all-to-all rebuilds ring position g's zigzag shard with
``heads / U`` heads, the zigzag ring runs over the R positions, and the inverse all-to-all returns the
output to sequence shards (head_parallel.py: the mechanism, shared with Ulysses). Causal work is balanced: every
ring step costs the same, and the Ulysses ranks of one position split the heads evenly.
"""
from __future__ import annotations

from .comm import get_usp_groups, group_rank_size
from .documents import normalize as normalize_docs
from .features import check_features
from .head_parallel import head_parallel_attn
from .kernels import autocast_inputs, default_scale, get_kernel
from .ring import check_ring_inputs


@autocast_inputs
def usp_attn_func(q, k, v, causal: bool = True, softmax_scale: float | None = None, group=None, *,
                  ring_degree: int | None = None, backend: str | None = None, check: bool = True, cu_seqlens=None,
                  window: int | None = None, softcap: float | None = None, sinks=None, stats: dict | None = None):
    """Exact attention over a USP-sharded sequence (Ulysses x zigzag ring).

    Args:
        q: ``(batch, local_seqlen, nheads, head_dim)``; k, v: ``(batch, local_seqlen, nheads_kv, head_dim)``.
        ring_degree: ranks in the ring dimension (must divide the group size; default: see
            :func:`easy_context.attention.comm.usp_degrees`). The Ulysses degree is ``group size / ring_degree``
            and must divide the query heads. Use the same value for sharding (``shard_sequence``).
        causal, softmax_scale, group, backend, check, cu_seqlens, window, softcap, sinks, stats: as
            :func:`zigzag_ring_attn_func` (``stats``: this rank's ring over the ring positions).
    Returns:
        ``(batch, local_seqlen, nheads, head_dim)``.
    """
    seq_len = q.shape[1] * group_rank_size(group)[1]
    docs = normalize_docs(cu_seqlens, q.shape[0], seq_len, "usp_attn")
    window, softcap, features = check_features("usp_attn", q, causal, seq_len, window, softcap, sinks)
    if check:  # over the whole group, before the sub-group collectives, so a mismatch fails everywhere
        check_ring_inputs(q, k, v, causal, group, "usp_attn", zigzag=False, docs=docs, window=window)
    uly_group, ring_group, _, _ = get_usp_groups(group, ring_degree)
    return head_parallel_attn(q, k, v, causal, default_scale(q.shape[-1], softmax_scale),
                              get_kernel(backend, q.device, q.dtype, q.shape[-1], features), uly_group, ring_group,
                              docs, window=window, softcap=softcap, sinks=sinks, stats=stats)
