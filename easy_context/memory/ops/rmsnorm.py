"""Low-memory RMSNorm: ``weight * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype)`` as an autograd
Function that saves ``x`` and one float32 per row; the gradient is the analytic one in float32. Eager on CPU (the
plain code's op sequence, bitwise), one compiled kernel per pass on CUDA."""
from __future__ import annotations

import torch

from ...utils import compiled

# Eager rows per chunk: the float32 temporaries of one chunk stay near 256 MiB whatever the sequence length.
# A compiled kernel keeps no temporaries, so it takes all rows at once.
_NORM_CHUNK_ELEMENTS = 1 << 26


def rms_norm_rows(x, weight, eps: float):
    """(rows, hidden) -> the plain code's ``weight * (x.float() * rstd).to(x.dtype)`` and the float32 rstd."""
    xf = x.to(torch.float32)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (xf * rstd).to(x.dtype), rstd


def _rms_norm_rows_backward(x, weight, rstd, dout):
    """Analytic gradient in float32: dx, and this chunk's float32 dweight."""
    xhat = x.to(torch.float32) * rstd
    g = dout.to(torch.float32) * weight.to(torch.float32)
    dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    # the plain code multiplies the weight by the normalised x rounded to x's dtype
    dw = (dout.to(torch.float32) * xhat.to(x.dtype).to(torch.float32)).sum(0)
    return dx.to(x.dtype), dw


def _row_chunks(fn, eager, rows: int, hidden: int):
    step = rows if fn is not eager else max(1, _NORM_CHUNK_ELEMENTS // hidden)
    return [(i, min(rows, i + step)) for i in range(0, rows, step)]


class _LowMemoryRMSNorm(torch.autograd.Function):
    """``weight * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype)``, saving only ``x`` and the float32
    ``rstd`` per row (the autograd graph of the plain code keeps ``x.float()`` and the normalised ``x`` in x's
    dtype: 6 bytes per element for bf16, vs 2 here, 0 when ``x`` is kept anyway). Eager: the plain code's op
    sequence (bitwise equal), in row chunks; CUDA: one compiled kernel per pass."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        rows = x.reshape(-1, x.shape[-1])  # (batch * seq, hidden)
        fn = compiled(rms_norm_rows, x.device)
        chunks = _row_chunks(fn, rms_norm_rows, *rows.shape)
        if len(chunks) == 1:
            out, rstd = fn(rows, weight, eps)
        else:
            out = torch.empty(rows.shape, dtype=torch.result_type(weight, rows[:1]), device=x.device)
            rstd = torch.empty(rows.shape[0], 1, dtype=torch.float32, device=x.device)
            for a, b in chunks:
                out[a:b], rstd[a:b] = fn(rows[a:b], weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out.view(*x.shape[:-1], x.shape[-1])

    @staticmethod
    def backward(ctx, dout):
        x, weight, rstd = ctx.saved_tensors
        rows, grows = x.reshape(-1, x.shape[-1]), dout.reshape(-1, x.shape[-1])
        fn = compiled(_rms_norm_rows_backward, x.device)
        chunks = _row_chunks(fn, _rms_norm_rows_backward, *rows.shape)
        if len(chunks) == 1:
            dx, dw = fn(rows, weight, rstd, grows)
        else:
            dx = torch.empty_like(rows)
            dw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
            for a, b in chunks:
                dx[a:b], dw_chunk = fn(rows[a:b], weight, rstd[a:b], grows[a:b])
                dw += dw_chunk
        return (dx.view(x.shape) if ctx.needs_input_grad[0] else None,
                dw.to(weight.dtype) if ctx.needs_input_grad[1] else None, None)


def low_memory_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The RMSNorm of ``x`` (``(..., hidden)``) through :class:`_LowMemoryRMSNorm`."""
    return _LowMemoryRMSNorm.apply(x, weight, eps)


__all__ = ["rms_norm_rows", "low_memory_rms_norm"]
