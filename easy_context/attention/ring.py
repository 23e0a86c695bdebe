"""The ring engine every ring-based algorithm shares: the p2p passes over the block plans of plans.py (whose kernel
calls are calls.py's), the forward/backward rings and their autograd Function, the input checks. zigzag_ring.py is
the ring as an algorithm; dist_flash.py runs it for non-causal attention; head_parallel.py (Ulysses, USP) runs it
over the ring positions.

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
Only the rows of a block that some other rank reads travel (plans.block_spans): for packed rows, the parts of
documents that cross a shard boundary.

Sliding windows, soft-capping and sinks: a window is one more constraint on which pairs exist, in the plan (a block
with no pair in the window costs no call; ``stats`` counts them), soft-capping goes to every kernel call, and sinks
enter once per query after the last merge (merge.add_sinks) in the autograd Function.
"""
from __future__ import annotations

import torch

from .backends import acc_dtype
from .calls import calls_backward, calls_forward
from .comm import RingComm, check_same_across_group, dtype_code, group_rank_size
from .documents import Documents
from .documents import key as docs_key
from .kernels import Kernel, check_qkv
from .kernels import head_major as _t  # (b, s, h, d) <-> (b, h, s, d) views
from .merge import add_sinks, merge_into, new_accumulators, sink_grad
from .plans import Spans, block_calls, block_spans, calls_of, pack, ring_calls, single_call, span_rows, split_own


def _pass_on(comm: RingComm, send: list[torch.Tensor], send_spans: Spans, recv_spans: Spans, like, dtype=None):
    """Post the block this rank holds (``send``, packed to ``send_spans``) to the next rank and the receive of the
    previous rank's (packed to ``recv_spans``, shaped like ``like`` otherwise). An empty side is not posted."""
    n = span_rows(recv_spans)
    recv_like = [torch.empty((), dtype=dtype or t.dtype, device=t.device).expand(t.shape[0], n, *t.shape[2:])
                 for t in like]
    w = comm.world
    return comm.exchange(send, (comm.rank + 1) % w if span_rows(send_spans) else None, recv_like,
                         (comm.rank - 1) % w if n else None)


def _local_forward(q, k, v, causal: bool, scale: float, kernel: Kernel, docs, window, softcap, stats):
    """A ring of one rank: each document's call is the final result of its rows (no other keys), so it is written
    straight into the output, without float32 accumulators or merges. Returns ``(out (b,h,s,d) view, lse)``."""
    n = q.shape[1]
    if window is None and single_call(causal, n, docs):  # the kernel's own output
        _count(stats, "forward", 1)
        return kernel.forward(_t(q), _t(k), _t(v), causal, scale, **({"softcap": softcap} if softcap else {}))
    out = torch.empty_like(q).transpose(1, 2)  # (b, h, s, d) view of flash-layout memory
    lse = torch.empty(q.shape[0], q.shape[2], n, dtype=acc_dtype(q.dtype), device=q.device)
    kh, vh = _t(k), _t(v)
    plan = block_calls(0, 0, 1, n, causal, docs, window)
    _count(stats, "forward", calls_of(plan))
    for rows, segments in plan:  # the documents tile the rows (one run: a window leaves one call per document)
        for qs, o, l in calls_forward(kernel, q, kh, vh, rows, segments, scale, True, softcap):
            out[rows, :, qs] = o
            lse[rows, :, qs] = l
    return out, lse


def _local_backward(dout, q, k, v, out, lse, causal: bool, scale: float, kernel: Kernel, docs, window, softcap):
    """Backward of :func:`_local_forward`: each document's gradients are written straight into dq/dk/dv (its rows are
    its own in q and k alike)."""
    n = q.shape[1]
    if window is None and single_call(causal, n, docs):  # the kernel's own gradients
        g = kernel.backward(_t(dout), _t(q), _t(k), _t(v), _t(out), lse, causal, scale,
                            **({"softcap": softcap} if softcap else {}))
        return tuple(x.transpose(1, 2) for x in g)
    dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))
    kh, vh = _t(k), _t(v)
    for rows, segments in block_calls(0, 0, 1, n, causal, docs, window):
        for qs, ks, *g in calls_backward(kernel, dout, q, kh, vh, out, lse, rows, segments, scale, True, softcap):
            for dst, x, sl in zip((dq, dk, dv), g, (qs, ks, ks)):
                _t(dst)[rows, :, sl] = x
    return dq, dk, dv


