"""SwiGLU's ``silu(gate) * up`` as an autograd Function that saves ``gate`` and ``up`` (the plain graph also keeps
``silu(gate)``); analytic float32 backward; eager on CPU, one compiled kernel per pass on CUDA."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...utils import compiled


def silu_mul_eager(gate, up):
    """The plain formula: ``F.silu(gate) * up``."""
    return F.silu(gate) * up


def _wide(t):
    """float32 for 16-bit inputs (float64 stays float64)."""
    return t if t.dtype == torch.float64 else t.to(torch.float32)


def _silu_mul_backward(gate, up, dout):
    g, d = _wide(gate), _wide(dout)
    s = torch.sigmoid(g)
    # d silu(g) / dg = s * (1 + g * (1 - s))
    return (d * _wide(up) * s * (1 + g * (1 - s))).to(gate.dtype), (d * g * s).to(up.dtype)


class _SiluMul(torch.autograd.Function):
    """``silu(gate) * up``, saving ``gate`` and ``up`` (the plain graph also keeps ``silu(gate)``)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return compiled(silu_mul_eager, gate.device)(gate, up)

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        dgate, dup = compiled(_silu_mul_backward, gate.device)(gate, up, dout)
        return dgate if ctx.needs_input_grad[0] else None, dup if ctx.needs_input_grad[1] else None


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` as one fused kernel per pass on CUDA (gate and up of one shape and dtype)."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        return silu_mul_eager(gate, up)
    return _SiluMul.apply(gate, up)


__all__ = ["silu_mul", "silu_mul_eager"]
