"""Cross-entropy over sharded sequences, exactly normalised across ranks, without full-vocabulary logits.

Why the loss is reduced across ranks: under sequence parallelism each rank holds a slice of the targets, and
the number of valid (non -100) targets differs between slices (SFT prompts, padding). A per-rank mean followed
by the usual gradient averaging weights tokens unequally. Here every rank scales its *sum* by the global
valid-token count instead.

Derivation. Let ``S_r`` be the CE sum over rank r's valid targets, ``G`` the group of ranks whose tokens form
one average (default: the whole world, i.e. the token mean over the entire DP x SP batch), ``N_G`` its
valid-token count and ``W`` the world size. Data-parallel wrappers (DDP, DeepSpeed, FSDP) average gradients
over all ``W`` ranks, so the applied gradient is ``(1/W) * sum_r grad(loss_r)``. With
``loss_r = |G| * S_r / N_G``:

* ``G`` = world: ``(1/W) * sum_r W * grad(S_r) / N = grad(sum_r S_r / N)``, the gradient of the global
  token mean;
* ``G`` = the SP group (``|G| = sp``, ``W/sp`` groups): ``(1/W) * sum_G sp * grad(S_G) / N_G =
  (sp/W) * sum_G grad(S_G / N_G)``, the gradient of the mean over replicas of each replica's token mean.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist


class ShardedLoss(NamedTuple):
    loss: torch.Tensor         # this rank's scaled loss: call backward on it (see module docstring)
    global_loss: torch.Tensor  # detached token-mean CE over the group: the number to log (same on every rank)
    num_tokens: torch.Tensor   # valid targets in the group (int64)


class _LinearCrossEntropySum(torch.autograd.Function):
    """``sum_i CE(hidden_i @ weight.T + bias, target_i)`` over valid targets, computed chunk by chunk.

    Only one chunk's ``(chunk, vocab)`` fp32 logits exist at a time. The gradients are computed in the forward
    (the loss is a scalar, so backward only rescales them), which avoids recomputing the logits.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, chunk_size):
        # hidden (n, h), weight (v, h), bias (v,) or None, targets (n,)
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if want_b else None
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size]
            t = targets[start:start + chunk_size]
            logits = (h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())).float()  # (c, v)
            valid = t != ignore_index
            safe_t = torch.where(valid, t, 0)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe_t[:, None]).squeeze(1)
            total += torch.where(valid, lse - picked, 0.0).sum()
            if want_h or want_w or want_b:
                # d CE / d logits = softmax - onehot, zero on ignored rows; reuse the logits buffer
                g = logits.sub_(lse[:, None]).exp_()
                g[torch.arange(g.shape[0], device=g.device), safe_t] -= 1.0
                g.mul_(valid[:, None])
                if want_h:
                    grad_h[start:start + chunk_size] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
                if want_w:
                    grad_w += (g.t().to(h.dtype) @ h).float()
                if want_b:
                    grad_b += g.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        scale = grad_out.float()
        dh = None if grad_h is None else grad_h * scale.to(grad_h.dtype)
        dw = None if grad_w is None else (grad_w * scale).to(w_dtype)
        db = None if grad_b is None else (grad_b * scale).to(b_dtype)
        return dh, dw, db, None, None, None


def _liger_sum(hidden, weight, bias, targets, ignore_index):
    """liger-kernel's fused linear cross-entropy (CUDA), reduction="sum"; None if liger is not installed."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy(input=hidden, weight=weight, target=targets, bias=bias,
                                            ignore_index=ignore_index, reduction="sum").float()


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                             bias: torch.Tensor | None = None, ignore_index: int = -100, chunk_size: int = 4096,
                             use_liger: bool | None = None) -> torch.Tensor:
    """Sum of token cross-entropies of ``hidden @ weight.T (+ bias)`` against ``targets``, ignored ones skipped.

    Args:
        hidden: ``(..., hidden_size)`` final hidden states (after the final norm).
        weight: ``(vocab, hidden_size)`` output projection (``model.lm_head.weight``); bias ``(vocab,)``.
        targets: ``hidden.shape[:-1]`` token ids, already shifted (target of position t is token t+1).
        chunk_size: tokens per chunk; peak extra memory is ``chunk_size x vocab`` fp32 logits.
        use_liger: None = liger-kernel's fused kernel on CUDA when installed; False = never; True = require it.
    Returns:
        fp32 scalar, differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree: targets must "
                         "have hidden.shape[:-1]")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).to(hidden.device)
    if use_liger or (use_liger is None and hidden.is_cuda):
        out = _liger_sum(hidden, weight, bias, targets, ignore_index)
        if out is not None:
            return out
        if use_liger:
            raise ImportError("use_liger=True needs liger-kernel: pip install liger-kernel")
    return _LinearCrossEntropySum.apply(hidden, weight, bias, targets, ignore_index, chunk_size)


def sharded_cross_entropy(hidden_states: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          bias: torch.Tensor | None = None, group=None, ignore_index: int = -100,
                          chunk_size: int = 4096, use_liger: bool | None = None) -> ShardedLoss:
    """Token-mean cross-entropy over a sequence sharded across ranks, ready for data-parallel backward.

    Collective: every rank of ``group`` must call it (one all-reduce of two numbers).

    Args:
        hidden_states: ``(batch, local_seq, hidden)`` this rank's final hidden states (e.g.
            ``model.model(...).last_hidden_state``); weight/bias: the LM head (``model.lm_head.weight``).
        targets: ``(batch, local_seq)`` this rank's already-shifted targets, ``ignore_index`` where no loss.
        group: ranks whose valid tokens form the average. None (default) = the whole world: the token mean over
            the global DP x SP batch. Pass the SP group (``easy_context.attention.comm.get_sp_group(sp_size)``) for the mean
            of per-replica token means.
        chunk_size, use_liger: see :func:`linear_cross_entropy_sum`.
    Returns:
        :class:`ShardedLoss`: ``loss`` = ``|group| * local_sum / N_group``, whose gradient after the usual
        averaging over all world ranks (DDP, DeepSpeed, FSDP) equals the gradient of the group token mean (see the
        module docstring); ``global_loss`` = that token mean, detached, identical on all ranks (log it);
        ``num_tokens`` = ``N_group``. With no valid target anywhere the loss is 0.
    """
    local_sum = linear_cross_entropy_sum(hidden_states, weight, targets, bias=bias, ignore_index=ignore_index,
                                         chunk_size=chunk_size, use_liger=use_liger)
    # float64 keeps token counts exact far beyond 2^24
    stats = torch.stack([local_sum.detach().double(), (targets != ignore_index).sum().to(local_sum.device).double()])
    group_size = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats, group=group)
        group_size = dist.get_world_size(group)
    count = stats[1].clamp(min=1.0)
    loss = local_sum * (group_size / count).to(local_sum.dtype)
    return ShardedLoss(loss, (stats[0] / count).float(), stats[1].long())


__all__ = ["ShardedLoss", "sharded_cross_entropy", "linear_cross_entropy_sum"]
