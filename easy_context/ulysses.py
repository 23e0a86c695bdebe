"""DeepSpeed-Ulysses attention: all-to-all from sequence shards to head shards and back.

Layout: contiguous shards (rank r holds chunk r of W). Inside the function each rank gathers the whole
sequence for ``heads / W`` of the heads (one all-to-all for each of q, k, v), runs ordinary local
attention, and scatters the result back to sequence shards (one all-to-all). Exact by construction.

GQA: kv heads are split like the query heads when ``kv_heads % W == 0``; with fewer kv heads than the
degree (``W % kv_heads == 0``) each kv head is replicated ``W / kv_heads`` times first, so every rank gets
the kv head its query heads use (the replication's backward sums the gradients back).
"""
from __future__ import annotations


from .comm import HeadToSeq, SeqToHead, group_rank_size
from .kernels import check_qkv, local_attn_func
from .zigzag_ring import check_ring_inputs


def ulysses_kv_replication(heads: int, kv_heads: int, degree: int) -> int:
    """How many times each kv head must be repeated before the head all-to-all (1 = none).

    Raises:
        ValueError: heads not divisible by the degree, or kv heads neither a multiple nor a divisor of it.
    """
    if heads % degree:
        raise ValueError(f"ulysses: {heads} query heads are not divisible by the Ulysses degree {degree}; use a "
                         f"degree that divides the head count (usp_attn with a larger ring_degree, or zigzag_ring_attn)")
    if kv_heads % degree == 0:
        return 1
    if degree % kv_heads == 0:
        return degree // kv_heads
    raise ValueError(f"ulysses: {kv_heads} kv heads cannot be split over degree {degree} (need kv_heads % degree "
                     f"== 0 or degree % kv_heads == 0); choose another degree or ring_degree")


def ulysses_attn_func(q, k, v, causal: bool = True, softmax_scale: float | None = None, group=None, *,
                      backend: str | None = None, check: bool = True, _inner=None):
    """Exact attention over a contiguously sharded sequence by head all-to-all (DeepSpeed-Ulysses).

    Args:
        q: ``(batch, local_seqlen, nheads, head_dim)``; k, v: ``(batch, local_seqlen, nheads_kv, head_dim)``.
        causal, softmax_scale, group, backend, check: as :func:`zigzag_ring_attn_func`.
    Returns:
        ``(batch, local_seqlen, nheads, head_dim)``.
    Raises:
        ValueError: heads not divisible by the group size (see :func:`ulysses_kv_replication`), or ranks that
        disagree on shapes.
    """
    if check:
        check_ring_inputs(q, k, v, causal, group, "ulysses_attn", zigzag=False)
    else:
        check_qkv(q, k, v)
    _, w = group_rank_size(group)
    rep = ulysses_kv_replication(q.shape[2], k.shape[2], w)
    if rep > 1:
        # (b, s/W, hkv, d) -> (b, s/W, W, d): kv head j serves query heads [j*h/hkv, (j+1)*h/hkv)
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    if w > 1:
        # (b, s/W, h, d) -> (b, s, h/W, d)
        q, k, v = SeqToHead.apply(q, group), SeqToHead.apply(k, group), SeqToHead.apply(v, group)
    if _inner is None:
        out = local_attn_func(q, k, v, causal, softmax_scale, backend=backend)
    else:
        out = _inner(q, k, v)
    # (b, s, h/W, d) -> (b, s/W, h, d)
    return HeadToSeq.apply(out, group) if w > 1 else out
