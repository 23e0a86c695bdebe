"""Zigzag ring attention: exact causal attention over a sequence split across the ranks of a ring.

Layout: the global sequence is cut into ``2W`` equal chunks; rank ``r`` holds chunks ``r`` and
``2W-1-r`` (concatenated). K/V blocks travel around the ring (send to r+1, receive from r-1) while the
current block is computed, and every step costs the same: the causal work is balanced.

At step ``s`` rank ``r`` holds the K/V of rank ``src = (r - s) mod W``:

* ``s == 0``: own block, causal (top-left causal over the 2-chunk local block is exact for this layout);
* ``src < r``: all local queries attend the *first* chunk of the K/V block (chunk ``src`` < ``r``);
* ``src > r``: only the *second* local query chunk (``2W-1-r``) attends, to the whole K/V block.

Non-causal attention sees every key from every query, so it needs no layout and serves any sharding.
Backward re-runs the ring; dK/dV (float32) travel with the K/V block and reach its owner after W steps.
"""
from __future__ import annotations

import torch

from .comm import RingComm, check_same_across_group, dtype_code, group_rank_size
from .kernels import Kernel, check_qkv, default_scale, get_kernel
from .kernels import head_major as _t  # (b, s, h, d) <-> (b, h, s, d) views
from .merge import merge_into, new_accumulators


def block_plan(rank: int, src: int, causal: bool, local_len: int):
    """Which local query rows attend which rows of the K/V block of ``src`` at one ring step.

    Returns ``(q_rows, kv_rows, block_causal)`` as slices of the local sequence (length ``local_len``).
    """
    c = local_len // 2
    full = slice(0, local_len)
    if not causal:
        return full, full, False
    if src == rank:
        return full, full, True
    if src < rank:
        return full, slice(0, c), False
    return slice(c, local_len), full, False


def ring_forward(comm: RingComm, q, k, v, causal: bool, scale: float, kernel: Kernel):
    """Forward ring. q/k/v are flash-layout ``(b, s, h, d)``. Returns ``(out (b,h,s,d) view, lse (b,h,s))``."""
    if comm.world == 1:  # one block: the kernel's own output, no float32 accumulator
        return kernel.forward(_t(q), _t(k), _t(v), causal, scale)
    out, lse = new_accumulators(_t(q))
    kv = [k, v]
    for step in range(comm.world):
        pending = comm.shift(kv) if step + 1 < comm.world else None  # overlap: next block in flight
        qs, ks, causal_blk = block_plan(comm.rank, (comm.rank - step) % comm.world, causal, q.shape[1])
        o, l = kernel.forward(_t(q)[:, :, qs], _t(kv[0])[:, :, ks], _t(kv[1])[:, :, ks], causal_blk, scale)
        merge_into(out[:, :, qs], lse[:, :, qs], o, l)
        if pending is not None:
            kv = pending.wait()
    return out, lse


def ring_backward(comm: RingComm, dout, q, k, v, out, lse, causal: bool, scale: float, kernel: Kernel):
    """Backward ring with the final ``out``/``lse``. All tensors flash layout except lse ``(b, h, s)``."""
    if comm.world == 1:  # one block: the kernel's own gradients, no float32 accumulators
        g = kernel.backward(_t(dout), _t(q), _t(k), _t(v), _t(out), lse, causal, scale)
        return tuple(x.transpose(1, 2) for x in g)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv = [k, v]
    dkv = None          # float32 dK/dV of the block currently held, accumulated along the ring
    dkv_pending = None  # dK/dV of the next block, arriving from the previous rank
    for step in range(comm.world):
        kv_pending = comm.shift(kv) if step + 1 < comm.world else None
        qs, ks, causal_blk = block_plan(comm.rank, (comm.rank - step) % comm.world, causal, q.shape[1])
        dq_b, dk_b, dv_b = kernel.backward(_t(dout)[:, :, qs], _t(q)[:, :, qs], _t(kv[0])[:, :, ks],
                                           _t(kv[1])[:, :, ks], _t(out)[:, :, qs], lse[:, :, qs], causal_blk, scale)
        _t(dq)[:, :, qs] += dq_b
        if dkv_pending is None:
            dkv = [torch.zeros(k.shape, dtype=acc, device=k.device), torch.zeros(v.shape, dtype=acc, device=v.device)]
        else:
            dkv = dkv_pending.wait()
        _t(dkv[0])[:, :, ks] += dk_b
        _t(dkv[1])[:, :, ks] += dv_b
        # pass the block's gradient on with the block; after the last step it arrives at the owner
        dkv_pending = comm.shift(dkv) if comm.world > 1 else None
        if kv_pending is not None:
            kv = kv_pending.wait()
    if dkv_pending is not None:
        dkv = dkv_pending.wait()
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class _ZigzagRingAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, kernel, comm):
        out, lse = ring_forward(comm, q, k, v, causal, scale, kernel)
        out = out.transpose(1, 2).to(q.dtype)  # (b, s, h, d)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale, ctx.kernel, ctx.comm = causal, scale, kernel, comm
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(ctx.comm, dout.contiguous(), q, k, v, out, lse, ctx.causal, ctx.scale, ctx.kernel)
        return dq, dk, dv, None, None, None, None


