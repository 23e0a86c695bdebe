"""Packed documents: which (query rows, key rows) pairs of a block attend, as a short list of kernel calls.

A packed row holds several documents back to back; a token attends only to the tokens of its own document (and,
causal, only to earlier ones). The documents of a row are given by their **boundaries** in global token indices,
``(0, b_1, ..., S)`` (the ``cu_seqlens`` of flash-attn's varlen API). A row that is one document has the
boundaries ``(0, S)``, and that is also what the dense algorithms compute: there is no separate dense path.

Every algorithm computes attention block by block: the queries this rank holds against the keys of one block
(its own, or another rank's in a ring). Both are a few **runs** of consecutive global indices (a zigzag shard is
two runs), kept in ascending global order. :func:`plan_block` turns a block into :class:`Segment` s, each one call
of a local kernel on contiguous query rows and contiguous key rows, either top-left causal or unmasked:

* the block of the rank's own rows (``diagonal``): one causal call per document over that document's rows; a
  document's rows are contiguous in local order and ordered as in the sequence, so top-left causal is exact (these
  calls tile the local rows; a kernel with a varlen entry point makes them one call: kernels.Varlen);
* another rank's block (disjoint rows): each run of queries of a document attends, unmasked, to the document's
  keys that come before the run (a prefix of the block's rows of that document); consecutive runs with the same
  keys are one call. Pairs with no overlap are never computed.

For one document and the zigzag layout this gives exactly the ring's classic three cases (own block causal; an
earlier rank's block: all queries x its first chunk; a later rank's block: the second query chunk x all keys).
Boundaries come from position ids that restart at 0 (transformers' convention for packed rows,
``DataCollatorWithFlattening``): :func:`boundaries_from_positions`.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import torch

Runs = tuple[tuple[int, int], ...]    # ascending, disjoint [start, end) global index ranges, in local order
Bounds = tuple[int, ...]              # (0, b_1, ..., S): one row's document boundaries
Documents = tuple[Bounds, ...]        # one Bounds per batch row


class Segment(NamedTuple):
    q: slice       # local query rows
    k: slice       # local key rows of the block
    causal: bool   # top-left causal over (q, k) (then q and k are the same rows), else unmasked
    band: tuple | None = None  # (lo, hi): query row a sees key row b iff lo <= a - b <= hi (a sliding window)


def _rows_in(runs: Runs, lo: int, hi: int) -> slice | None:
    """The local rows whose global index lies in ``[lo, hi)`` (contiguous: runs are ascending), or None."""
    first = last = None
    offset = 0
    for a, b in runs:
        s, e = max(a, lo), min(b, hi)
        if s < e:
            if first is None:
                first = offset + s - a
            last = offset + e - a
        offset += b - a
    return None if first is None else slice(first, last)


def _pieces(runs: Runs, lo: int, hi: int):
    """``(global start, global end, first local row)`` of each run's part inside ``[lo, hi)``."""
    offset = 0
    for a, b in runs:
        s, e = max(a, lo), min(b, hi)
        if s < e:
            yield s, e, offset + s - a
        offset += b - a


def _window_segments(q_runs: Runs, k_runs: Runs, bounds: Bounds, window: int) -> list[Segment]:
    """The calls of a block under causal attention with a sliding window: global query ``i`` sees key ``j`` iff
    ``0 <= i - j <= window - 1`` (transformers' ``sliding_window``: at most ``window`` keys, itself included) and
    both lie in one document.

    One call per (document, query run, key run) whose pairs are not all masked: inside one run local rows are
    consecutive global indices, so the mask of the pair is a band of constant global offset. The rows no pair
    reaches are trimmed (queries ``[max(qs, ks), min(qe, ke + w - 1))``, keys ``[max(ks, qs - w + 1), min(ke, qe))``),
    so every query row of a call sees a key of it and every key row is seen. With ``i0``/``j0`` the first global query
    and key of the trimmed call, local rows ``a = i - i0``, ``b = j - j0`` and ``d = i0 - j0``, the window is
    ``-d <= a - b <= w - 1 - d``: the call's band, a side dropped when no pair of the call reaches it (all pairs
    inside: one unmasked call; the same rows with no pair farther apart than the window: top-left causal). Blocks
    whose keys all lie a window or more before their queries get no call at all.
    """
    segments: list[Segment] = []
    w = window
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        ks_all = list(_pieces(k_runs, lo, hi))
        for qs, qe, qrow in _pieces(q_runs, lo, hi):
            for ks, ke, krow in ks_all:
                i0, i1 = max(qs, ks), min(qe - 1, ke - 1 + w - 1)   # queries with a key (inclusive)
                j0, j1 = max(ks, qs - w + 1), min(ke - 1, qe - 1)   # keys with a query
                if i0 > i1 or j0 > j1:
                    continue
                q = slice(qrow + i0 - qs, qrow + i1 - qs + 1)
                k = slice(krow + j0 - ks, krow + j1 - ks + 1)
                d = i0 - j0
                lower, upper = i0 - j1 >= 0, i1 - j0 <= w - 1  # every pair causal / within the window
                if lower and upper:
                    segments.append(Segment(q, k, False))
                elif (i0, i1) == (j0, j1) and upper:
                    segments.append(Segment(q, k, True))
                else:
                    segments.append(Segment(q, k, False, (None if lower else -d, None if upper else w - 1 - d)))
    return segments