def _count(stats: dict | None, what: str, calls: int) -> None:
    """``stats``: ``{what}_calls`` (kernel calls), ``{what}_blocks`` (ring blocks with a call), ``skipped_blocks``
    (forward blocks with none: outside the window, or no document in common)."""
    if stats is None:
        return
    stats[f"{what}_calls"] = stats.get(f"{what}_calls", 0) + calls
    stats[f"{what}_blocks"] = stats.get(f"{what}_blocks", 0) + (calls > 0)
    if what == "forward":
        stats["skipped_blocks"] = stats.get("skipped_blocks", 0) + (calls == 0)


def ring_forward(comm: RingComm, q, k, v, causal: bool, scale: float, kernel: Kernel, docs: Documents | None = None,
                 *, window: int | None = None, softcap: float = 0.0, stats: dict | None = None):
    """Forward ring. q/k/v are flash-layout ``(b, s, h, d)``. Returns ``(out (b,h,s,d) view, lse (b,h,s))``.

    ``docs``: the document boundaries of each batch row over the ring's global sequence (None: one document).
    ``window``: a sliding window over the global sequence (causal; plans.py), ``softcap``: the kernels' logit
    soft-capping (0: none). ``stats``: a dict that receives the counts of :func:`_count`, summed over calls."""
    if stats is not None:
        stats.setdefault("skipped_blocks", 0)
    if comm.world == 1:
        return _local_forward(q, k, v, causal, scale, kernel, docs, window, softcap, stats)
    out, lse = new_accumulators(_t(q))
    r, w, n = comm.rank, comm.world, q.shape[1]

    def spans(pos):
        return block_spans(pos % w, w, n, causal, docs, window)

    moving = [pack(k, spans(r)), pack(v, spans(r))]  # the rows of the block other ranks read
    for step in range(w):
        src = (r - step) % w
        pending = _pass_on(comm, moving, spans(src), spans(src - 1), (k, v)) if step + 1 < w else None
        kh, vh = (_t(x) for x in ((k, v) if step == 0 else moving or (k[:, :0], v[:, :0])))  # none: no calls
        plan = ring_calls(r, src, w, n, causal, docs, window)
        _count(stats, "forward", calls_of(plan))
        for rows, segments in plan:
            for qs, o, l in calls_forward(kernel, q, kh, vh, rows, segments, scale, step == 0, softcap):
                merge_into(out[rows, :, qs], lse[rows, :, qs], o, l)
        if pending is not None:
            moving = pending.wait()
    return out, lse


