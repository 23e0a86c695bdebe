"""DistFlashAttn (LightSeq) attention: contiguous shards, causal work balanced by helping.

Layout: rank ``r`` holds chunk ``r`` of ``W`` equal contiguous chunks. Causal attention needs the block
pairs ``(i, j)``, ``j <= i`` (queries of chunk i, keys of chunk j). Plain ring attention would give
rank ``W-1`` ``W`` blocks and rank 0 one. Here the pairs at distance ``t`` and ``W-t`` are done in the
same step ``t`` (``1 <= t <= W/2``):

* distance ``t``: pair ``(r, r-t)`` on the query owner ``r >= t``, which receives K/V of rank ``r-t``;
* distance ``W-t`` (``t < W-t``): pair ``(r+W-t, r)`` on the K/V owner ``r < t``, which would otherwise be
  idle; it receives the queries of rank ``r+W-t`` and sends back the partial ``(out, lse)``.

So in step ``t`` every rank sends one thing to ``(r+t) mod W`` (K/V if ``r+t < W`` else its queries) and
gets results back from there, and every rank computes exactly one block (only the ranks ``>= W/2`` in
the last step when W is even). Per rank: ``1 + floor((W-1)/2) + [W even]`` blocks, at most
``ceil((W+1)/2) + 1``. The next step's exchange is posted before the current block is computed.
Backward follows the same schedule, sending dK/dV (or dQ) back to the owner.
Non-causal attention has no imbalance and uses the plain ring (zigzag_ring.ring_forward/backward).
"""
from __future__ import annotations

import torch

from .comm import RingComm
from .kernels import Kernel, default_scale, get_kernel
from .merge import merge_into, new_accumulators
from .zigzag_ring import _t, check_ring_inputs, ring_backward, ring_forward


