"""The ring engine every ring-based algorithm shares: block plans, the p2p passes, the forward/backward rings and
their autograd Function, the input checks. zigzag_ring.py is the ring as an algorithm; dist_flash.py runs it for
non-causal attention; head_parallel.py (Ulysses, USP) runs it over the ring positions.

Layout: zigzag. The global sequence is cut into ``2W`` equal chunks; rank ``r`` holds chunks ``r`` and ``2W-1-r``
(concatenated). K/V blocks travel around the ring (send to r+1, receive from r-1) while the current block is
computed, and every step costs the same: the causal work is balanced.

At step ``s`` rank ``r`` holds the K/V of rank ``src = (r - s) mod W``:

* ``s == 0``: own block, causal (top-left causal over the 2-chunk local block is exact for this layout);
* ``src < r``: all local queries attend the *first* chunk of the K/V block (chunk ``src`` < ``r``);
* ``src > r``: only the *second* local query chunk (``2W-1-r``) attends, to the whole K/V block.

Non-causal attention sees every key from every query, so it needs no layout and serves any sharding.

Packed documents (``docs``): each block computes only the pairs within a document, with the same loop
(documents.py plans the kernel calls; a block with no overlap costs no kernel call). The layout stays zigzag.
The own block's documents go to the kernel's varlen entry point as one call when it has one (:func:`_varlen`).
Backward re-runs the ring; dK/dV (float32) travel with the K/V block and reach its owner after W steps.
Only the rows of a block that some other rank reads travel (:func:`block_spans`): for packed rows, the parts of
documents that cross a shard boundary.
"""
from __future__ import annotations

import functools

import torch

from .backends import acc_dtype
from .comm import RingComm, check_same_across_group, dtype_code, group_rank_size
from .documents import Documents, Segment, plan_block, zigzag_runs
from .documents import key as docs_key
from .kernels import Kernel, check_qkv
from .kernels import head_major as _t  # (b, s, h, d) <-> (b, h, s, d) views
from .merge import merge_into, new_accumulators

Spans = tuple[tuple[int, int], ...]  # ascending, disjoint [start, end) local rows


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


@functools.lru_cache(maxsize=1024)
def block_spans(src: int, world: int, local_len: int, causal: bool, docs: Documents | None) -> Spans:
    """The rows of ring position ``src``'s block that some other rank's calls read: ascending, disjoint
    ``[start, end)`` spans of local rows. Only these rows travel around the ring (K/V forward, dK/dV back).

    Every rank derives the same spans from the same documents, so sender and receiver agree on each message's size
    without asking. Packed rows send only the parts of the documents that cross a shard boundary (none at all for a
    block whose documents stay on their rank); a causal row that is one document still skips the second chunk of
    position 0, which no later query reads; unmasked attention sends everything.
    """
    cuts = sorted((sg.k.start, sg.k.stop) for r in range(world) if r != src
                  for _, segments in block_calls(r, src, world, local_len, causal, docs) for sg in segments)
    spans: list[tuple[int, int]] = []
    for lo, hi in cuts:
        if spans and lo <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], hi))
        else:
            spans.append((lo, hi))
    return tuple(spans)


@functools.lru_cache(maxsize=1024)
def ring_calls(rank: int, src: int, world: int, local_len: int, causal: bool, docs: Documents | None):
    """:func:`block_calls` with the key rows of another rank's block in the coordinates of what travels (the rows
    of :func:`block_spans`, concatenated); the own block keeps its local rows."""
    calls = block_calls(rank, src, world, local_len, causal, docs)
    if src == rank:
        return calls
    spans = block_spans(src, world, local_len, causal, docs)

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


def _span_rows(spans: Spans) -> int:
    return sum(hi - lo for lo, hi in spans)


