"""Test doubles that run the library's exact per-rank schedules in one process (tests; bench scripts import them
through bench/sim.py).

* :class:`ThreadComm`: W ranks as W threads with in-memory mailboxes; every byte a rank would send over
  p2p is handed over as a copy, so the result equals a real W-process run (used for numerics on one GPU).
* :class:`NullComm`: one rank alone; every receive returns local tensors of the right shape at no cost,
  so timing it measures exactly the rank's kernel calls and merges, communication excluded.
"""
from __future__ import annotations

import os
import queue
import threading
from unittest import mock

import torch

from easy_context.attention import dist_flash, ring
from easy_context.attention.comm import RingComm
from easy_context.attention.merge import ENV_COMPILE, add_sinks, sink_grad
from easy_context.attention.registry import layout, shard_sequence


class _Got:
    def __init__(self, box):
        self._box = box

    def wait(self):
        return self._box.get(timeout=120) if self._box is not None else []


class ThreadComm(RingComm):
    def __init__(self, rank, world, boxes):
        self.group, self.rank, self.world, self._boxes = None, rank, world, boxes

    def exchange(self, send, dst, recv_like, src):
        if dst is not None:
            self._boxes[(self.rank, dst)].put([t.clone() for t in send])
        return _Got(self._boxes[(src, self.rank)] if src is not None else None)


class _Ready:
    def __init__(self, tensors):
        self._t = tensors

    def wait(self):
        return self._t


class NullComm(RingComm):
    def __init__(self, rank, world):
        self.group, self.rank, self.world = None, rank, world

    def exchange(self, send, dst, recv_like, src):
        # recv_like are stride-0 expansions (shape only); kernels such as cuDNN want a unit last stride, so the
        # stand-ins are real (uninitialised) buffers, as a received message would be
        return _Ready([torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in recv_like] if src is not None
                      else [])


def _in_threads(world, fn):
    boxes = {(s, d): queue.Queue() for s in range(world) for d in range(world)}
    results, errors = [None] * world, []

    def run(r):
        try:
            results[r] = fn(ThreadComm(r, world, boxes))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    # The rank threads merge eagerly: torch.compile is not thread-safe (a recompile in one rank's thread while another
    # enters the compiled merge raised "using FX to symbolically trace a dynamo-optimized function" on the H200). A
    # process runs one rank, so training never meets this; the compiled merge runs in the NCCL tests and train steps.
    with mock.patch.dict(os.environ, {ENV_COMPILE: "0"}):
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return results


def _unshard(algo, parts, world):
    n, chunks = layout(algo, world)
    ordered = [None] * n
    for r, part in enumerate(parts):
        for i, piece in zip(chunks[r], part.chunk(len(chunks[r]), dim=1)):
            ordered[i] = piece
    return torch.cat(ordered, dim=1)