@functools.lru_cache(maxsize=4096)
def plan_block(q_runs: Runs, k_runs: Runs, bounds: Bounds, causal: bool, diagonal: bool,
               window: int | None = None) -> tuple[Segment, ...]:
    """The kernel calls of one block (see the module docstring).

    Args:
        q_runs, k_runs: the global index runs of the local query rows and of the block's key rows.
        bounds: the row's document boundaries.
        causal: causal attention in global order. diagonal: the block is the rank's own rows (``k_runs == q_runs``).
        window: a sliding window (causal only): a query sees at most ``window`` keys, itself included
            (:func:`_window_segments`); None: none.
    """
    if window is not None:
        if not causal:
            raise ValueError("a sliding window needs causal attention")
        return tuple(_window_segments(q_runs, k_runs, bounds, window))
    segments: list[Segment] = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        qs = _rows_in(q_runs, lo, hi)
        if qs is None:
            continue
        if diagonal:
            segments.append(Segment(qs, qs, causal))
            continue
        ks = _rows_in(k_runs, lo, hi)
        if ks is None:
            continue
        if not causal:
            segments.append(Segment(qs, ks, False))
            continue
        offset = 0
        for a, b in q_runs:  # queries of this run attend the document's keys before the run (no key lies inside it)
            s, e = max(a, lo), min(b, hi)
            if s < e:
                keys = _rows_in(k_runs, lo, s)
                rows = slice(offset + s - a, offset + e - a)
                if keys is not None:
                    last = segments[-1] if segments else None
                    if last is not None and not last.causal and last.k == keys and last.q.stop == rows.start:
                        segments[-1] = Segment(slice(last.q.start, rows.stop), keys, False)
                    else:
                        segments.append(Segment(rows, keys, False))
            offset += b - a
    return tuple(segments)


def zigzag_runs(position: int, positions: int, local_len: int) -> Runs:
    """Global runs of ring position ``position`` of ``positions`` holding zigzag chunks ``p`` and ``2P-1-p`` of a
    sequence of ``positions * local_len`` tokens (one position: the whole sequence)."""
    if positions == 1:
        return ((0, local_len),)
    c = local_len // 2
    p, n = position, 2 * positions
    return ((p * c, (p + 1) * c), ((n - 1 - p) * c, (n - p) * c))


def normalize(cu_seqlens, batch: int, seq_len: int, what: str) -> Documents | None:
    """``cu_seqlens`` of a function-level call as :data:`Documents` (None stays None: one document per row).

    Args:
        cu_seqlens: global document boundaries ``[0, ..., seq_len]`` shared by every batch row (1-D int tensor or
            sequence), or one such sequence per batch row.
        seq_len: the global (padded) sequence length.
    Raises:
        ValueError: boundaries that do not start at 0, end at ``seq_len`` or increase strictly, or a per-row list
            of the wrong length.
    """
    if cu_seqlens is None:
        return None
    if isinstance(cu_seqlens, torch.Tensor):
        cu_seqlens = cu_seqlens.tolist()
    rows = cu_seqlens if len(cu_seqlens) and isinstance(cu_seqlens[0], (list, tuple, torch.Tensor)) else \
        [cu_seqlens] * batch
    if len(rows) != batch:
        raise ValueError(f"{what}: cu_seqlens has {len(rows)} rows for a batch of {batch}; pass one boundary list "
                         "(shared by every row) or one per row")
    docs = []
    for row in rows:
        b = tuple(int(x) for x in (row.tolist() if isinstance(row, torch.Tensor) else row))
        if len(b) < 2 or b[0] != 0 or b[-1] != seq_len or any(x >= y for x, y in zip(b[:-1], b[1:])):
            raise ValueError(f"{what}: cu_seqlens {list(b)[:8]}{'...' if len(b) > 8 else ''} must increase strictly "
                             f"from 0 to the global sequence length {seq_len} (local length x ranks, padding "
                             "included): the boundaries of the whole packed row, the same on every rank")
        docs.append(b)
    return tuple(docs)