def _pass_on(comm: RingComm, send: list[torch.Tensor], send_spans: Spans, recv_spans: Spans, like, dtype=None):
    """Post the block this rank holds (``send``, packed to ``send_spans``) to the next rank and the receive of the
    previous rank's (packed to ``recv_spans``, shaped like ``like`` otherwise). An empty side is not posted."""
    n = _span_rows(recv_spans)
    recv_like = [torch.empty((), dtype=dtype or t.dtype, device=t.device).expand(t.shape[0], n, *t.shape[2:])
                 for t in like]
    w = comm.world
    return comm.exchange(send, (comm.rank + 1) % w if _span_rows(send_spans) else None, recv_like,
                         (comm.rank - 1) % w if n else None)


def _varlen(kernel: Kernel, segments) -> bool:
    """Whether consecutive calls of the own block (one per document, ``q == k``) go to the kernel's varlen entry point
    as one call: it has one, and the documents are short enough (kernels.Varlen.below)."""
    vl = kernel.varlen
    return (vl is not None and len(segments) > 1 and len({sg.causal for sg in segments}) == 1
            and (segments[-1].q.stop - segments[0].q.start) / len(segments) < vl.below)


def _cu(segments, batch_rows: int, device):
    """Boundaries of consecutive own-block documents over ``batch_rows`` rows flattened back to back (int32), and the
    longest document."""
    lo = segments[0].q.start
    return _cu_of(tuple(sg.q.start - lo for sg in segments), batch_rows, segments[-1].q.stop - lo, device)


@functools.lru_cache(maxsize=64)
def _cu_of(starts: tuple, batch_rows: int, width: int, device):
    """:func:`_cu` by the documents' starts within their ``width`` rows: built and copied to the device once per row
    of documents, not once per layer, forward and backward."""
    cu = [i * width + a for i in range(batch_rows) for a in starts] + [batch_rows * width]
    longest = max(b - a for a, b in zip(starts, (*starts[1:], width)))
    return torch.tensor(cu, dtype=torch.int32).to(device, non_blocking=True), longest


def _flat(x: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
    """``x[rows, cols]`` ``(nb, s, h, d)`` as ``(nb * s, h, d)`` tokens back to back."""
    x = x[rows, cols]
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])



def _varlen_forward(kernel: Kernel, q, k, v, rows: slice, segments, scale: float):
    """The own block's consecutive documents ``segments`` (``q == k`` each, :func:`_varlen` true) of batch ``rows``
    as one varlen call. q/k/v flash layout ``(b, s, h, d)``.

    Returns ``(cols, out, lse)``: the local rows the documents cover, and their ``out (nb, h, width, d)`` and
    ``lse (nb, h, width)`` as head-major views of the kernel's token-major results."""
    nb = len(range(*rows.indices(q.shape[0])))
    cols = slice(segments[0].q.start, segments[-1].q.stop)
    width = cols.stop - cols.start
    cu, longest = _cu(segments, nb, q.device)
    # (nb, width, h, d) -> (nb * width, h, d): the rows' documents back to back
    o, l = kernel.varlen.forward(*(_flat(x, rows, cols) for x in (q, k, v)), cu, longest, segments[0].causal, scale)
    # (nb * width, h, d) -> (nb, h, width, d); lse (h, nb * width) -> (nb, h, width)
    return cols, o.view(nb, width, *o.shape[1:]).transpose(1, 2), l.view(l.shape[0], nb, width).transpose(0, 1)


def _varlen_backward(kernel: Kernel, dout, q, k, v, out, lse, rows: slice, segments, scale: float):
    """Backward of :func:`_varlen_forward` (dout/q/k/v/out flash layout, lse ``(b, h, s)``): ``(cols, dq, dk, dv)``,
    the gradients ``(nb, h, width, d)`` of the rows ``cols`` (head-major views)."""
    nb = len(range(*rows.indices(q.shape[0])))
    cols = slice(segments[0].q.start, segments[-1].q.stop)
    width = cols.stop - cols.start
    cu, longest = _cu(segments, nb, q.device)
    l = lse[rows, :, cols].transpose(0, 1).reshape(lse.shape[1], nb * width)  # (nb, h, width) -> (h, nb * width)
    g = kernel.varlen.backward(*(_flat(x, rows, cols) for x in (dout, q, k, v, out)), l, cu, longest,
                               segments[0].causal, scale)
    return (cols, *(x.view(nb, width, *x.shape[1:]).transpose(1, 2) for x in g))