def _steps(world: int):
    return range(1, world // 2 + 1)


def _sends_kv(rank: int, world: int, t: int) -> bool:
    """In step t, does ``rank`` send its K/V (True) or its queries (False)? (None: nothing.)"""
    if rank + t < world:
        return True
    return None if 2 * t == world else False


def _post(comm: RingComm, t: int, mine_kv, mine_q, like_kv, like_q):
    """Post step t's exchange: send to rank+t (K/V or queries), receive from rank-t (K/V or queries)."""
    r, w = comm.rank, comm.world
    sends_kv = _sends_kv(r, w, t)
    send = [] if sends_kv is None else (mine_kv if sends_kv else mine_q)
    src = (r - t) % w
    recv_kv = _sends_kv(src, w, t)
    recv = [] if recv_kv is None else (like_kv if recv_kv else like_q)
    return comm.exchange(send, (r + t) % w if send else None, recv, src if recv else None)


def _forward(comm: RingComm, q, k, v, scale: float, kernel: Kernel, stats: dict | None):
    r, w = comm.rank, comm.world
    out, lse = new_accumulators(_t(q))
    o, l = kernel.forward(_t(q), _t(k), _t(v), True, scale)
    merge_into(out, lse, o, l)
    blocks, results = 1, []
    steps = list(_steps(w))
    pending = _post(comm, steps[0], [k, v], [q], [k, v], [q]) if steps else None
    for i, t in enumerate(steps):
        got = pending.wait()
        if i + 1 < len(steps):
            pending = _post(comm, steps[i + 1], [k, v], [q], [k, v], [q])
        owner_dst = (r - t) % w  # whose queries we may have received
        if r >= t:  # own queries against K/V of rank r-t
            o, l = kernel.forward(_t(q), _t(got[0]), _t(got[1]), False, scale)
            merge_into(out, lse, o, l)
            blocks += 1
            reply = None
        elif 2 * t != w:  # help: queries of rank r+W-t against own K/V, send the partial back
            o, l = kernel.forward(_t(got[0]), _t(k), _t(v), False, scale)
            blocks += 1
            reply = [o.transpose(1, 2), l]
        else:
            reply = None
        expects = _sends_kv(r, w, t) is False  # we sent our queries: a partial result comes back
        like = [q, lse]  # shapes/dtypes of a partial (out, lse) for our queries
        results.append(comm.exchange(reply or [], owner_dst if reply else None, like if expects else [],
                                     (r + t) % w if expects else None))
    for res in results:
        got = res.wait()
        if got:
            merge_into(out, lse, _t(got[0]), got[1])
    if stats is not None:
        stats["forward_blocks"] = blocks
    return out, lse


def _backward(comm: RingComm, dout, q, k, v, out, lse, scale: float, kernel: Kernel, stats: dict | None):
    r, w = comm.rank, comm.world
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq, dk, dv = (torch.zeros(x.shape, dtype=acc, device=x.device) for x in (q, k, v))
    g = kernel.backward(_t(dout), _t(q), _t(k), _t(v), _t(out), lse, True, scale)
    for acc_t, g_t in zip((dq, dk, dv), g):
        _t(acc_t).add_(g_t)
    blocks, results = 1, []
    mine_q = [q, dout, out, lse]
    steps = list(_steps(w))
    pending = _post(comm, steps[0], [k, v], mine_q, [k, v], mine_q) if steps else None
    for i, t in enumerate(steps):
        got = pending.wait()
        if i + 1 < len(steps):
            pending = _post(comm, steps[i + 1], [k, v], mine_q, [k, v], mine_q)
        if r >= t:  # own queries vs K/V of rank r-t: keep dQ, send dK/dV to the K/V owner
            g = kernel.backward(_t(dout), _t(q), _t(got[0]), _t(got[1]), _t(out), lse, False, scale)
            _t(dq).add_(g[0])
            reply = [g[1].transpose(1, 2), g[2].transpose(1, 2)]
            blocks += 1
        elif 2 * t != w:  # helped with queries of rank r+W-t: keep dK/dV, send dQ back
            rq, rdo, rout, rlse = got
            g = kernel.backward(_t(rdo), _t(rq), _t(k), _t(v), _t(rout), rlse, False, scale)
            _t(dk).add_(g[1])
            _t(dv).add_(g[2])
            reply = [g[0].transpose(1, 2)]
            blocks += 1
        else:
            reply = None
        sent_kv = _sends_kv(r, w, t)
        like = [] if sent_kv is None else ([k, v] if sent_kv else [q])
        results.append(comm.exchange(reply or [], (r - t) % w if reply else None, like,
                                     (r + t) % w if like else None))
    for res, t in zip(results, steps):
        got = res.wait()
        if len(got) == 2:
            dk.add_(got[0])
            dv.add_(got[1])
        elif len(got) == 1:
            dq.add_(got[0])
    if stats is not None:
        stats["backward_blocks"] = blocks
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _DistFlashAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, kernel, comm, stats):
        if causal:
            out, lse = _forward(comm, q, k, v, scale, kernel, stats)
        else:
            out, lse = ring_forward(comm, q, k, v, False, scale, kernel)
        out = out.transpose(1, 2).to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale, ctx.kernel, ctx.comm, ctx.stats = causal, scale, kernel, comm, stats
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dout = dout.contiguous()
        if ctx.causal:
            grads = _backward(ctx.comm, dout, q, k, v, out, lse, ctx.scale, ctx.kernel, ctx.stats)
        else:
            grads = ring_backward(ctx.comm, dout, q, k, v, out, lse, False, ctx.scale, ctx.kernel)
        return (*grads, None, None, None, None, None)


def max_blocks_per_rank(world_size: int) -> int:
    """Block computations of the busiest rank in one causal pass of this schedule."""
    return 1 + (world_size - 1) // 2 + (1 if world_size % 2 == 0 else 0)


def dist_flash_attn_func(q, k, v, causal: bool = True, softmax_scale: float | None = None, group=None, *,
                         backend: str | None = None, stats: dict | None = None, check: bool = True):
    """Exact attention over a contiguously sharded sequence with LightSeq-style load balancing.

    Args:
        q: ``(batch, local_seqlen, nheads, head_dim)``: rank r's contiguous chunk r of W.
        k, v: ``(batch, local_seqlen, nheads_kv, head_dim)``.
        causal, softmax_scale, group, backend, check: as :func:`zigzag_ring_attn_func`.
        stats: optional dict; receives ``forward_blocks`` / ``backward_blocks``, the number of block
            computations this rank did (at most :func:`max_blocks_per_rank` when causal).
    Returns:
        ``(batch, local_seqlen, nheads, head_dim)``.
    """
    if check:
        check_ring_inputs(q, k, v, causal, group, "dist_flash_attn", zigzag=False)
    kernel = get_kernel(backend, q.device)
    scale = default_scale(q.shape[-1], softmax_scale)
    return _DistFlashAttn.apply(q, k, v, causal, scale, kernel, RingComm(group), stats)