def boundaries_from_positions(position_ids: torch.Tensor) -> Documents | None:
    """Document boundaries of global ``position_ids`` ``(batch, S)`` that restart at 0 (None: no restart anywhere).

    Raises:
        ValueError: a position that neither continues its predecessor (+1) nor restarts at 0, or a row that does
            not start at 0 after a restart elsewhere.
    """
    check_positions(position_ids)
    if position_ids.shape[1] < 2:
        return None
    starts = (position_ids[:, 1:] == 0).nonzero().tolist()  # (row, t - 1) of every restart
    if not starts:
        return None
    seq = position_ids.shape[1]
    per_row: list[list[int]] = [[0] for _ in range(position_ids.shape[0])]
    for row, t in starts:
        per_row[row].append(t + 1)
    return tuple(tuple(b + [seq]) for b in per_row)


def check_positions(position_ids: torch.Tensor, what: str = "position_ids") -> None:
    """Positions of packed rows count up by one within a document and restart at 0 at each document start.

    Raises:
        ValueError: naming the first offending token.
    """
    if position_ids.shape[-1] < 2:
        return
    pos = position_ids.reshape(-1, position_ids.shape[-1])
    step_ok = (pos[:, 1:] == pos[:, :-1] + 1) | (pos[:, 1:] == 0)
    if bool(step_ok.all()):
        return
    row, t = (~step_ok).nonzero()[0].tolist()
    raise ValueError(f"{what}: position {int(pos[row, t + 1])} follows {int(pos[row, t])} at token {t + 1} of row "
                     f"{row}: positions must count up by one within a document and restart at 0 where a new document "
                     "starts (packed rows). Shard the global positions with prepare_seq_parallel_inputs and pass "
                     "position_ids=prepared['local_position_ids']")


def key(docs: Documents | None) -> int:
    """A small integer that differs when ranks were given different documents (for the cross-rank check)."""
    return 0 if docs is None else hash(docs) & 0x7FFFFFFFFFFFFFFF


def work(docs: Sequence[Bounds], runs: Runs) -> int:
    """Causal attention work (query-key pairs) of the queries in ``runs``: load-balance accounting."""
    total = 0
    for bounds in docs:
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            for a, b in runs:
                s, e = max(a, lo), min(b, hi)
                if s < e:  # sum over t in [s, e) of (t - lo + 1)
                    total += (e - s) * (s - lo + 1 + e - lo) // 2
    return total


def imbalance(docs: Sequence[Bounds], runs_per_rank: Sequence[Runs]) -> float:
    """The busiest rank's causal work over the mean (1.0: perfectly balanced)."""
    per = [work(docs, runs) for runs in runs_per_rank]
    mean = sum(per) / len(per)
    return max(per) / mean if mean else 1.0


def balanced_order(bounds: Bounds, runs_per_rank: Sequence[Runs], *, tail: int = 0, good: float = 1.02,
                   tries: int = 64, budget: int = 200000, seed: int = 0) -> tuple[list[int], float]:
    """An order of a row's documents that balances the ranks' causal work, and its imbalance.

    Documents are independent, so any order of them computes the same per-document attention and the same loss;
    only which rank does how much work changes. Keeps the given order when it is within ``good``; otherwise tries
    ``tries`` seeded random orders (fewer for rows of many documents: at most ``budget`` document placements) and
    keeps the best, then swaps pairs of documents while a swap helps. ``tail``: padding appended after the last
    document (it extends whichever comes last). On rows of
    documents log-uniform in 1K-64K tokens (bench/RESULTS.md): zigzag over 2 ranks goes from 1.20 (mean; worst 1.71)
    to 1.01 at 128K and from 1.12 to 1.003 at 512K.
    """
    import random

    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]

    def cost(order):
        cuts = [0]
        for i in order:
            cuts.append(cuts[-1] + lengths[i])
        cuts[-1] += tail
        return imbalance([tuple(cuts)], runs_per_rank)

    best = list(range(len(lengths)))
    best_cost = cost(best)
    rng = random.Random(seed)
    for _ in range(min(tries, budget // max(1, len(lengths) * len(runs_per_rank)))):
        if best_cost <= good:
            break
        order = best[:]
        rng.shuffle(order)
        c = cost(order)
        if c < best_cost:
            best, best_cost = order, c
    # then swaps of two documents while one helps (within the same placement budget)
    spent, improved = 0, True
    while improved and best_cost > good and spent < budget:
        improved = False
        for i in range(len(best)):
            for j in range(i + 1, len(best)):
                order = best[:]
                order[i], order[j] = order[j], order[i]
                c = cost(order)
                spent += len(lengths) * len(runs_per_rank)
                if c < best_cost - 1e-9:
                    best, best_cost, improved = order, c, True
            if spent >= budget:
                break
    return best, best_cost


__all__ = ["Segment", "Runs", "Bounds", "Documents", "plan_block", "zigzag_runs", "normalize",
           "boundaries_from_positions", "check_positions", "key", "work", "imbalance", "balanced_order"]