def _work(sg: Segment) -> int:
    nq, nk = sg.q.stop - sg.q.start, sg.k.stop - sg.k.start
    return nq * (nq + 1) // 2 if sg.causal else nq * nk


def split_own(segments: tuple) -> tuple[tuple, tuple]:
    """The own block's calls (``q == k`` each, consecutive) in two parts for the backward ring: the first (about a
    quarter of the work) runs while the first remote block arrives, the rest while the last dK/dV hop travels, so
    that neither transfer finds the GPU idle. One call is cut at half its rows (causal: the top-left quarter first,
    then the lower half as an unmasked and a causal call); several go as a prefix and the rest."""
    if len(segments) == 1:
        sg = segments[0]
        a, b = sg.q.start, sg.q.stop
        if b - a < 2:
            return (), segments
        h = a + (b - a) // 2
        if not sg.causal:
            return (Segment(slice(a, h), sg.k, False),), (Segment(slice(h, b), sg.k, False),)
        return (Segment(slice(a, h), slice(a, h), True),), (Segment(slice(h, b), slice(a, h), False),
                                                             Segment(slice(h, b), slice(h, b), True))
    total, done, cut = sum(_work(sg) for sg in segments), 0, 0
    while cut < len(segments) and 4 * (done + _work(segments[cut])) <= total:
        done += _work(segments[cut])
        cut += 1
    return segments[:cut], segments[cut:]


def _single_call(causal: bool, local_len: int, docs) -> bool:
    """One document per row: a ring of one rank is one kernel call over everything."""
    full = slice(0, local_len)
    return block_calls(0, 0, 1, local_len, causal, docs) == ((slice(None), (Segment(full, full, causal),)),)



def _calls_forward(kernel: Kernel, q, kh, vh, rows: slice, segments, scale: float, own: bool):
    """``(query rows, out, lse)`` of each kernel call of ``segments`` over batch ``rows``, in order: q flash layout,
    kh/vh the head-major K/V of the block; the own block's documents as one varlen call where :func:`_varlen` says."""
    if own and _varlen(kernel, segments):
        yield _varlen_forward(kernel, q, _t(kh), _t(vh), rows, segments, scale)
        return
    qh = _t(q)
    for sg in segments:
        yield (sg.q, *kernel.forward(qh[rows, :, sg.q], kh[rows, :, sg.k], vh[rows, :, sg.k], sg.causal, scale))


def _calls_backward(kernel: Kernel, dout, q, kh, vh, out, lse, rows: slice, segments, scale: float, own: bool):
    """Backward of :func:`_calls_forward`: ``(query rows, key rows, dq, dk, dv)`` of each call (head-major)."""
    if own and _varlen(kernel, segments):
        cols, *g = _varlen_backward(kernel, dout, q, _t(kh), _t(vh), out, lse, rows, segments, scale)
        yield (cols, cols, *g)
        return
    doh, qh, oh = _t(dout), _t(q), _t(out)
    for sg in segments:
        yield (sg.q, sg.k, *kernel.backward(doh[rows, :, sg.q], qh[rows, :, sg.q], kh[rows, :, sg.k],
                                            vh[rows, :, sg.k], oh[rows, :, sg.q], lse[rows, :, sg.q], sg.causal,
                                            scale))