def check_ring_inputs(q, k, v, causal, group, what, *, zigzag: bool = True):
    """Cross-rank check first (one small all-gather, before any p2p), then local shape checks.

    The cross-rank check comes first so that a shape problem on one rank is raised on every rank
    instead of leaving the others waiting in a collective.
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"{what}: q and k must be 4-D (batch, seq, heads, head_dim); got {tuple(q.shape)}, {tuple(k.shape)}")
    b, s, h, d = q.shape
    check_same_across_group(dict(batch=b, local_seqlen=s, heads=h, kv_heads=k.shape[2], head_dim=d,
                                 kv_seqlen=k.shape[1], dtype=dtype_code(q.dtype), causal=int(causal)),
                            group, q.device, what)
    check_qkv(q, k, v)
    if zigzag:
        check_even(q.shape[1], causal, group, what)


def check_even(local_len: int, causal, group, what):
    """A causal zigzag shard is two equal chunks: the local length must be even (local check)."""
    if causal and local_len % 2 and group_rank_size(group)[1] > 1:
        raise ValueError(f"{what}: the local sequence length {local_len} must be even (two zigzag chunks per "
                         f"rank); the global length must be a multiple of 2*world_size — pad the batch or use "
                         f"prepare_seq_parallel_inputs, which pads automatically")


def ring_attn(q, k, v, causal: bool, scale: float, kernel: Kernel, group=None):
    """The zigzag ring over ``group`` without the checks of :func:`zigzag_ring_attn_func` (a building block: USP
    runs it inside Ulysses). A group of one is the kernel itself."""
    return _ZigzagRingAttn.apply(q, k, v, causal, scale, kernel, RingComm(group))


def zigzag_ring_attn_func(q, k, v, causal: bool = True, softmax_scale: float | None = None, group=None, *,
                          backend: str | None = None, check: bool = True):
    """Exact attention over a zigzag-sharded sequence (see module docstring for the layout).

    Args:
        q: ``(batch, local_seqlen, nheads, head_dim)`` this rank's zigzag shard of the queries.
        k, v: ``(batch, local_seqlen, nheads_kv, head_dim)``; ``nheads % nheads_kv == 0`` (GQA).
        causal: causal attention in *global* positions. softmax_scale: default ``head_dim ** -0.5``.
        group: process group of the ring (None = world). backend: kernel backend (see kernels.py).
        check: run the cross-rank shape check first (one tiny all-gather per call).
    Returns:
        ``(batch, local_seqlen, nheads, head_dim)`` in q's dtype.
    Raises:
        ValueError: bad shapes, odd local length (causal), or ranks that pass different shapes.
    """
    if check:
        check_ring_inputs(q, k, v, causal, group, "zigzag_ring_attn")
    else:
        check_qkv(q, k, v)
        check_even(q.shape[1], causal, group, "zigzag_ring_attn")
    return ring_attn(q, k, v, causal, default_scale(q.shape[-1], softmax_scale), get_kernel(backend, q.device, q.dtype),
                     group)
