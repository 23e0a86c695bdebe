"""Attention-preserving checkpointing (LightSeq's idea), the mechanism: the backward recompute of a checkpointed
decoder layer skips the attention forward. The wrapped attention (:func:`preserving_attention`) keeps its result
from the first forward (its own small autograd graph on detached q/k/v, without q/k/v themselves) and serves it
during the recompute; the checkpoint's ``context_fn`` (a recompute context of the :class:`Checkpointer`,
:func:`attention_frame_contexts`) gives the first forward and the recompute of each layer a shared
:class:`_AttentionFrame`. Nothing here imports transformers: registering the wrapper with its ``AttentionInterface``
is ``easy_context.integrations.memory.enable_attention_preserving_checkpointing``.
"""
from __future__ import annotations

import contextvars
from typing import Callable

import torch

from ..attention import lean_all_to_all


class _AttentionFrame:
    """Attention results of one checkpointed call (one decoder layer), in call order."""

    def __init__(self):
        self.entries: list[_PreservedEntry] = []
        self.cursor = 0


class _FrameContext:
    """Makes ``frame`` the active one (forward: record; recompute: replay). Re-enterable: a second backward
    through a retained graph recomputes again."""

    def __init__(self, frame: _AttentionFrame, replay: bool):
        self.frame, self.replay, self._tokens = frame, replay, []

    def __enter__(self):
        self.frame.cursor = 0
        self._tokens.append(_ACTIVE_FRAME.set((self.frame, self.replay)))

    def __exit__(self, *exc):
        _ACTIVE_FRAME.reset(self._tokens.pop())
        return False


# (frame, replay) of the checkpointed call running in this thread; the recompute runs in whichever thread runs
# backward and enters its context there, so a context variable (per thread) is exactly right.
_ACTIVE_FRAME: contextvars.ContextVar = contextvars.ContextVar("easy_context_attention_frame", default=None)


def attention_frame_contexts():
    """``context_fn`` of torch.utils.checkpoint: one frame shared by the forward and its recompute."""
    frame = _AttentionFrame()
    return _FrameContext(frame, replay=False), _FrameContext(frame, replay=True)


class _PreservedEntry:
    """One attention call of the first forward: its own small autograd graph on detached q/k/v, kept for backward."""

    def __init__(self):
        self.inputs: tuple | None = None  # detached q, k, v (leaves of the kept graph)
        self.out: torch.Tensor | None = None  # the attention output, root of the kept graph
        self.recomputed: tuple | None = None  # q, k, v of the recompute, standing in for the kept graph's
        self.requires_grad = False

    def release(self):
        self.inputs = self.out = self.recomputed = None


class _Slot:
    """A saved tensor of the kept graph that is (a view of) q, k or v: not kept, since the recompute produces
    the same values again; rebuilt from the recomputed tensor with the same layout when backward needs it."""

    __slots__ = ("index", "size", "stride", "offset")

    def __init__(self, index, t):
        self.index, self.size, self.stride, self.offset = index, t.size(), t.stride(), t.storage_offset()


# Running count of q/k/v tensors the kept attention graphs did not keep (the recompute provides them): read by
# bench/diag_memory.py to see the saving happen.
stats = {"qkv_not_kept": 0}


def _light_hooks(entry: _PreservedEntry):
    """Saved-tensor hooks for the first forward: keep everything (shadowing the checkpoint's hooks, which would
    drop it) except q, k, v themselves, which the recompute provides again. So a layer keeps its attention
    output and lse, not its q/k/v: about ``seq x hidden`` instead of ``(2 + 2 kv/heads) x seq x hidden``."""
    ptrs = [(t.untyped_storage().data_ptr(), t.device, t.dtype) for t in entry.inputs]

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.device, t.dtype)
        if key not in ptrs:
            return t
        stats["qkv_not_kept"] += 1
        return _Slot(ptrs.index(key), t)

    def unpack(x):
        if not isinstance(x, _Slot):
            return x
        if entry.recomputed is None:
            raise RuntimeError("attention-preserving checkpointing: backward reached a kept attention before its "
                               "layer was recomputed (is the layer checkpointed with the installed Checkpointer?)")
        return entry.recomputed[x.index].as_strided(x.size, x.stride, x.offset)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