def _local_forward(q, k, v, causal: bool, scale: float, kernel: Kernel, docs):
    """A ring of one rank: each document's call is the final result of its rows (no other keys), so it is written
    straight into the output, without float32 accumulators or merges. Returns ``(out (b,h,s,d) view, lse)``."""
    n = q.shape[1]
    if _single_call(causal, n, docs):  # the kernel's own output
        return kernel.forward(_t(q), _t(k), _t(v), causal, scale)
    out = torch.empty_like(q).transpose(1, 2)  # (b, h, s, d) view of flash-layout memory
    lse = torch.empty(q.shape[0], q.shape[2], n, dtype=acc_dtype(q.dtype), device=q.device)
    kh, vh = _t(k), _t(v)
    for rows, segments in block_calls(0, 0, 1, n, causal, docs):  # the documents tile the rows
        for qs, o, l in _calls_forward(kernel, q, kh, vh, rows, segments, scale, True):
            out[rows, :, qs] = o
            lse[rows, :, qs] = l
    return out, lse


def _local_backward(dout, q, k, v, out, lse, causal: bool, scale: float, kernel: Kernel, docs):
    """Backward of :func:`_local_forward`: each document's gradients are written straight into dq/dk/dv (its rows are
    its own in q and k alike)."""
    n = q.shape[1]
    if _single_call(causal, n, docs):  # the kernel's own gradients
        g = kernel.backward(_t(dout), _t(q), _t(k), _t(v), _t(out), lse, causal, scale)
        return tuple(x.transpose(1, 2) for x in g)
    dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))
    kh, vh = _t(k), _t(v)
    for rows, segments in block_calls(0, 0, 1, n, causal, docs):
        for qs, ks, *g in _calls_backward(kernel, dout, q, kh, vh, out, lse, rows, segments, scale, True):
            for dst, x, sl in zip((dq, dk, dv), g, (qs, ks, ks)):
                _t(dst)[rows, :, sl] = x
    return dq, dk, dv


def ring_forward(comm: RingComm, q, k, v, causal: bool, scale: float, kernel: Kernel, docs: Documents | None = None):
    """Forward ring. q/k/v are flash-layout ``(b, s, h, d)``. Returns ``(out (b,h,s,d) view, lse (b,h,s))``.

    ``docs``: the document boundaries of each batch row over the ring's global sequence (None: one document)."""
    if comm.world == 1:
        return _local_forward(q, k, v, causal, scale, kernel, docs)
    out, lse = new_accumulators(_t(q))
    r, w, n = comm.rank, comm.world, q.shape[1]

    def spans(pos):
        return block_spans(pos % w, w, n, causal, docs)

    moving = [pack(k, spans(r)), pack(v, spans(r))]  # the rows of the block other ranks read
    for step in range(w):
        src = (r - step) % w
        pending = _pass_on(comm, moving, spans(src), spans(src - 1), (k, v)) if step + 1 < w else None
        kh, vh = (_t(x) for x in ((k, v) if step == 0 else moving or (k[:, :0], v[:, :0])))  # none: no calls
        for rows, segments in ring_calls(r, src, w, n, causal, docs):
            for qs, o, l in _calls_forward(kernel, q, kh, vh, rows, segments, scale, step == 0):
                merge_into(out[rows, :, qs], lse[rows, :, qs], o, l)
        if pending is not None:
            moving = pending.wait()
    return out, lse


