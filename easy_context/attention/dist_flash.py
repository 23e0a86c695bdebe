"""DistFlashAttn (LightSeq) attention: contiguous shards, causal work balanced by helping.

Layout: rank ``r`` holds chunk ``r`` of ``W`` equal contiguous chunks. Causal attention needs the block
pairs ``(i, j)``, ``j <= i`` (queries of chunk i, keys of chunk j). Plain ring attention would give
rank ``W-1`` ``W`` blocks and rank 0 one. Here the pairs at distance ``t`` and ``W-t`` are done in the
same step ``t`` (``1 <= t <= W/2``):

* distance ``t``: pair ``(r, r-t)`` on the query owner ``r >= t``, which receives K/V of rank ``r-t``;
* distance ``W-t`` (``t < W-t``): pair ``(r+W-t, r)`` on the K/V owner ``r < t``, which would otherwise be
  idle; it receives the queries of rank ``r+W-t`` and sends back the partial ``(out, lse)``.

So in step ``t`` every rank sends one thing to ``(r+t) mod W`` (K/V if ``r+t < W`` else its queries) and
gets results back from there, and every rank computes exactly one block. In the middle step of an even
W (``2t == W``) each pair is split in halves of query rows between its two ranks. Every rank does the
same work, ``W/2`` full blocks (the causal diagonal counts half), in ``1 + floor((W-1)/2) + [W even]``
kernel calls, at most ``ceil((W+1)/2) + 1``. The next step's exchange is posted before the current block is computed.
Backward follows the same schedule, sending dK/dV (or dQ) back to the owner.
Non-causal attention has no imbalance and uses the plain ring (ring.ring_forward/backward).
Soft-capping goes to every kernel call and sinks enter after the last merge (merge.add_sinks); a sliding window is
refused: the helper schedule balances dense causal work, which a window leaves mostly empty.
"""
from __future__ import annotations

import torch

from .backends import acc_dtype
from .comm import RingComm
from .features import WINDOW_ALGORITHMS, check_features
from .kernels import Kernel, autocast_inputs, default_scale, get_kernel, score_mods
from .kernels import head_major as _t  # (b, s, h, d) <-> (b, h, s, d) views
from .merge import add_sinks, merge_into, new_accumulators, sink_grad
from .ring import check_ring_inputs, ring_backward, ring_forward