def simulate(algo: str, q, k, v, dout, world: int, kernel, scale: float, causal: bool = True, docs=None,
             ring_degree: int | None = None, *, window: int | None = None, softcap: float = 0.0, sinks=None,
             stats: list | None = None):
    """Run ``algo`` on ``world`` simulated ranks; return full ``(out, dq, dk, dv)`` in the original order (flash
    layout), and the sinks' gradient (summed over the ranks) last when ``sinks`` are given. ``docs``: packed
    documents (documents.normalize's form; not dist_flash_attn). ``window`` (not dist_flash_attn), ``softcap``,
    ``sinks`` ``(heads,)``: as the algorithms take them; the sinks enter after the merge (merge.add_sinks), as the
    autograd Functions do. ``stats``: a list that receives each rank's ring stats dict. ``ulysses_attn`` and
    ``usp_attn`` (``ring_degree`` R, default 1 for ulysses) run each Ulysses rank's head group through the zigzag
    ring of R simulated ranks: the all-to-alls only move heads and sequence pieces, exactly."""
    if algo in ("ulysses_attn", "usp_attn"):
        return _head_parallel(q, k, v, dout, world, ring_degree or 1, kernel, scale, causal, docs, window, softcap,
                              sinks, stats)
    if (docs is not None or window is not None) and algo == "dist_flash_attn":
        raise ValueError("dist_flash_attn does not support packed documents or windows")
    if not causal or docs is not None or window is not None:  # these use the zigzag ring in every algorithm
        algo_sched = "zigzag_ring_attn"
    else:
        algo_sched = algo
    if algo_sched == "zigzag_ring_attn":
        def fwd(c, q, k, v, causal, s, kern):
            st = {} if stats is not None else None
            res = ring.ring_forward(c, q, k, v, causal, s, kern, docs, window=window, softcap=softcap, stats=st)
            if st is not None:
                stats.append(st)
            return res

        def bwd(c, do, q, k, v, o, l, causal, s, kern):
            return ring.ring_backward(c, do, q, k, v, o, l, causal, s, kern, docs, window=window, softcap=softcap)
    else:
        def fwd(c, q, k, v, causal, s, kern):
            return dist_flash.dist_flash_forward(c, q, k, v, s, kern, None, softcap)

        def bwd(c, do, q, k, v, o, l, causal, s, kern):
            return dist_flash.dist_flash_backward(c, do, q, k, v, o, l, s, kern, None, softcap)
    layout_algo = algo_sched if docs is not None else algo
    shards = [[shard_sequence(layout_algo, x, r, world) for x in (q, k, v, dout)] for r in range(world)]

    def fwd_rank(comm):
        ql, kl, vl, _ = shards[comm.rank]
        out, lse = fwd(comm, ql, kl, vl, causal, scale, kernel)
        if sinks is not None:
            out, lse = add_sinks(out, lse, sinks)
        return out.transpose(1, 2).to(q.dtype), lse

    outs = _in_threads(world, fwd_rank)

    def bwd_rank(comm):
        ql, kl, vl, dl = shards[comm.rank]
        out, lse = outs[comm.rank]
        g = bwd(comm, dl, ql, kl, vl, out, lse, causal, scale, kernel)
        if sinks is not None:  # this rank's queries' share
            g = (*g, sink_grad(dl.transpose(1, 2), out.transpose(1, 2), lse, sinks))
        return g

    grads = _in_threads(world, bwd_rank)
    full = [_unshard(layout_algo, [o for o, _ in outs], world)]
    full += [_unshard(layout_algo, [g[i] for g in grads], world) for i in range(3)]
    if sinks is not None:
        full.append(sum(g[3] for g in grads))
    return full


def _head_parallel(q, k, v, dout, world, ring, kernel, scale, causal, docs, window=None, softcap=0.0, sinks=None,
                   stats=None):
    """Ulysses degree ``U = world / ring``: head group u (with the kv replication Ulysses applies) over the whole
    sequence through the zigzag ring of ``ring`` simulated ranks; the groups' results side by side (the sinks of
    group u are its heads' slice, their gradients side by side too)."""
    from easy_context.attention.head_parallel import ulysses_kv_replication

    u_deg = world // ring
    rep = ulysses_kv_replication(q.shape[2], k.shape[2], u_deg)
    ke, ve = (x.repeat_interleave(rep, dim=2) for x in (k, v))  # (b, s, hkv * rep, d)
    hq, hk = q.shape[2] // u_deg, ke.shape[2] // u_deg
    parts = [simulate("zigzag_ring_attn", q[:, :, u * hq:(u + 1) * hq], ke[:, :, u * hk:(u + 1) * hk],
                      ve[:, :, u * hk:(u + 1) * hk], dout[:, :, u * hq:(u + 1) * hq], ring, kernel, scale, causal,
                      docs, window=window, softcap=softcap, stats=stats,
                      sinks=None if sinks is None else sinks[u * hq:(u + 1) * hq]) for u in range(u_deg)]
    out, dq, dk, dv = (torch.cat([p[i] for p in parts], dim=2) for i in range(4))

    def unrep(g):  # gradient of repeat_interleave: (b, s, hkv * rep, d) -> (b, s, hkv, d)
        return g.view(*g.shape[:2], g.shape[2] // rep, rep, g.shape[3]).sum(3)

    res = [out, dq, unrep(dk), unrep(dv)]
    return res if sinks is None else res + [torch.cat([p[4] for p in parts])]
