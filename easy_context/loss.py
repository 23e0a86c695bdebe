"""Cross-entropy over sharded sequences, exactly normalised across ranks, without full-vocabulary logits, and the
module that computes it inside a data-parallel wrapper's forward (:class:`CausalLMWithShardedLoss`).

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

So ``loss_r`` is *not* the loss to log (it is ``|G|`` times this rank's share and differs between ranks); the token
mean is ``global_loss``. The averaging must really happen: DDP averages only the gradients of a backward whose forward
went through the DDP module. A loss computed from ``ddp.module.model(...)`` and ``ddp.module.lm_head.weight`` is never
averaged (each rank keeps its own gradient, and the replicas drift apart); :func:`sharded_cross_entropy` refuses the
weight of a DDP-wrapped model outside that wrapper's forward (see :func:`watch_data_parallel_wrappers`). Compute the
loss inside the wrapped module instead: :class:`CausalLMWithShardedLoss`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn


class ShardedLoss(NamedTuple):
    """What :func:`sharded_cross_entropy` returns.

    Attributes:
        loss: call backward on it. ``|group| * local_sum / num_tokens``: |group| (the world size by default) times this
            rank's share of the token mean, so that the data-parallel average over all ranks (DDP, DeepSpeed, FSDP)
            applies the gradient of the group's token mean. Its value differs between ranks and is not the loss:
            do not log it.
        global_loss: the token-mean cross-entropy over the group, detached, identical on every rank: log this.
        num_tokens: the valid (not ``ignore_index``) targets of the group, int64.
    """

    loss: torch.Tensor
    global_loss: torch.Tensor
    num_tokens: torch.Tensor


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
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or (bias is not None and
                                                                     bias.shape != weight.shape[:1]):
        # ZeRO-3 leaves a size-0 placeholder outside the owner's forward, FSDP a flat shard
        raise ValueError(f"weight {tuple(weight.shape)} (bias {None if bias is None else tuple(bias.shape)}) is not "
                         f"the (vocab, {hidden.shape[-1]}) output projection of hidden {tuple(hidden.shape)}. A "
                         "parameter sharded by DeepSpeed ZeRO-3 or FSDP has another shape outside the forward of the "
                         "module that owns it: compute the loss as that module's forward "
                         "(easy_context.head_cross_entropy_sum, or easy_context.CausalLMWithShardedLoss)")
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


def head_cross_entropy_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, *,
                           ignore_index: int = -100, chunk_size: int = 4096,
                           use_liger: bool | None = None) -> torch.Tensor:
    """:func:`linear_cross_entropy_sum` of the LM head ``head`` (``.weight``, ``.bias``), computed as ``head``'s own
    forward. Whatever shards the head gathers it in hooks around that module's forward (an FSDP2 unit of its own,
    DeepSpeed ZeRO-3's parameter fetch), as for a plain ``head(hidden)``; reading ``head.weight`` from another
    module's forward would see the shard (or ZeRO-3's empty placeholder). So the fused loss works under any wrap
    policy and needs nothing registered by hand."""
    def loss_forward(h):
        return linear_cross_entropy_sum(h, head.weight, targets, bias=head.bias, ignore_index=ignore_index,
                                        chunk_size=chunk_size, use_liger=use_liger)

    own = head.__dict__.get("forward")  # a forward set on the instance (accelerate, liger) is put back
    head.forward = loss_forward  # nn.Module.__call__ runs the hooks around self.forward
    try:
        return head(hidden)
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def sharded_cross_entropy(hidden_states: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          bias: torch.Tensor | None = None, group=None, ignore_index: int = -100,
                          chunk_size: int = 4096, use_liger: bool | None = None) -> ShardedLoss:
    """Token-mean cross-entropy over a sequence sharded across ranks, ready for data-parallel backward.

    Collective: every rank of ``group`` must call it (one all-reduce of two numbers). For training under DDP /
    DeepSpeed / FSDP call it inside the wrapped module's forward: :class:`CausalLMWithShardedLoss` does.

    Args:
        hidden_states: ``(batch, local_seq, hidden)`` this rank's final hidden states (after the final norm);
            weight/bias: the LM head (``get_output_embeddings()``).
        targets: ``(batch, local_seq)`` this rank's *already-shifted* targets (the target of token t is token t+1 of
            the global sequence), ``ignore_index`` where no loss:
            ``prepare_seq_parallel_inputs(...)["local_target_ids"]``.
            A shard cannot be shifted locally: its last token's target lives on another rank.
        group: ranks whose valid tokens form the average. None (default) = the whole world: the token mean over
            the global DP x SP batch. Pass the SP group (``easy_context.attention.comm.get_sp_group(sp_size)``) for
            the mean of per-replica token means.
        chunk_size, use_liger: see :func:`linear_cross_entropy_sum`.
    Returns:
        :class:`ShardedLoss`: ``loss`` = ``|group| * local_sum / N_group`` (backward on it; not the number to log),
        whose gradient after the usual averaging over all world ranks (DDP, DeepSpeed, FSDP) equals the gradient of
        the group token mean (see the module docstring); ``global_loss`` = that token mean, detached, identical on all
        ranks (log it); ``num_tokens`` = ``N_group``. With no valid target anywhere the loss is 0.
    Raises:
        RuntimeError: ``weight`` belongs to a model wrapped in DDP and this call is not inside that wrapper's forward
            while gradients are recorded: DDP would not average the gradients (use :class:`CausalLMWithShardedLoss`).
        ValueError: shapes that disagree (also a ZeRO-3 / FSDP parameter read outside its module's forward).
    """
    _check_inside_data_parallel_forward(weight, hidden_states)
    local_sum = linear_cross_entropy_sum(hidden_states, weight, targets, bias=bias, ignore_index=ignore_index,
                                         chunk_size=chunk_size, use_liger=use_liger)
    return group_token_mean(local_sum, (targets != ignore_index).sum(), group=group)


def group_token_mean(local_sum: torch.Tensor, local_count: torch.Tensor, *, group=None) -> ShardedLoss:
    """:class:`ShardedLoss` from this rank's cross-entropy sum and valid-target count (one all-reduce over
    ``group``; see the module docstring for the scaling)."""
    # float64 keeps token counts exact far beyond 2^24
    stats = torch.stack([local_sum.detach().double(), local_count.to(local_sum.device).double()])
    group_size = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats, group=group)
        group_size = dist.get_world_size(group)
    count = stats[1].clamp(min=1.0)
    loss = local_sum * (group_size / count).to(local_sum.dtype)
    return ShardedLoss(loss, (stats[0] / count).float(), stats[1].long())


class CausalLMWithShardedLoss(nn.Module):
    """``forward(input_ids, position_ids, target_ids) -> ShardedLoss`` of a causal LM on this rank's shard.

    The public training API: the decoder, the LM head and :func:`sharded_cross_entropy` all run inside *this*
    module's forward, so give this module (not the causal LM) to ``accelerator.prepare`` / DDP / DeepSpeed / FSDP.
    Their forward hooks then cover the whole computation: DDP arms its gradient averaging, ZeRO-3 and FSDP gather
    the parameters. Calling the inner ``model.model(...)`` and the loss yourself bypasses them (DDP: gradients
    never averaged, refused by :func:`sharded_cross_entropy`).

    Usage::

        model = CausalLMWithShardedLoss(causal_lm)      # after apply_seq_parallel_monkey_patch(seq_algo, causal_lm)
        model, optimizer = accelerator.prepare(model, optimizer)
        p = prepare_seq_parallel_inputs(seq_algo, ids, None, targets, rank, world, device)
        out = model(p["local_input_ids"], p["local_position_ids"], p["local_target_ids"])
        accelerator.backward(out.loss)                   # W x this rank's share: DDP's average is exact
        log(out.global_loss)                             # the token mean over the global batch

    Args:
        model: a transformers causal LM (``base_model`` = the decoder, ``get_output_embeddings()`` = the head).
        loss_group: the ranks whose tokens form one token mean (None: the whole world).
        chunk_size: tokens per chunk of the fused head + cross-entropy.
    Notes:
        The fused head + loss runs as the LM head's forward (:func:`head_cross_entropy_sum`), so ZeRO-3 and FSDP
        gather the head for it under any wrap policy (the head in the root unit or in one of its own).
    """

    def __init__(self, model, *, loss_group=None, chunk_size: int = 4096):
        super().__init__()
        watch_data_parallel_wrappers()
        self.model = model
        self.loss_group = loss_group
        self.chunk_size = chunk_size

    @property
    def config(self):
        """The causal LM's config (accelerate sizes DeepSpeed's "auto" buckets from ``config.hidden_size``)."""
        return self.model.config

    def register_for_zero3(self) -> None:
        """Kept for callers written before the head's loss ran in the head's own forward (which ZeRO-3 already
        gathers, see :func:`head_cross_entropy_sum`): nothing to register any more."""

    def forward(self, input_ids, position_ids, target_ids):
        """``(batch, local_seq)`` ids, global positions and pre-shifted targets of this rank's shard (as
        ``prepare_seq_parallel_inputs`` returns them) -> :class:`ShardedLoss`."""
        # (batch, local_seq) -> (batch, local_seq, hidden): the decoder without the head. No cache and no
        # attention_mask: only then does transformers read position_ids that restart at 0 as packed documents and mask
        # attention between them (sdpa/eager, data_parallel); a cache or a 2-D mask would silently turn that off.
        hidden = self.model.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False)[0]
        head = self.model.get_output_embeddings()
        _check_inside_data_parallel_forward(head.weight, hidden)
        local_sum = head_cross_entropy_sum(head, hidden, target_ids, chunk_size=self.chunk_size)
        return group_token_mean(local_sum, (target_ids != -100).sum(), group=self.loss_group)


# ------------------------------------------------------------------ the DDP bypass guard
#
# DDP averages gradients only for a backward whose forward ran through the DDP module (its forward arms the reducer);
# nothing marks a module or parameter as wrapped. So the modules DDP wraps are seen as DDP registers them
# (``self.module = module`` in its constructor fires torch's module registration hooks): their parameters get a
# reference to a small per-DDP state whose counter the DDP module's own forward hooks raise and lower. A loss on such
# a weight while the counter is 0 is the bypass. Cost: one isinstance per submodule registration, two counter updates
# per DDP forward, one getattr per loss.

_REGISTRATION_HOOK = []  # the handle, once installed


class _WrapperForward:
    """How many forwards of one DDP module are running (0: outside its forward)."""

    def __init__(self, wrapper: nn.Module):
        self.depth = 0
        self.name = type(wrapper).__name__
        wrapper.register_forward_pre_hook(self._enter)
        wrapper.register_forward_hook(self._leave, always_call=True)

    def _enter(self, module, args):
        self.depth += 1

    def _leave(self, module, args, output):
        self.depth -= 1


def _on_register(parent: nn.Module, name: str, submodule):
    if isinstance(parent, nn.parallel.DistributedDataParallel) and name == "module" and submodule is not None:
        state = _WrapperForward(parent)
        for param in submodule.parameters():
            param._easy_context_wrapper_forward = state  # the newest wrapper wins (a module re-wrapped)
    return None


def watch_data_parallel_wrappers() -> None:
    """From now on, remember which parameters a ``DistributedDataParallel`` wraps, so that
    :func:`sharded_cross_entropy` can refuse to compute a loss DDP would not average. Idempotent; called by
    ``apply_seq_parallel_monkey_patch`` and :class:`CausalLMWithShardedLoss` (wrappers built earlier are not seen)."""
    if not _REGISTRATION_HOOK:
        _REGISTRATION_HOOK.append(nn.modules.module.register_module_module_registration_hook(_on_register))


def _check_inside_data_parallel_forward(weight: torch.Tensor, hidden: torch.Tensor) -> None:
    state = getattr(weight, "_easy_context_wrapper_forward", None)
    if state is None or state.depth or not torch.is_grad_enabled() or not (weight.requires_grad or
                                                                            hidden.requires_grad):
        return
    raise RuntimeError(f"sharded_cross_entropy got the LM head weight of a model wrapped in {state.name}, outside the "
                       f"wrapper's forward: {state.name} would never average these gradients (each rank would train "
                       "on its own). Compute the loss inside the wrapped module: wrap the causal LM in "
                       "easy_context.CausalLMWithShardedLoss before accelerator.prepare / DDP and call "
                       "model(local_input_ids, local_position_ids, local_target_ids); for evaluation use "
                       "torch.no_grad()")


__all__ = ["ShardedLoss", "sharded_cross_entropy", "linear_cross_entropy_sum", "group_token_mean",
           "CausalLMWithShardedLoss", "watch_data_parallel_wrappers"]