def _steps(world: int):
    return range(1, world // 2 + 1)


def _rows(local_len: int, world: int, t: int, rank: int):
    """``(travelling_rows, own_rows)`` of ``rank`` in step t.

    ``travelling_rows``: query rows sent to the helper at rank+t (None: it sends its K/V instead).
    ``own_rows``: rows it computes itself against the K/V of rank-t (None: rank < t, nothing own).
    In the middle step (2t == W) each pair is split: the query owner does the first half of its rows,
    the otherwise idle K/V owner the second half.
    """
    mid = 2 * t == world
    half = local_len // 2
    travelling = None if rank + t < world else (slice(half, local_len) if mid else slice(0, local_len))
    own = None if rank < t else (slice(0, half) if mid else slice(0, local_len))
    return travelling, own


def _post(comm: RingComm, t: int, mine_kv, mine_q, n: int):
    """Post step t's exchange: every rank sends to rank+t (its K/V, or the travelling rows of ``mine_q``)
    and receives the same kind of thing from rank-t."""
    r, w = comm.rank, comm.world
    send_rows, _ = _rows(n, w, t, r)
    send = mine_kv if send_rows is None else [x[:, send_rows] for x in mine_q]
    src = (r - t) % w
    recv_rows, _ = _rows(n, w, t, src)
    recv = mine_kv if recv_rows is None else [x[:, recv_rows] for x in mine_q]
    return comm.exchange(send, (r + t) % w, recv, src)


def dist_flash_forward(comm: RingComm, q, k, v, scale: float, kernel: Kernel, stats: dict | None,
                       softcap: float = 0.0):
    r, w, n = comm.rank, comm.world, q.shape[1]
    mods = score_mods(softcap=softcap)
    out, lse = new_accumulators(_t(q))
    o, l = kernel.forward(_t(q), _t(k), _t(v), True, scale, **mods)
    merge_into(out, lse, o, l)
    blocks, work, results = 1, 0.5, []  # work: in full chunk x chunk blocks (the causal diagonal is half)
    steps = list(_steps(w))
    lse_bs = lse.transpose(1, 2)  # (b, s, h) view so rows slice on dim 1 like the flash-layout tensors
    pending = _post(comm, steps[0], [k, v], [q], n) if steps else None
    for i, t in enumerate(steps):
        got = pending.wait()
        if i + 1 < len(steps):
            pending = _post(comm, steps[i + 1], [k, v], [q], n)
        sent_rows, own_rows = _rows(n, w, t, r)
        reply = []
        if own_rows is not None:  # own query rows against the K/V of rank r-t
            o, l = kernel.forward(_t(q)[:, :, own_rows], _t(got[0]), _t(got[1]), False, scale, **mods)
            merge_into(out[:, :, own_rows], lse[:, :, own_rows], o, l)
            blocks, work = blocks + 1, work + (own_rows.stop - own_rows.start) / n
        if _rows(n, w, t, (r - t) % w)[0] is not None:  # help: rows of rank r-t+W against own K/V
            o, l = kernel.forward(_t(got[0]), _t(k), _t(v), False, scale, **mods)
            reply = [o.transpose(1, 2), l.transpose(1, 2)]
            blocks, work = blocks + 1, work + got[0].shape[1] / n
        like = [] if sent_rows is None else [q[:, sent_rows], lse_bs[:, sent_rows]]
        results.append((sent_rows, comm.exchange(reply, (r - t) % w if reply else None, like,
                                                 (r + t) % w if like else None)))
    for rows, res in results:
        got = res.wait()
        if got:  # partial (out, lse) for our travelling rows
            merge_into(out[:, :, rows], lse[:, :, rows], _t(got[0]), got[1].transpose(1, 2))
    if stats is not None:
        stats["forward_blocks"], stats["forward_work"] = blocks, work
    return out, lse


def dist_flash_backward(comm: RingComm, dout, q, k, v, out, lse, scale: float, kernel: Kernel, stats: dict | None,
                        softcap: float = 0.0):
    r, w, n = comm.rank, comm.world, q.shape[1]
    mods = score_mods(softcap=softcap)
    acc = acc_dtype(q.dtype)
    dq, dk, dv = (torch.zeros(x.shape, dtype=acc, device=x.device) for x in (q, k, v))
    g = kernel.backward(_t(dout), _t(q), _t(k), _t(v), _t(out), lse, True, scale, **mods)
    for acc_t, g_t in zip((dq, dk, dv), g):
        _t(acc_t).add_(g_t)
    blocks, results = 1, []
    lse_bs = lse.transpose(1, 2)  # (b, s, h) view: rows on dim 1
    mine_q = [q, dout, out, lse_bs]
    steps = list(_steps(w))
    pending = _post(comm, steps[0], [k, v], mine_q, n) if steps else None
    for i, t in enumerate(steps):
        got = pending.wait()
        if i + 1 < len(steps):
            pending = _post(comm, steps[i + 1], [k, v], mine_q, n)
        sent_rows, own_rows = _rows(n, w, t, r)
        reply_kv, reply_q = [], []
        if own_rows is not None:  # own rows vs K/V of rank r-t: keep dQ, send dK/dV to the K/V owner
            g = kernel.backward(_t(dout)[:, :, own_rows], _t(q)[:, :, own_rows], _t(got[0]), _t(got[1]),
                                _t(out)[:, :, own_rows], lse[:, :, own_rows], False, scale, **mods)
            _t(dq)[:, :, own_rows] += g[0]
            reply_kv = [g[1].transpose(1, 2), g[2].transpose(1, 2)]
            blocks += 1
        if _rows(n, w, t, (r - t) % w)[0] is not None:  # helped rank r-t+W: keep dK/dV, send dQ back
            rq, rdo, rout, rlse = got
            g = kernel.backward(_t(rdo), _t(rq), _t(k), _t(v), _t(rout), rlse.transpose(1, 2).contiguous(),
                                False, scale, **mods)
            _t(dk).add_(g[1])
            _t(dv).add_(g[2])
            reply_q = [g[0].transpose(1, 2)]
            blocks += 1
        # replies go back to rank r-t (the K/V owner gets dK/dV, the query owner dQ); the same rank can
        # get both only when it is both, which the schedule never makes it in one step
        reply = reply_kv or reply_q
        like = [k, v] if sent_rows is None else [q[:, sent_rows]]
        results.append((sent_rows, comm.exchange(reply, (r - t) % w if reply else None, like, (r + t) % w)))
    for rows, res in results:
        got = res.wait()
        if rows is None:
            dk.add_(got[0])
            dv.add_(got[1])
        else:
            dq[:, rows] += got[0]
    if stats is not None:
        stats["backward_blocks"] = blocks
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _DistFlashAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, causal, scale, kernel, comm, stats, softcap):
        if causal:
            out, lse = dist_flash_forward(comm, q, k, v, scale, kernel, stats, softcap)
        else:
            out, lse = ring_forward(comm, q, k, v, False, scale, kernel, softcap=softcap)
        if sinks is not None:  # once per query, after the last merge
            out, lse = add_sinks(out, lse, sinks)
        out = out.transpose(1, 2).to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.causal, ctx.scale, ctx.kernel, ctx.comm = causal, scale, kernel, comm
        ctx.stats, ctx.softcap = stats, softcap
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        dout = dout.contiguous()
        if ctx.causal:
            grads = dist_flash_backward(ctx.comm, dout, q, k, v, out, lse, ctx.scale, ctx.kernel, ctx.stats,
                                        ctx.softcap)
        else:
            grads = ring_backward(ctx.comm, dout, q, k, v, out, lse, False, ctx.scale, ctx.kernel, softcap=ctx.softcap)
        dsinks = None if sinks is None else sink_grad(_t(dout), _t(out), lse, sinks)
        return (*grads, dsinks, None, None, None, None, None, None)


