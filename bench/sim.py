"""Test doubles that run the library's exact per-rank schedules in one process (bench only).

* :class:`ThreadComm`: W ranks as W threads with in-memory mailboxes; every byte a rank would send over
  p2p is handed over as a copy, so the result equals a real W-process run (used for numerics on one GPU).
* :class:`NullComm`: one rank alone; every receive returns local tensors of the right shape at no cost,
  so timing it measures exactly the rank's kernel calls and merges, communication excluded.
"""
from __future__ import annotations

import queue
import threading

import torch

from easy_context.attention import dist_flash, zigzag_ring
from easy_context.attention.comm import RingComm
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
        return _Ready(list(recv_like) if src is not None else [])


def _in_threads(world, fn):
    boxes = {(s, d): queue.Queue() for s in range(world) for d in range(world)}
    results, errors = [None] * world, []

    def run(r):
        try:
            results[r] = fn(ThreadComm(r, world, boxes))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
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


def simulate(algo: str, q, k, v, dout, world: int, kernel, scale: float, causal: bool = True):
    """Run ``algo`` (zigzag_ring_attn or dist_flash_attn) on ``world`` simulated ranks; return full
    ``(out, dq, dk, dv)`` in the original order (flash layout)."""
    if not causal:  # non-causal attention uses the plain ring in every algorithm
        algo_sched = "zigzag_ring_attn"
    else:
        algo_sched = algo
    fwd, bwd = {"zigzag_ring_attn": (zigzag_ring.ring_forward, zigzag_ring.ring_backward),
                "dist_flash_attn": (lambda c, q, k, v, causal, s, kern: dist_flash.dist_flash_forward(c, q, k, v, s, kern, None),
                                    lambda c, do, q, k, v, o, l, causal, s, kern:
                                    dist_flash.dist_flash_backward(c, do, q, k, v, o, l, s, kern, None))}[algo_sched]
    shards = [[shard_sequence(algo, x, r, world) for x in (q, k, v, dout)] for r in range(world)]

    def fwd_rank(comm):
        ql, kl, vl, _ = shards[comm.rank]
        out, lse = fwd(comm, ql, kl, vl, causal, scale, kernel)
        return out.transpose(1, 2).to(q.dtype), lse

    outs = _in_threads(world, fwd_rank)

    def bwd_rank(comm):
        ql, kl, vl, dl = shards[comm.rank]
        out, lse = outs[comm.rank]
        return bwd(comm, dl, ql, kl, vl, out, lse, causal, scale, kernel)

    grads = _in_threads(world, bwd_rank)
    full = [_unshard(algo, [o for o, _ in outs], world)]
    full += [_unshard(algo, [g[i] for g in grads], world) for i in range(3)]
    return full