class _PreservedAttention(torch.autograd.Function):
    """Runs the real attention on detached q/k/v with its own graph and keeps it (outside the checkpoint).

    Backward differentiates that kept graph, so the attention's own backward (kernel, ring, all-to-all) runs
    unchanged with what it saved in the first forward; the recompute never runs the attention forward again.
    """

    @staticmethod
    def forward(ctx, entry, call, query, key, value):
        detached = tuple(t.detach().requires_grad_(t.requires_grad) for t in (query, key, value))
        entry.inputs = detached
        # our hooks shadow the checkpoint's: the attention's saved tensors are kept (q/k/v: re-provided by the
        # recompute), not dropped for recompute
        # Ulysses/USP: save sequence-sharded inputs, not head-sharded copies
        with lean_all_to_all(), torch.enable_grad(), _light_hooks(entry):
            out, _ = call(*detached)
        entry.out = out
        # The leaves share storage with this forward's q/k/v; holding them would keep q/k/v alive for the whole
        # step. Point them at empty storage now and at the recompute's q/k/v in backward (same shapes).
        for t in detached:
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)
        entry.requires_grad = any(t.requires_grad for t in detached)
        ctx.entry = entry
        return out.detach()

    @staticmethod
    def backward(ctx, dout):
        entry = ctx.entry
        if entry.out is None:
            raise RuntimeError("attention-preserving checkpointing frees each kept attention graph in backward; "
                               "backward twice through one graph (retain_graph=True) is not supported")
        if entry.recomputed is None:
            raise RuntimeError("attention-preserving checkpointing: backward reached a kept attention before its "
                               "layer was recomputed (is the layer checkpointed with the installed Checkpointer?)")
        for leaf, again in zip(entry.inputs, entry.recomputed):
            leaf.data = again
        wanted = [t for t in entry.inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(entry.out, wanted, dout) if entry.out.requires_grad else [None] * 3)
        result = [next(grads) if t.requires_grad else None for t in entry.inputs]
        entry.release()
        return (None, None, *result)


def preserving_attention(resolve_inner: Callable, label: str) -> Callable:
    """An attention function (transformers' interface: ``fn(module, query, key, value, attention_mask, **kwargs)
    -> (out, weights)``) around the one ``resolve_inner(module)`` returns, preserving its result for the recompute.

    Outside a checkpointed layer (checkpointing off, eval, no_grad, layers skipped by ``every_n_layers``) it calls
    the inner attention unchanged. In the first forward of a checkpointed layer (a recompute context of
    :func:`attention_frame_contexts` active) it runs the inner attention once and keeps its graph; during that
    layer's recompute it returns the kept output instead of recomputing. ``label`` names it in tracebacks.
    """

    def preserving_attention(module, query, key, value, attention_mask, **kwargs):
        inner = resolve_inner(module)
        state = _ACTIVE_FRAME.get()
        if state is None:
            return inner(module, query, key, value, attention_mask, **kwargs)
        frame, replay = state
        if replay:
            if frame.cursor >= len(frame.entries):
                raise RuntimeError("checkpoint recompute called attention more often than the forward did")
            entry = frame.entries[frame.cursor]
            frame.cursor += 1
            if entry.out is None:
                raise RuntimeError("attention-preserving checkpointing: the kept attention output was already "
                                   "freed by a backward; retain_graph=True double backward is not supported")
            if entry.out.shape[:2] != (query.shape[0], query.shape[2]):
                raise RuntimeError(f"checkpoint recompute: attention inputs {tuple(query.shape)} do not match the "
                                   f"forward's output {tuple(entry.out.shape)}")
            # The recompute's graph is thrown away; only what later ops save matters, and they save the same
            # tensors when this output requires grad exactly as the forward's did. Its q/k/v stand in for the
            # ones the kept graph did not keep.
            entry.recomputed = (query.detach(), key.detach(), value.detach())
            return entry.out.detach().requires_grad_(entry.requires_grad), None
        entry = _PreservedEntry()
        frame.entries.append(entry)

        def call(q, k, v):
            return inner(module, q, k, v, attention_mask, **kwargs)

        return _PreservedAttention.apply(entry, call, query, key, value), None

    preserving_attention.__qualname__ = f"preserving_attention[{label}]"
    return preserving_attention


__all__ = ["preserving_attention", "attention_frame_contexts", "stats"]