def ring_backward(comm: RingComm, dout, q, k, v, out, lse, causal: bool, scale: float, kernel: Kernel,
                  docs: Documents | None = None, *, window: int | None = None, softcap: float = 0.0,
                  stats: dict | None = None):
    """Backward ring with the final ``out``/``lse``. All tensors flash layout except lse ``(b, h, s)``.

    The K/V rows other ranks read travel as in the forward ring; the float32 dK/dV of those rows travel with them,
    collecting each rank's contribution, and after the last step reach the owner, who adds them to the gradient of
    its own block (the rows no other rank reads never leave it)."""
    if comm.world == 1:
        if stats is not None:
            _count(stats, "backward", calls_of(block_calls(0, 0, 1, q.shape[1], causal, docs, window)))
        return _local_backward(dout, q, k, v, out, lse, causal, scale, kernel, docs, window, softcap)
    acc = acc_dtype(q.dtype)
    r, w, n = comm.rank, comm.world, q.shape[1]

    def spans(pos):
        return block_spans(pos % w, w, n, causal, docs, window)

    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    own = [torch.zeros(k.shape, dtype=acc, device=k.device), torch.zeros(v.shape, dtype=acc, device=v.device)]
    moving = [pack(k, spans(r)), pack(v, spans(r))]
    dkv_pending = None  # dK/dV of the next block (or, after the last step, of the own block's rows others read)
    dqh = _t(dq)

    def block_grads(calls, kh, vh, own_block: bool) -> list:
        """dq of the calls added; returns their (rows, key rows, dk, dv)."""
        grads = []
        for rows, segments in calls:
            for qs, ks, dq_b, dk_b, dv_b in calls_backward(kernel, dout, q, kh, vh, out, lse, rows, segments, scale,
                                                           own_block, softcap):
                dqh[rows, :, qs] += dq_b
                grads.append((rows, ks, dk_b, dv_b))
        return grads

    # the own block in two parts (w > 1 here: a ring of one rank returned above)
    parts = [(rows, split_own(segments)) for rows, segments in ring_calls(r, r, w, n, causal, docs, window)]
    own_first = tuple((rows, a) for rows, (a, _) in parts)
    for step in range(w):
        src = (r - step) % w
        kv_pending = _pass_on(comm, moving, spans(src), spans(src - 1), (k, v)) if step + 1 < w else None
        kh, vh = (_t(x) for x in ((k, v) if step == 0 else moving or (k[:, :0], v[:, :0])))  # none: no calls
        _count(stats, "backward", calls_of(ring_calls(r, src, w, n, causal, docs, window)))
        # (rows, key rows, dk, dv) of this block, added once its accumulated dK/dV has arrived
        grads = block_grads(own_first if step == 0 else ring_calls(r, src, w, n, causal, docs, window), kh, vh,
                            step == 0)
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
    """:func:`ring_forward` / :func:`ring_backward` as one autograd node; saves the final ``out``/``lse`` (with the
    sinks, when given, added once after the last merge: merge.add_sinks)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, causal, scale, kernel, comm, docs, mods):
        window, softcap, stats = mods
        out, lse = ring_forward(comm, q, k, v, causal, scale, kernel, docs, window=window, softcap=softcap,
                                stats=stats)
        if sinks is not None:
            out, lse = add_sinks(out, lse, sinks)
        out = out.transpose(1, 2).to(q.dtype)  # (b, s, h, d)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.causal, ctx.scale, ctx.kernel, ctx.comm, ctx.docs, ctx.mods = causal, scale, kernel, comm, docs, mods
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        window, softcap, stats = ctx.mods
        dout = dout.contiguous()
        dq, dk, dv = ring_backward(ctx.comm, dout, q, k, v, out, lse, ctx.causal, ctx.scale, ctx.kernel, ctx.docs,
                                   window=window, softcap=softcap, stats=stats)
        dsinks = None if sinks is None else sink_grad(_t(dout), _t(out), lse, sinks)
        return dq, dk, dv, dsinks, None, None, None, None, None, None


def check_ring_inputs(q, k, v, causal, group, what, *, zigzag: bool = True, docs: Documents | None = None,
                      window: int | None = None):
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
                                 documents=docs_key(docs), window=window or 0),
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


def ring_attn(q, k, v, causal: bool, scale: float, kernel: Kernel, group=None, docs: Documents | None = None, *,
              window: int | None = None, softcap: float = 0.0, sinks: torch.Tensor | None = None,
              stats: dict | None = None):
    """The zigzag ring over ``group`` without the checks of :func:`zigzag_ring_attn_func` (a building block: that
    function, and head_parallel.py inside Ulysses). A group of one is the kernel itself (one call per document with
    ``docs``). ``window``, ``softcap``, ``sinks`` (``(heads,)``, differentiable), ``stats``: see
    :func:`features.check_features`."""
    return _RingAttn.apply(q, k, v, sinks, causal, scale, kernel, RingComm(group), docs, (window, softcap, stats))
