"""Zigzag ring attention: exact causal attention over a sequence split across the ranks of a ring.

Layout: the global sequence is cut into ``2W`` equal chunks; rank ``r`` holds chunks ``r`` and
``2W-1-r`` (concatenated). K/V blocks travel around the ring (send to r+1, receive from r-1) while the
current block is computed, and every step costs the same: the causal work is balanced.

At step ``s`` rank ``r`` holds the K/V of rank ``src = (r - s) mod W``:

* ``s == 0``: own block, causal (top-left causal over the 2-chunk local block is exact for this layout);
* ``src < r``: all local queries attend the *first* chunk of the K/V block (chunk ``src`` < ``r``);
* ``src > r``: only the *second* local query chunk (``2W-1-r``) attends, to the whole K/V block.

Non-causal attention sees every key from every query, so it needs no layout and serves any sharding.

Packed documents (``cu_seqlens``): each block computes only the pairs within a document, with the same loop
(documents.py plans the kernel calls; a block with no overlap costs no kernel call). The layout stays zigzag.
Backward re-runs the ring; dK/dV (float32) travel with the K/V block and reach its owner after W steps.
"""
from __future__ import annotations

import functools

import torch

from .comm import RingComm, check_same_across_group, dtype_code, group_rank_size
from .documents import Documents, Segment, key as docs_key, normalize as normalize_docs, plan_block, zigzag_runs
from .kernels import Kernel, autocast_inputs, check_qkv, default_scale, get_kernel
from .kernels import head_major as _t  # (b, s, h, d) <-> (b, h, s, d) views
from .merge import merge_into, new_accumulators


@functools.lru_cache(maxsize=1024)
def block_calls(rank: int, src: int, world: int, local_len: int, causal: bool, docs: Documents | None):
    """The kernel calls of the block of ring position ``src`` at ``rank``: ``((batch_rows, segments), ...)``.

    Documents (packed rows) or not, the calls come from :func:`documents.plan_block` over the zigzag runs of the
    two positions; without documents each row is one document, which gives the classic plan (own block causal,
    an earlier rank's block: all queries x its first chunk, a later rank's: the second query chunk x all keys).
    Non-causal attention without documents needs no layout: every query sees every key.
    """
    full = slice(0, local_len)
    if docs is None and not causal:
        return ((slice(None), (Segment(full, full, False),)),)
    q_runs, k_runs = zigzag_runs(rank, world, local_len), zigzag_runs(src, world, local_len)
    rows = docs if docs is not None else ((0, local_len * world),)
    if len(set(rows)) == 1:
        return ((slice(None), plan_block(q_runs, k_runs, rows[0], causal, src == rank)),)
    return tuple((slice(b, b + 1), plan_block(q_runs, k_runs, bounds, causal, src == rank))
                 for b, bounds in enumerate(rows))


def _single_call(comm: RingComm, causal: bool, local_len: int, docs) -> bool:
    """One rank and one document per row: the block is one kernel call over everything."""
    full = slice(0, local_len)
    return comm.world == 1 and block_calls(0, 0, 1, local_len, causal, docs) == (
        (slice(None), (Segment(full, full, causal),)),)


def ring_forward(comm: RingComm, q, k, v, causal: bool, scale: float, kernel: Kernel, docs: Documents | None = None):
    """Forward ring. q/k/v are flash-layout ``(b, s, h, d)``. Returns ``(out (b,h,s,d) view, lse (b,h,s))``.

    ``docs``: the document boundaries of each batch row over the ring's global sequence (None: one document)."""
    if _single_call(comm, causal, q.shape[1], docs):  # the kernel's own output, no float32 accumulator
        return kernel.forward(_t(q), _t(k), _t(v), causal, scale)
    out, lse = new_accumulators(_t(q))
    kv = [k, v]
    for step in range(comm.world):
        pending = comm.shift(kv) if step + 1 < comm.world else None  # overlap: next block in flight
        src = (comm.rank - step) % comm.world
        qh, kh, vh = _t(q), _t(kv[0]), _t(kv[1])
        for rows, segments in block_calls(comm.rank, src, comm.world, q.shape[1], causal, docs):
            for sg in segments:
                o, l = kernel.forward(qh[rows, :, sg.q], kh[rows, :, sg.k], vh[rows, :, sg.k], sg.causal, scale)
                merge_into(out[rows, :, sg.q], lse[rows, :, sg.q], o, l)
        if pending is not None:
            kv = pending.wait()
    return out, lse