def ring_backward(comm: RingComm, dout, q, k, v, out, lse, causal: bool, scale: float, kernel: Kernel,
                  docs: Documents | None = None):
    """Backward ring with the final ``out``/``lse``. All tensors flash layout except lse ``(b, h, s)``.

    The K/V rows other ranks read travel as in the forward ring; the float32 dK/dV of those rows travel with them,
    collecting each rank's contribution, and after the last step reach the owner, who adds them to the gradient of
    its own block (the rows no other rank reads never leave it)."""
    if comm.world == 1:
        return _local_backward(dout, q, k, v, out, lse, causal, scale, kernel, docs)
    acc = acc_dtype(q.dtype)
    r, w, n = comm.rank, comm.world, q.shape[1]

    def spans(pos):
        return block_spans(pos % w, w, n, causal, docs)

    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    own = [torch.zeros(k.shape, dtype=acc, device=k.device), torch.zeros(v.shape, dtype=acc, device=v.device)]
    moving = [pack(k, spans(r)), pack(v, spans(r))]
    dkv_pending = None  # dK/dV of the next block (or, after the last step, of the own block's rows others read)
    dqh = _t(dq)

    def block_grads(calls, kh, vh, own_block: bool) -> list:
        """dq of the calls added; returns their (rows, key rows, dk, dv)."""
        grads = []
        for rows, segments in calls:
            for qs, ks, dq_b, dk_b, dv_b in _calls_backward(kernel, dout, q, kh, vh, out, lse, rows, segments, scale,
                                                            own_block):
                dqh[rows, :, qs] += dq_b
                grads.append((rows, ks, dk_b, dv_b))
        return grads

    # the own block in two parts (w > 1 here: a ring of one rank returned above)
    parts = [(rows, split_own(segments)) for rows, segments in ring_calls(r, r, w, n, causal, docs)]
    own_first = tuple((rows, a) for rows, (a, _) in parts)
    for step in range(w):
        src = (r - step) % w
        kv_pending = _pass_on(comm, moving, spans(src), spans(src - 1), (k, v)) if step + 1 < w else None
        kh, vh = (_t(x) for x in ((k, v) if step == 0 else moving or (k[:, :0], v[:, :0])))  # none: no calls
        # (rows, key rows, dk, dv) of this block, added once its accumulated dK/dV has arrived
        grads = block_grads(own_first if step == 0 else ring_calls(r, src, w, n, causal, docs), kh, vh, step == 0)
        if step == 0:
            dkv = own
        elif dkv_pending is None:  # the first rank after the owner starts the block's travelling gradient
            dkv = [torch.zeros(x.shape, dtype=acc, device=x.device) for x in moving]
        else:
            dkv = dkv_pending.wait()
        for rows, ks, dk_b, dv_b in grads:
            _t(dkv[0])[rows, :, ks] += dk_b
            _t(dkv[1])[rows, :, ks] += dv_b
        del grads
        if step > 0:  # on with the block: after the last step it arrives at the owner
            dkv_pending = _pass_on(comm, dkv, spans(src), spans(src - 1), (k, v), acc)
        if kv_pending is not None:
            moving = kv_pending.wait()
    # the rest of the own block while the last hop travels
    for rows, ks, dk_b, dv_b in block_grads(tuple((rows, b) for rows, (_, b) in parts), _t(k), _t(v), True):
        _t(own[0])[rows, :, ks] += dk_b
        _t(own[1])[rows, :, ks] += dv_b
    if dkv_pending is not None:
        home = dkv_pending.wait()
        offset = 0
        for lo, hi in spans(r) if home else ():
            own[0][:, lo:hi] += home[0][:, offset:offset + hi - lo]
            own[1][:, lo:hi] += home[1][:, offset:offset + hi - lo]
            offset += hi - lo
    return dq.to(q.dtype), own[0].to(k.dtype), own[1].to(v.dtype)


class _RingAttn(torch.autograd.Function):
    """:func:`ring_forward` / :func:`ring_backward` as one autograd node; saves the final ``out``/``lse``."""

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
        raise ValueError(f"{what}: q and k must be 4-D (batch, seq, heads, head_dim); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}")
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
    """The zigzag ring over ``group`` without the checks of :func:`zigzag_ring_attn_func` (a building block: that
    function, and head_parallel.py inside Ulysses). A group of one is the kernel itself (one call per document with
    ``docs``)."""
    return _RingAttn.apply(q, k, v, causal, scale, kernel, RingComm(group), docs)

