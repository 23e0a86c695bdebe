"""Gradient checkpointing of decoder layers with features per layer: the checkpoint function installed on a model
(:class:`Checkpointer`), host-offloaded layer inputs, and the hook other features use to run code around each
layer's forward and its recompute (``recompute contexts``; attention preservation is one, memory/attn_preserving.py).
Nothing here imports transformers: the model-level functions (which find a transformers model's decoder layers) are
``easy_context.integrations.memory``'s ``enable_offloaded_checkpointing`` and friends.

How transformers reaches us (its documented layer protocol; nothing of it is imported). In transformers 5 every
decoder layer subclasses ``GradientCheckpointingLayer``, whose ``forward`` calls
``self._gradient_checkpointing_func(partial(forward, self, **kwargs), hidden_states)`` when checkpointing is on.
:func:`install_checkpointer` turns checkpointing on with the public
``activation_checkpointing_enable`` (if it is not on yet) and then sets that attribute, on every module that has
``gradient_checkpointing`` (as transformers' own ``_set_gradient_checkpointing`` does), to one
:class:`Checkpointer`: ``torch.utils.checkpoint`` (non-reentrant) plus

* offload: a saved-tensor hook around the checkpoint call. Non-reentrant checkpointing saves only the
  checkpoint's positional inputs (the layer's input hidden state; the kwargs are bound in the partial) outside
  its own recompute hook, so exactly those go through ours: moved to pinned host memory with a non-blocking
  copy on CUDA, and copied back for the recompute in backward. Everything else is recomputed as usual.
* recompute contexts: a named ``context_fn`` of ``torch.utils.checkpoint`` (a pair of context managers, one around
  the first forward and one around the recompute) for the layers a feature selects.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from .host_pool import OffloadedTensor, PinnedHostPool


class Checkpointer:
    """The gradient-checkpointing function of a model: ``torch.utils.checkpoint`` plus the enabled features.

    Called by transformers as ``checkpointer(function, *args, **checkpoint_kwargs)``; each decoder layer gets
    a :class:`_LayerCheckpoint` that calls :meth:`run` with the layer's index, so a feature can cover only some
    layers (``offload=frozenset({0, 1, 2})``).

    Attributes:
        offload: which layers keep their checkpoint inputs (each layer's input hidden state) in host memory:
            True (all), False (none) or a frozenset of decoder-layer indices.
        contexts: ``{name: (selection, context_fn)}``: the recompute contexts of features (same selection forms);
            a checkpointed call takes the ``context_fn`` of the one feature that covers its layer.
        offloaded_tensors, offloaded_bytes: running totals of what went through the offload hook (on a CPU
            device the tensors stay where they are but are still counted).
        host_buffers: the :class:`PinnedHostPool` the offloaded checkpoints of CUDA tensors live in.
    """

    def __init__(self, *, offload: bool | frozenset = False, contexts: dict | None = None,
                 host_buffers: PinnedHostPool | None = None):
        self.offload = offload
        self.contexts = dict(contexts or {})
        self.offloaded_tensors = 0
        self.offloaded_bytes = 0
        self.host_buffers = host_buffers or PinnedHostPool()

    def selection(self, feature: str) -> bool | frozenset:
        """The layers the recompute context ``feature`` covers (False: none)."""
        return self.contexts.get(feature, (False, None))[0]

    @property
    def preserve_attention(self) -> bool | frozenset:
        """The layers attention preservation covers (memory/attn_preserving.py registers it under this name)."""
        return self.selection("preserve_attention")

    def __repr__(self):
        feats = "".join(f", {name}={_describe(sel)}" for name, (sel, _) in self.contexts.items())
        return f"Checkpointer(offload={_describe(self.offload)}{feats})"

    def __call__(self, function, *args, **checkpoint_kwargs):
        return self.run(None, function, *args, **checkpoint_kwargs)

    def run(self, index: int | None, function, *args, use_reentrant: bool = False, **checkpoint_kwargs):
        """Checkpoint ``function(*args)`` for decoder layer ``index`` (None: not a decoder layer, or the global
        patch; then a feature applies if it is on for any layer)."""
        for name, (selection, context_fn) in self.contexts.items():
            if not _covers(selection, index):
                continue
            if use_reentrant:
                raise ValueError(f"{name.replace('_', ' ')} needs non-reentrant checkpointing; do not pass "
                                 "use_reentrant=True in activation_checkpointing_kwargs")
            if "context_fn" in checkpoint_kwargs:
                raise ValueError(f"{name.replace('_', ' ')} sets the checkpoint's context_fn itself; it cannot be "
                                 "combined with another context_fn")
            checkpoint_kwargs["context_fn"] = context_fn
        hooks = (torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack) if _covers(self.offload, index)
                 else contextlib.nullcontext())
        with hooks:
            return checkpoint(function, *args, use_reentrant=use_reentrant, **checkpoint_kwargs)

    def _pack(self, tensor: torch.Tensor):
        self.offloaded_tensors += 1
        self.offloaded_bytes += tensor.numel() * tensor.element_size()
        if tensor.device.type != "cuda":
            return tensor  # host memory already (or no page-locked host memory to go to): nothing to move
        # Page-locked host memory makes the device-to-host copy asynchronous on the current stream; the copy back
        # in backward is queued on the same stream, so it is ordered after this one without a synchronisation.
        host = self.host_buffers.take(tensor.shape, tensor.dtype)
        host.copy_(tensor, non_blocking=True)
        return OffloadedTensor(self.host_buffers, host, tensor.device)

    @staticmethod
    def _unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        return packed.restore()


class _LayerCheckpoint:
    """What one decoder layer calls as its checkpoint function: the model's :class:`Checkpointer` plus its index."""

    def __init__(self, checkpointer: Checkpointer, index: int):
        self.checkpointer, self.index = checkpointer, index

    def __call__(self, function, *args, **checkpoint_kwargs):
        return self.checkpointer.run(self.index, function, *args, **checkpoint_kwargs)

    def __repr__(self):
        return f"{self.checkpointer!r}[layer {self.index}]"


def _covers(selection, index) -> bool:
    if isinstance(selection, bool):
        return selection
    return bool(selection) if index is None else index in selection


def _describe(selection) -> str:
    return repr(selection) if isinstance(selection, bool) else f"layers {sorted(selection)}"


def select_layers(layers, n_layers: int, what: str):
    """``layers`` of the public functions -> True (all) or a frozenset of decoder-layer indices."""
    if layers is None:
        return True
    if isinstance(layers, bool):
        raise TypeError(f"{what}: layers must be None, an int or indices, not a bool")
    if isinstance(layers, int):
        if not 0 <= layers <= n_layers:
            raise ValueError(f"{what}: layers={layers} is not a count of decoder layers (0..{n_layers})")
        return True if layers == n_layers else frozenset(range(layers))
    chosen = frozenset(int(i) for i in layers)
    bad = sorted(i for i in chosen if not 0 <= i < n_layers)
    if bad:
        raise ValueError(f"{what}: layer indices {bad} out of range; the model has {n_layers} decoder layers")
    return True if len(chosen) == n_layers else chosen


def _checkpointed_modules(model):
    return [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]


def install_checkpointer(model, layers: list, *, offload=None,
                         context: tuple[str, bool | frozenset, Callable] | None = None) -> Checkpointer:
    """Turn checkpointing on (if off) and install one :class:`Checkpointer` on ``model``'s layers.

    ``layers``: the model's decoder layers in order (their indices are what selections name; the caller finds them,
    e.g. ``easy_context.integrations.memory.decoder_layers``). ``offload`` (a selection, or None: keep the installed
    one's) and ``context`` (``(name, selection, context_fn)`` of one feature's recompute context, added to the
    installed ones'): the features add up across calls.

    The checkpoint function goes where transformers' ``GradientCheckpointingLayer`` documents it: the
    ``_gradient_checkpointing_func`` of every module with a ``gradient_checkpointing`` flag (what its own
    ``_set_gradient_checkpointing`` does); transformers has no public setter for a custom checkpoint function."""
    modules = _checkpointed_modules(model)
    if not modules or not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing (no module has a "
                         "`gradient_checkpointing` flag)")
    current = getattr(modules[0], "_gradient_checkpointing_func", None)
    current = getattr(current, "checkpointer", current)
    if not isinstance(current, Checkpointer):
        current = Checkpointer()
    offload = current.offload if offload is None else offload
    contexts = dict(current.contexts)
    if context is not None:
        name, selection, context_fn = context
        contexts[name] = (selection, context_fn)
    if not any(m.gradient_checkpointing for m in modules):
        # the public switch: sets the per-layer flags (every layer) and makes the embedding output require grad
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable()
        else:  # transformers < 5.x with only the older name
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointer = Checkpointer(offload=offload, contexts=contexts, host_buffers=current.host_buffers)
    index = {id(m): i for i, m in enumerate(layers)}
    for module in modules:
        i = index.get(id(module))
        module._gradient_checkpointing_func = checkpointer if i is None else _LayerCheckpoint(checkpointer, i)
    return checkpointer


__all__ = ["Checkpointer", "install_checkpointer", "select_layers"]