def ring_backward(comm: RingComm, dout, q, k, v, out, lse, causal: bool, scale: float, kernel: Kernel,
                  docs: Documents | None = None):
    """Backward ring with the final ``out``/``lse``. All tensors flash layout except lse ``(b, h, s)``."""
    if _single_call(comm, causal, q.shape[1], docs):  # the kernel's own gradients, no float32 accumulators
        g = kernel.backward(_t(dout), _t(q), _t(k), _t(v), _t(out), lse, causal, scale)
        return tuple(x.transpose(1, 2) for x in g)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv = [k, v]
    dkv = None          # float32 dK/dV of the block currently held, accumulated along the ring
    dkv_pending = None  # dK/dV of the next block, arriving from the previous rank
    doh, qh, oh, dqh = _t(dout), _t(q), _t(out), _t(dq)
    for step in range(comm.world):
        kv_pending = comm.shift(kv) if step + 1 < comm.world else None
        src = (comm.rank - step) % comm.world
        kh, vh = _t(kv[0]), _t(kv[1])
        grads = []  # (rows, key rows, dk, dv) of this block, added once its accumulated dK/dV has arrived
        for rows, segments in block_calls(comm.rank, src, comm.world, q.shape[1], causal, docs):
            for sg in segments:
                dq_b, dk_b, dv_b = kernel.backward(doh[rows, :, sg.q], qh[rows, :, sg.q], kh[rows, :, sg.k],
                                                   vh[rows, :, sg.k], oh[rows, :, sg.q], lse[rows, :, sg.q],
                                                   sg.causal, scale)
                dqh[rows, :, sg.q] += dq_b
                grads.append((rows, sg.k, dk_b, dv_b))
        if dkv_pending is None:
            dkv = [torch.zeros(k.shape, dtype=acc, device=k.device), torch.zeros(v.shape, dtype=acc, device=v.device)]
        else:
            dkv = dkv_pending.wait()
        for rows, ks, dk_b, dv_b in grads:
            _t(dkv[0])[rows, :, ks] += dk_b
            _t(dkv[1])[rows, :, ks] += dv_b
        del grads
        # pass the block's gradient on with the block; after the last step it arrives at the owner
        dkv_pending = comm.shift(dkv) if comm.world > 1 else None
        if kv_pending is not None:
            kv = kv_pending.wait()
    if dkv_pending is not None:
        dkv = dkv_pending.wait()
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class _ZigzagRingAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, kernel, comm, docs):
        out, lse = ring_forward(comm, q, k, v, causal, scale, kernel, docs)
        out = out.transpose(1, 2).to(q.dtype)  # (b, s, h, d)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale, ctx.kernel, ctx.comm, ctx.docs = causal, scale, kernel, comm, docs
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(ctx.comm, dout.contiguous(), q, k, v, out, lse, ctx.causal, ctx.scale, ctx.kernel,
                                   ctx.docs)
        return dq, dk, dv, None, None, None, None, None


def check_ring_inputs(q, k, v, causal, group, what, *, zigzag: bool = True, docs: Documents | None = None):
    """Cross-rank check first (one small all-gather, before any p2p), then local shape checks.

    The cross-rank check comes first so that a shape problem on one rank is raised on every rank
    instead of leaving the others waiting in a collective.
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"{what}: q and k must be 4-D (batch, seq, heads, head_dim); got {tuple(q.shape)}, {tuple(k.shape)}")
    b, s, h, d = q.shape
    check_same_across_group(dict(batch=b, local_seqlen=s, heads=h, kv_heads=k.shape[2], head_dim=d,
                                 kv_seqlen=k.shape[1], dtype=dtype_code(q.dtype), causal=int(causal),
                                 documents=docs_key(docs)),
                            group, q.device, what)
    check_qkv(q, k, v)
    if zigzag:
        check_even(q.shape[1], causal or docs is not None, group, what)


def check_even(local_len: int, zigzag, group, what):
    """A zigzag shard (causal, or packed documents) is two equal chunks: the local length must be even (local
    check)."""
    if zigzag and local_len % 2 and group_rank_size(group)[1] > 1:
        raise ValueError(f"{what}: the local sequence length {local_len} must be even (two zigzag chunks per "
                         f"rank); the global length must be a multiple of 2*world_size — pad the batch or use "
                         f"prepare_seq_parallel_inputs, which pads automatically")


def ring_attn(q, k, v, causal: bool, scale: float, kernel: Kernel, group=None, docs: Documents | None = None):
    """The zigzag ring over ``group`` without the checks of :func:`zigzag_ring_attn_func` (a building block: USP
    runs it inside Ulysses). A group of one is the kernel itself (one call per document with ``docs``)."""
    return _ZigzagRingAttn.apply(q, k, v, causal, scale, kernel, RingComm(group), docs)


@autocast_inputs
def zigzag_ring_attn_func(q, k, v, causal: bool = True, softmax_scale: float | None = None, group=None, *,
                          backend: str | None = None, check: bool = True, cu_seqlens=None):
    """Exact attention over a zigzag-sharded sequence (see module docstring for the layout).

    Args:
        q: ``(batch, local_seqlen, nheads, head_dim)`` this rank's zigzag shard of the queries.
        k, v: ``(batch, local_seqlen, nheads_kv, head_dim)``; ``nheads % nheads_kv == 0`` (GQA).
        causal: causal attention in *global* positions. softmax_scale: default ``head_dim ** -0.5``.
        group: process group of the ring (None = world). backend: kernel backend (see kernels.py).
        check: run the cross-rank shape check first (one tiny all-gather per call).
        cu_seqlens: packed documents: the boundaries ``[0, ..., S]`` of the documents in the *global* sequence
            (``S = local_seqlen * world``, padding included), the same on every rank; one list for every batch row or
            one per row. Each token then attends only within its document (documents.py). None: one document.
    Returns:
        ``(batch, local_seqlen, nheads, head_dim)`` in q's dtype.
    Raises:
        ValueError: bad shapes, odd local length (causal or documents), bad ``cu_seqlens``, or ranks that pass
        different shapes or documents.
    """
    world = group_rank_size(group)[1]
    docs = normalize_docs(cu_seqlens, q.shape[0], q.shape[1] * world, "zigzag_ring_attn")
    if check:
        check_ring_inputs(q, k, v, causal, group, "zigzag_ring_attn", docs=docs)
    else:
        check_qkv(q, k, v)
        check_even(q.shape[1], causal or docs is not None, group, "zigzag_ring_attn")
    return ring_attn(q, k, v, causal, default_scale(q.shape[-1], softmax_scale), get_kernel(backend, q.device, q.dtype),
                     group, docs)
