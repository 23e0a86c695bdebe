"""The rotary embedding of one tensor as an autograd Function that saves only ``cos`` and ``sin``; the backward is
the transposed rotation; eager on CPU, one compiled kernel per pass on CUDA, in the memory layout of its input."""
from __future__ import annotations

import torch

from ...utils import compiled


def rope_eager(x, cos, sin):
    """transformers' ``x * cos + rotate_half(x) * sin`` (``rotate_half(x) = cat(-x2, x1)``)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _rope_backward(dout, cos, sin):
    # rotate_half is a signed permutation; its transpose maps z = (z1, z2) to (z2, -z1)
    t = dout * sin
    half = t.shape[-1] // 2
    return dout * cos + torch.cat((t[..., half:], -t[..., :half]), dim=-1)


def _seq_major(x) -> bool:
    """Is ``x`` a ``(batch, heads, seq, head_dim)`` view of ``(batch, seq, heads, head_dim)`` memory (how
    transformers makes q and k)?"""
    return x.dim() == 4 and not x.is_contiguous() and x.transpose(1, 2).is_contiguous()


def _rope_in_layout(fn, x, cos, sin, seq_major: bool):
    """``fn`` over ``(batch, seq, heads, head_dim)`` memory when ``seq_major``: the compiled kernel then reads and
    writes contiguously and returns the layout the eager code would (and the projections' backward wants)."""
    if not seq_major:
        return fn(x, cos, sin)
    return fn(x.transpose(1, 2), cos.transpose(1, 2), sin.transpose(1, 2)).transpose(1, 2)


class _Rope(torch.autograd.Function):
    """Rotary embedding of one tensor, saving only ``cos`` and ``sin``."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.seq_major = _seq_major(x)
        return _rope_in_layout(compiled(rope_eager, x.device), x, cos, sin, ctx.seq_major)

    @staticmethod
    def backward(ctx, dout):
        cos, sin = ctx.saved_tensors
        fn = compiled(_rope_backward, dout.device)
        return _rope_in_layout(fn, dout, cos, sin, ctx.seq_major), None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` through :class:`_Rope` (cos/sin broadcast against ``x``)."""
    return _Rope.apply(x, cos, sin)


__all__ = ["rope_eager", "rope"]
