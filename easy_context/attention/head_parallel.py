"""Head parallelism (DeepSpeed-Ulysses), the mechanism Ulysses and USP share: an all-to-all from sequence shards to
head shards around the zigzag ring of ring.py, and back.

:func:`head_parallel_attn` runs Ulysses over one group around the zigzag ring over another (a ring of one rank for
plain Ulysses, which is the local kernel itself). Each rank gathers the whole sequence of its ring position for
``heads / U`` of the heads (one all-to-all for each of q, k, v), runs the ring (or, alone, ordinary local
attention), and scatters the result back to sequence shards (one all-to-all). Exact by construction.

Sinks (one logit per query head) follow the query heads: Ulysses rank ``u`` holds heads ``[u h/U, (u+1) h/U)``
and takes that slice of the (replicated) sink parameter, so its gradient on the other heads is zero there and the
sum over the ranks is the whole sequence's gradient, as for every other parameter.

GQA: kv heads are split like the query heads when ``kv_heads % U == 0``; with fewer kv heads than the
degree (``U % kv_heads == 0``) each kv head is replicated ``U / kv_heads`` times first, so every rank gets
the kv head its query heads use (the replication's backward sums the gradients back).
"""
from __future__ import annotations

import contextlib
import contextvars

import torch

from .comm import (
    SELF_GROUP,
    RingComm,
    group_rank_size,
    head_to_seq,
    head_to_seq_autograd,
    seq_to_head,
    seq_to_head_autograd,
)
from .documents import Documents
from .kernels import Kernel
from .merge import add_sinks, sink_grad
from .ring import check_even, ring_attn, ring_backward, ring_forward

# Set while a kept attention graph is being built (easy_context.memory's attention-preserving checkpointing):
# head_parallel_attn then saves its sequence-sharded inputs, which the recompute provides again, and re-runs the
# all-to-alls in backward, instead of keeping the head-sharded q/k/v/out for the whole step (4 more seq x hidden
# units per layer).
_LEAN: contextvars.ContextVar = contextvars.ContextVar("easy_context_lean_all_to_all", default=False)


@contextlib.contextmanager
def lean_all_to_all():
    """Within this context (this thread) Ulysses/USP save only their sequence-sharded q/k/v/out for backward and
    re-run the all-to-alls there, instead of keeping head-sharded copies: the public switch for callers that keep an
    attention graph for a whole step (easy_context.memory's attention-preserving checkpointing). Same results."""
    token = _LEAN.set(True)
    try:
        yield
    finally:
        _LEAN.reset(token)


def ulysses_kv_replication(heads: int, kv_heads: int, degree: int) -> int:
    """How many times each kv head must be repeated before the head all-to-all (1 = none).

    Raises:
        ValueError: heads not divisible by the degree, or kv heads neither a multiple nor a divisor of it.
    """
    if heads % degree:
        raise ValueError(f"ulysses: {heads} query heads are not divisible by the Ulysses degree {degree}; use a "
                         f"degree that divides the head count (usp_attn with a larger ring_degree, or "
                         f"zigzag_ring_attn)")
    if kv_heads % degree == 0:
        return 1
    if degree % kv_heads == 0:
        return degree // kv_heads
    raise ValueError(f"ulysses: {kv_heads} kv heads cannot be split over degree {degree} (need kv_heads % degree "
                     f"== 0 or degree % kv_heads == 0); choose another degree or ring_degree")


class _LeanUlyssesAttn(torch.autograd.Function):
    """:func:`head_parallel_attn` that saves only its sequence-sharded q/k/v and output (+ the head-sharded lse) and
    re-runs the all-to-alls in backward (inside :func:`lean_all_to_all`)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, causal, scale, kernel, group, ring_group, docs, mods):
        window, softcap, stats = mods
        comm = RingComm(ring_group)
        heads = [seq_to_head(x, group) for x in (q, k, v)]  # (b, s, h/W, d)
        out_h, lse = ring_forward(comm, *heads, causal, scale, kernel, docs, window=window, softcap=softcap,
                                  stats=stats)
        if sinks is not None:  # this rank's heads' sinks (see the module docstring)
            out_h, lse = add_sinks(out_h, lse, sinks)
        out = head_to_seq(out_h.transpose(1, 2).to(q.dtype), group)  # (b, s/W, h, d)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.args = (causal, scale, kernel, group, comm, docs, mods)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        causal, scale, kernel, group, comm, docs, (window, softcap, stats) = ctx.args
        qh, kh, vh, out_h, dout_h = (seq_to_head(x, group) for x in (q, k, v, out, dout.contiguous()))
        grads = ring_backward(comm, dout_h, qh, kh, vh, out_h, lse, causal, scale, kernel, docs, window=window,
                              softcap=softcap, stats=stats)
        dsinks = None if sinks is None else sink_grad(dout_h.transpose(1, 2), out_h.transpose(1, 2), lse, sinks)
        return (*(head_to_seq(g, group) for g in grads), dsinks, None, None, None, None, None, None, None)


def head_parallel_attn(q, k, v, causal: bool, scale: float, kernel: Kernel, group, ring_group=SELF_GROUP,
                       docs: Documents | None = None, *, window: int | None = None, softcap: float = 0.0,
                       sinks: torch.Tensor | None = None, stats: dict | None = None):
    """Ulysses over ``group`` around the zigzag ring over ``ring_group``; no cross-rank checks (callers do them).

    ``(b, s/U, h, d)`` per rank -> all-to-all -> ``(b, s, h/U, d)``: this rank's heads over the sequence of its ring
    position -> the zigzag ring over ``ring_group`` (a group of one: the kernel; one call per document with
    ``docs``, the boundaries over the global sequence) -> all-to-all back. ``window``, ``softcap``, ``sinks`` (all
    ``h`` heads; this rank uses its own), ``stats``: as ring.ring_attn.
    """
    u, w = group_rank_size(group)
    rep = ulysses_kv_replication(q.shape[2], k.shape[2], w)
    if rep > 1:
        # (b, s/W, hkv, d) -> (b, s/W, W, d): kv head j serves query heads [j*h/hkv, (j+1)*h/hkv)
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    check_even(q.shape[1] * w, causal or docs is not None, ring_group, "usp_attn")  # the ring position's zigzag shard
    if sinks is not None and w > 1:
        per = q.shape[2] // w
        sinks = sinks[u * per:(u + 1) * per]  # (h,) -> (h/W,): this rank's heads after the all-to-all
    if w > 1 and _LEAN.get():
        return _LeanUlyssesAttn.apply(q, k, v, sinks, causal, scale, kernel, group, ring_group, docs,
                                      (window, softcap, stats))
    if w > 1:
        # (b, s/W, h, d) -> (b, s, h/W, d)
        q, k, v = (seq_to_head_autograd(x, group) for x in (q, k, v))
    out = ring_attn(q, k, v, causal, scale, kernel, ring_group, docs, window=window, softcap=softcap, sinks=sinks,
                    stats=stats)
    # (b, s, h/W, d) -> (b, s/W, h, d)
    return head_to_seq_autograd(out, group) if w > 1 else out
