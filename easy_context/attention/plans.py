"""The ring's block plans: which kernel calls the block of ring position ``src`` costs at ``rank``, which of its rows
travel, and how the own block's calls split for the backward ring (ring.py runs them).

A block's calls come from documents.plan_block over the zigzag runs of the two positions: packed documents, a
sliding window (``window``: a query sees at most that many keys, itself included) or both are constraints on which
(query, key) pairs exist, and a block none of whose pairs exists costs no call (``()``: the ring skips it). Only the
rows of a block that some other rank's calls read travel (:func:`block_spans`), so with a window a block sends only
the keys within a window of a later rank's queries.
"""
from __future__ import annotations

import functools

import torch

from .documents import Documents, Segment, plan_block, zigzag_runs

Spans = tuple[tuple[int, int], ...]  # ascending, disjoint [start, end) local rows


@functools.lru_cache(maxsize=1024)
def block_calls(rank: int, src: int, world: int, local_len: int, causal: bool, docs: Documents | None,
                window: int | None = None):
    """The kernel calls of the block of ring position ``src`` at ``rank``: ``((batch_rows, segments), ...)``.

    Documents (packed rows) or not, the calls come from :func:`documents.plan_block` over the zigzag runs of the
    two positions; without documents each row is one document, which gives the classic plan (own block causal,
    an earlier rank's block: all queries x its first chunk, a later rank's: the second query chunk x all keys).
    Non-causal attention without documents needs no layout: every query sees every key. ``window``: a sliding
    window (causal only; documents.plan_block).
    """
    full = slice(0, local_len)
    if docs is None and not causal:
        return ((slice(None), (Segment(full, full, False),)),)
    q_runs, k_runs = zigzag_runs(rank, world, local_len), zigzag_runs(src, world, local_len)
    rows = docs if docs is not None else ((0, local_len * world),)
    if len(set(rows)) == 1:
        return ((slice(None), plan_block(q_runs, k_runs, rows[0], causal, src == rank, window)),)
    return tuple((slice(b, b + 1), plan_block(q_runs, k_runs, bounds, causal, src == rank, window))
                 for b, bounds in enumerate(rows))


def calls_of(plan) -> int:
    """The kernel calls of a :func:`block_calls` plan (0: the block is skipped)."""
    return sum(len(segments) for _, segments in plan)


@functools.lru_cache(maxsize=1024)
def block_spans(src: int, world: int, local_len: int, causal: bool, docs: Documents | None,
                window: int | None = None) -> Spans:
    """The rows of ring position ``src``'s block that some other rank's calls read: ascending, disjoint
    ``[start, end)`` spans of local rows. Only these rows travel around the ring (K/V forward, dK/dV back).

    Every rank derives the same spans from the same documents, so sender and receiver agree on each message's size
    without asking. Packed rows send only the parts of the documents that cross a shard boundary (none at all for a
    block whose documents stay on their rank); a causal row that is one document still skips the second chunk of
    position 0, which no later query reads; a window sends only the keys within a window of another rank's queries;
    unmasked attention sends everything.
    """
    cuts = sorted((sg.k.start, sg.k.stop) for r in range(world) if r != src
                  for _, segments in block_calls(r, src, world, local_len, causal, docs, window) for sg in segments)
    spans: list[tuple[int, int]] = []
    for lo, hi in cuts:
        if spans and lo <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], hi))
        else:
            spans.append((lo, hi))
    return tuple(spans)


@functools.lru_cache(maxsize=1024)
def ring_calls(rank: int, src: int, world: int, local_len: int, causal: bool, docs: Documents | None,
               window: int | None = None):
    """:func:`block_calls` with the key rows of another rank's block in the coordinates of what travels (the rows
    of :func:`block_spans`, concatenated); the own block keeps its local rows."""
    calls = block_calls(rank, src, world, local_len, causal, docs, window)
    if src == rank:
        return calls
    spans = block_spans(src, world, local_len, causal, docs, window)

    def moved(k: slice) -> slice:
        offset = 0
        for lo, hi in spans:
            if lo <= k.start and k.stop <= hi:  # a call's keys lie in one span: the spans are their union
                return slice(offset + k.start - lo, offset + k.stop - lo)
            offset += hi - lo
        raise AssertionError(f"keys {k} outside the block's spans {spans}")

    return tuple((rows, tuple(sg._replace(k=moved(sg.k)) for sg in segments)) for rows, segments in calls)


def pack(x: torch.Tensor, spans: Spans) -> torch.Tensor:
    """The rows ``spans`` of ``x`` ``(b, s, h, d)``, concatenated (a view of ``x`` when they are one span)."""
    if len(spans) == 1:  # a view: exchange sends it as it is (b == 1) or contiguous
        return x[:, spans[0][0]:spans[0][1]]
    return torch.cat([x[:, lo:hi] for lo, hi in spans] or [x[:, :0]], dim=1)


def span_rows(spans: Spans) -> int:
    return sum(hi - lo for lo, hi in spans)


def segment_work(sg: Segment) -> int:
    """Query-key pairs of one call (a banded call: at most its band's width per query row)."""
    nq, nk = sg.q.stop - sg.q.start, sg.k.stop - sg.k.start
    if sg.band is not None:
        lo, hi = sg.band
        lo = -(nk - 1) if lo is None else lo
        hi = nq - 1 if hi is None else hi
        return nq * min(nk, hi - lo + 1)
    return nq * (nq + 1) // 2 if sg.causal else nq * nk


def split_own(segments: tuple) -> tuple[tuple, tuple]:
    """The own block's calls (consecutive) in two parts for the backward ring: the first (about a quarter of the
    work) runs while the first remote block arrives, the rest while the last dK/dV hop travels, so that neither
    transfer finds the GPU idle. One call is cut at half its rows (causal: the top-left quarter first, then the lower
    half as an unmasked and a causal call; a banded call is not cut); several go as a prefix and the rest."""
    if len(segments) == 1:
        sg = segments[0]
        a, b = sg.q.start, sg.q.stop
        if b - a < 2 or sg.band is not None:
            return (), segments
        h = a + (b - a) // 2
        if not sg.causal:
            return (Segment(slice(a, h), sg.k, False),), (Segment(slice(h, b), sg.k, False),)
        return (Segment(slice(a, h), slice(a, h), True),), (Segment(slice(h, b), slice(a, h), False),
                                                             Segment(slice(h, b), slice(h, b), True))
    total, done, cut = sum(segment_work(sg) for sg in segments), 0, 0
    while cut < len(segments) and 4 * (done + segment_work(segments[cut])) <= total:
        done += segment_work(segments[cut])
        cut += 1
    return segments[:cut], segments[cut:]


def single_call(causal: bool, local_len: int, docs) -> bool:
    """One document per row (and no window): a ring of one rank is one kernel call over everything."""
    full = slice(0, local_len)
    return block_calls(0, 0, 1, local_len, causal, docs) == ((slice(None), (Segment(full, full, causal),)),)


__all__ = ["Spans", "block_calls", "calls_of", "block_spans", "ring_calls", "pack", "span_rows", "segment_work",
           "split_own", "single_call"]
