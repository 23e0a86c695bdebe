"""The one online-softmax merge of partial attention results, in float32.

A partial result over a block of keys is ``(out_i, lse_i)`` with ``out_i`` normalised over that block.
Over the union of blocks: ``lse = log(sum_i exp(lse_i))`` and ``out = sum_i out_i * exp(lse_i - lse)``.
The accumulators are updated in place; rows of the accumulator can be addressed with a slice so a block
that covers only part of the local queries (half of a zigzag shard) merges into those rows.
"""
from __future__ import annotations

import torch

from ..utils import compiled
from .backends import acc_dtype

ENV_COMPILE = "EASY_CONTEXT_COMPILE_MERGE"


def merge_eager(out_acc, lse_acc, out_blk, lse_blk):
    lse_blk = lse_blk.to(lse_acc.dtype)
    new_lse = torch.logaddexp(lse_acc, lse_blk)
    # Rows where both are -inf (nothing seen yet anywhere) would give nan; keep them at weight 0.
    new_safe = torch.where(torch.isneginf(new_lse), torch.zeros_like(new_lse), new_lse)
    w_acc = torch.exp(lse_acc - new_safe).unsqueeze(-1)
    w_blk = torch.exp(lse_blk - new_safe).unsqueeze(-1)
    out_acc.mul_(w_acc).add_(out_blk.to(out_acc.dtype) * w_blk)
    lse_acc.copy_(new_lse)


def _merge_fn(device: torch.device):
    """Eager merge on CPU; on CUDA one fused torch.compile'd kernel (~5x less time than eager, which costs
    ~6% of a ring step), unless ``EASY_CONTEXT_COMPILE_MERGE=0``."""
    return compiled(merge_eager, device, env=ENV_COMPILE)


def merge_into(out_acc: torch.Tensor, lse_acc: torch.Tensor, out_blk: torch.Tensor, lse_blk: torch.Tensor) -> None:
    """Merge a block result into accumulators in place.

    Args:
        out_acc: float32 (or float64) ``(batch, heads, rows, head_dim)`` accumulator (a view is fine).
        lse_acc: same dtype ``(batch, heads, rows)``; ``-inf`` where nothing was merged yet.
        out_blk: ``(batch, heads, rows, head_dim)`` block output, any float dtype.
        lse_blk: ``(batch, heads, rows)`` block log-sum-exp.
    """
    _merge_fn(out_acc.device)(out_acc, lse_acc, out_blk, lse_blk)


def new_accumulators(q: torch.Tensor):
    """Zeroed ``(out, lse)`` accumulators for queries ``q`` ``(batch, heads, seq, head_dim)``.

    ``out`` is laid out in memory as ``(batch, seq, heads, head_dim)`` (returned as a transposed view), so
    the final result converts to the flash-attn layout without a copy.
    """
    acc = acc_dtype(q.dtype)
    b, h, s, d = q.shape
    out = torch.zeros(b, s, h, d, dtype=acc, device=q.device).transpose(1, 2)
    lse = torch.full((b, h, s), float("-inf"), dtype=acc, device=q.device)
    return out, lse


def add_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor):
    """Attention sinks (gpt-oss's ``s_aux``) on the merged result of *all* key blocks: ``(out', lse')``.

    A sink is one logit ``s_h`` per head that joins every query's softmax and is then dropped (it has no value):
    ``p_ij = exp(x_ij) / (exp(s_h) + sum_j' exp(x_ij'))``. With ``lse_i = log sum_j exp(x_ij)`` the merge of the key
    blocks (ring steps, documents, windowed calls), the denominator is ``exp(lse'_i)`` with
    ``lse'_i = logaddexp(lse_i, s_h)``, so ``out'_i = sum_j p_ij v_j = out_i * exp(lse_i - lse'_i)``. The sink must
    enter once per query over the whole sequence: applied after the last merge, never per block (a sink merged into
    W blocks would count W times).

    Backward with ``(out', lse')``: every block kernel's backward with the final ``out'`` and ``lse'`` is exact,
    because ``exp(x_ij - lse'_i)`` is the true probability ``p_ij`` and the softmax Jacobian term is
    ``sum_j p_ij dP_ij + p_i,sink * 0 = rowsum(dout_i * out'_i)`` (the dropped sink column has no value, so no
    ``dP``); the sink's own gradient is :func:`sink_grad`.

    Args:
        out: ``(b, h, s, d)`` normalised over all keys; lse ``(b, h, s)``; sinks ``(h,)``.
    Returns:
        ``out'`` in out's dtype (computed in lse's precision), ``lse'`` like lse.
    """
    new = torch.logaddexp(lse, sinks.detach().to(lse.dtype).view(1, -1, 1))
    scale = torch.exp(lse - new).unsqueeze(-1)
    return (out.to(scale.dtype) * scale).to(out.dtype), new


def sink_grad(dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Gradient of the sink logits ``(h,)`` from this rank's queries (:func:`add_sinks`'s ``out'``, ``lse'``).

    ``d s_h = sum_i p_i,sink (dP_i,sink - delta_i) = -sum_{b,i} exp(s_h - lse'_bhi) * rowsum(dout_bhi * out'_bhi)``
    (softmax backward of the sink column, whose ``dP`` is 0). Each rank sums over the queries it holds, so the sum
    over the ranks of a sequence-parallel group is the gradient over the whole sequence, the convention every other
    parameter follows (DDP sums / averages it). Tensors head-major ``(b, h, s, d)``, lse ``(b, h, s)``.
    """
    acc = lse.dtype
    delta = (dout.to(acc) * out.to(acc)).sum(-1)  # (b, h, s)
    p_sink = torch.exp(sinks.detach().to(acc).view(1, -1, 1) - lse)
    return -(p_sink * delta).sum(dim=(0, 2)).to(sinks.dtype)
