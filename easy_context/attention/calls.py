"""The kernel calls of one ring block: each planned Segment (plans.py) as one call of the local kernel, with its band
(a sliding window's part in the block) and soft-capping; the own block's documents as one varlen call where the
kernel has a varlen entry point and they are short enough (kernels.Varlen).
"""
from __future__ import annotations

import functools

import torch

from .kernels import Kernel, score_mods
from .kernels import head_major as _t  # (b, s, h, d) <-> (b, h, s, d) views


def use_varlen(kernel: Kernel, segments) -> bool:
    """Whether consecutive calls of the own block (one per document, ``q == k``, causal or unmasked over the whole
    document) go to the kernel's varlen entry point as one call: it has one, and the documents are short enough
    (kernels.Varlen.below). Banded calls (a sliding window) go one by one."""
    vl = kernel.varlen
    return (vl is not None and len(segments) > 1 and len({sg.causal for sg in segments}) == 1
            and all(sg.band is None and sg.q == sg.k for sg in segments)
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


def _softcap_kw(softcap: float) -> dict:
    return {"softcap": softcap} if softcap else {}


def _varlen_forward(kernel: Kernel, q, k, v, rows: slice, segments, scale: float, softcap: float):
    """The own block's consecutive documents ``segments`` (:func:`use_varlen` true) of batch ``rows`` as one varlen
    call. q/k/v flash layout ``(b, s, h, d)``.

    Returns ``(cols, out, lse)``: the local rows the documents cover, and their ``out (nb, h, width, d)`` and
    ``lse (nb, h, width)`` as head-major views of the kernel's token-major results."""
    nb = len(range(*rows.indices(q.shape[0])))
    cols = slice(segments[0].q.start, segments[-1].q.stop)
    width = cols.stop - cols.start
    cu, longest = _cu(segments, nb, q.device)
    # (nb, width, h, d) -> (nb * width, h, d): the rows' documents back to back
    o, l = kernel.varlen.forward(*(_flat(x, rows, cols) for x in (q, k, v)), cu, longest, segments[0].causal, scale,
                                 **_softcap_kw(softcap))
    # (nb * width, h, d) -> (nb, h, width, d); lse (h, nb * width) -> (nb, h, width)
    return cols, o.view(nb, width, *o.shape[1:]).transpose(1, 2), l.view(l.shape[0], nb, width).transpose(0, 1)


def _varlen_backward(kernel: Kernel, dout, q, k, v, out, lse, rows: slice, segments, scale: float, softcap: float):
    """Backward of :func:`_varlen_forward` (dout/q/k/v/out flash layout, lse ``(b, h, s)``): ``(cols, dq, dk, dv)``,
    the gradients ``(nb, h, width, d)`` of the rows ``cols`` (head-major views)."""
    nb = len(range(*rows.indices(q.shape[0])))
    cols = slice(segments[0].q.start, segments[-1].q.stop)
    width = cols.stop - cols.start
    cu, longest = _cu(segments, nb, q.device)
    l = lse[rows, :, cols].transpose(0, 1).reshape(lse.shape[1], nb * width)  # (nb, h, width) -> (h, nb * width)
    g = kernel.varlen.backward(*(_flat(x, rows, cols) for x in (dout, q, k, v, out)), l, cu, longest,
                               segments[0].causal, scale, **_softcap_kw(softcap))
    return (cols, *(x.view(nb, width, *x.shape[1:]).transpose(1, 2) for x in g))


def calls_forward(kernel: Kernel, q, kh, vh, rows: slice, segments, scale: float, own: bool, softcap: float = 0.0):
    """``(query rows, out, lse)`` of each kernel call of ``segments`` over batch ``rows``, in order: q flash layout,
    kh/vh the head-major K/V of the block; the own block's documents as one varlen call where :func:`use_varlen`
    says."""
    if own and use_varlen(kernel, segments):
        yield _varlen_forward(kernel, q, _t(kh), _t(vh), rows, segments, scale, softcap)
        return
    qh = _t(q)
    for sg in segments:
        yield (sg.q, *kernel.forward(qh[rows, :, sg.q], kh[rows, :, sg.k], vh[rows, :, sg.k], sg.causal, scale,
                                     **score_mods(sg.band, softcap)))


def calls_backward(kernel: Kernel, dout, q, kh, vh, out, lse, rows: slice, segments, scale: float, own: bool,
                   softcap: float = 0.0):
    """Backward of :func:`calls_forward`: ``(query rows, key rows, dq, dk, dv)`` of each call (head-major)."""
    if own and use_varlen(kernel, segments):
        cols, *g = _varlen_backward(kernel, dout, q, _t(kh), _t(vh), out, lse, rows, segments, scale, softcap)
        yield (cols, cols, *g)
        return
    doh, qh, oh = _t(dout), _t(q), _t(out)
    for sg in segments:
        yield (sg.q, sg.k, *kernel.backward(doh[rows, :, sg.q], qh[rows, :, sg.q], kh[rows, :, sg.k],
                                            vh[rows, :, sg.k], oh[rows, :, sg.q], lse[rows, :, sg.q], sg.causal,
                                            scale, **score_mods(sg.band, softcap)))


__all__ = ["use_varlen", "calls_forward", "calls_backward"]