def max_blocks_per_rank(world_size: int) -> int:
    """Kernel calls of the busiest rank in one causal pass of this schedule (the middle step of an even
    W is two half blocks per rank, counted as a call each)."""
    return 1 + (world_size - 1) // 2 + (1 if world_size % 2 == 0 else 0)


DOCUMENTS_UNSUPPORTED = ("dist_flash_attn does not support packed documents (position ids that restart / cu_seqlens): "
                         "its helper schedule balances dense causal work only. Use zigzag_ring_attn, ulysses_attn or "
                         "usp_attn for packed rows")
WINDOW_UNSUPPORTED = ("dist_flash_attn does not support a sliding window shorter than the sequence: its helper "
                      "schedule balances dense causal work, which a window leaves mostly empty. Use "
                      f"{WINDOW_ALGORITHMS} (blocks outside the window cost no kernel call there)")


@autocast_inputs
def dist_flash_attn_func(q, k, v, causal: bool = True, softmax_scale: float | None = None, group=None, *,
                         backend: str | None = None, stats: dict | None = None, check: bool = True, cu_seqlens=None,
                         window: int | None = None, softcap: float | None = None, sinks=None):
    """Exact attention over a contiguously sharded sequence with LightSeq-style load balancing.

    Args:
        q: ``(batch, local_seqlen, nheads, head_dim)``: rank r's contiguous chunk r of W.
        k, v: ``(batch, local_seqlen, nheads_kv, head_dim)``.
        causal, softmax_scale, group, backend, check: as :func:`zigzag_ring_attn_func`.
        stats: optional dict; receives ``forward_blocks`` / ``backward_blocks``, the kernel calls this rank
            made (at most :func:`max_blocks_per_rank` when causal), and ``forward_work``, its work in units
            of one full chunk-by-chunk block (``W / 2`` on every rank: perfectly balanced).
        cu_seqlens: packed documents are not supported by this schedule: a clear error (use zigzag_ring_attn,
            ulysses_attn or usp_attn).
        window: a sliding window shorter than the sequence is refused (an error naming the algorithms that take
            one); one that covers the whole sequence changes nothing and is accepted.
        softcap, sinks: as :func:`zigzag_ring_attn_func`.
    Returns:
        ``(batch, local_seqlen, nheads, head_dim)``.
    """
    if cu_seqlens is not None:
        raise ValueError(DOCUMENTS_UNSUPPORTED)
    window, softcap, features = check_features("dist_flash_attn", q, causal, q.shape[1] * RingComm(group).world,
                                               window, softcap, sinks)
    if window is not None:
        raise ValueError(WINDOW_UNSUPPORTED)
    if check:
        check_ring_inputs(q, k, v, causal, group, "dist_flash_attn", zigzag=False)
    kernel = get_kernel(backend, q.device, q.dtype, q.shape[-1], features)
    scale = default_scale(q.shape[-1], softmax_scale)
    return _DistFlashAttn.apply(q, k, v, sinks, causal, scale, kernel, RingComm(group), stats, softcap)
