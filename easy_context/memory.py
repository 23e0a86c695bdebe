"""Activation memory for long-context training: offloaded and attention-preserving checkpointing, tiled MLP.

All three are exact (the same loss and gradients as the plain model, up to float rounding) and switch on per
model; they compose with each other and with the sequence-parallel attention of :mod:`easy_context.hf`.

How transformers reaches us. In transformers 5 every decoder layer subclasses ``GradientCheckpointingLayer``,
whose ``forward`` calls ``self._gradient_checkpointing_func(partial(forward, self, **kwargs), hidden_states)``
when checkpointing is on. :func:`enable_offloaded_checkpointing` and
:func:`enable_attention_preserving_checkpointing` turn checkpointing on with the public
``activation_checkpointing_enable`` (if it is not on yet) and then set that attribute, on every module that has
``gradient_checkpointing`` (as transformers' own ``_set_gradient_checkpointing`` does), to one
:class:`Checkpointer`: ``torch.utils.checkpoint`` (non-reentrant) plus

* offload: a saved-tensor hook around the checkpoint call. Non-reentrant checkpointing saves only the
  checkpoint's positional inputs (the layer's input hidden state; the kwargs are bound in the partial) outside
  its own recompute hook, so exactly those go through ours: moved to pinned host memory with a non-blocking
  copy on CUDA, and copied back for the recompute in backward. Everything else is recomputed as usual.
* attention preservation: ``context_fn`` gives the first forward and the recompute of each checkpointed call a
  shared :class:`_AttentionFrame`; the attention wrapper registered with ``AttentionInterface`` keeps the
  attention's result from the first forward and serves it during the recompute (see
  :func:`enable_attention_preserving_checkpointing`).

:func:`enable_tiled_mlp` replaces the ``forward`` of each ``layer.mlp`` instance (the class and the state-dict
names are untouched) with a sequence-tiled autograd Function.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import sys
from types import MethodType
from typing import Iterable

import torch
from torch.utils.checkpoint import checkpoint

from .fused import enable_low_memory_rmsnorm  # noqa: F401 - public here since the first release


# ---------------------------------------------------------------- the checkpoint function installed on the layers
class Checkpointer:
    """The gradient-checkpointing function of a model: ``torch.utils.checkpoint`` plus the enabled features.

    Called by transformers as ``checkpointer(function, *args, **checkpoint_kwargs)``; each decoder layer gets
    a :class:`_LayerCheckpoint` that calls :meth:`run` with the layer's index, so a feature can cover only some
    layers (``offload=frozenset({0, 1, 2})``).

    Attributes:
        offload: which layers keep their checkpoint inputs (each layer's input hidden state) in host memory:
            True (all), False (none) or a frozenset of decoder-layer indices.
        preserve_attention: which layers let the attention registered by
            :func:`enable_attention_preserving_checkpointing` skip its forward during the recompute (same forms).
        offloaded_tensors, offloaded_bytes: running totals of what went through the offload hook (on a CPU
            device the tensors stay where they are but are still counted).
        host_buffers: the :class:`PinnedHostPool` the offloaded checkpoints of CUDA tensors live in.
    """

    def __init__(self, *, offload: bool | frozenset = False, preserve_attention: bool | frozenset = False,
                 host_buffers: PinnedHostPool | None = None):
        self.offload = offload
        self.preserve_attention = preserve_attention
        self.offloaded_tensors = 0
        self.offloaded_bytes = 0
        self.host_buffers = host_buffers or PinnedHostPool()

    def __repr__(self):
        return f"Checkpointer(offload={_describe(self.offload)}, preserve_attention={_describe(self.preserve_attention)})"

    def __call__(self, function, *args, **checkpoint_kwargs):
        return self.run(None, function, *args, **checkpoint_kwargs)

    def run(self, index: int | None, function, *args, use_reentrant: bool = False, **checkpoint_kwargs):
        """Checkpoint ``function(*args)`` for decoder layer ``index`` (None: not a decoder layer, or the global
        patch; then a feature applies if it is on for any layer)."""
        if _covers(self.preserve_attention, index):
            if use_reentrant:
                raise ValueError("attention-preserving checkpointing needs non-reentrant checkpointing; do not pass "
                                 "use_reentrant=True in activation_checkpointing_kwargs")
            if "context_fn" in checkpoint_kwargs:
                raise ValueError("attention-preserving checkpointing sets the checkpoint's context_fn itself; "
                                 "it cannot be combined with another context_fn")
            checkpoint_kwargs["context_fn"] = _attention_frame_contexts
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
        return _Offloaded(self.host_buffers, host, tensor.device)

    @staticmethod
    def _unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        return packed.restore()


class _Offloaded:
    """One offloaded checkpoint: its host buffer goes back to the pool when autograd drops it, with an event
    marking the last copy that uses the buffer (to the host in forward, back to the GPU in backward)."""

    __slots__ = ("pool", "host", "device", "event")

    def __init__(self, pool, host, device):
        self.pool, self.host, self.device = pool, host, device
        self.event = torch.cuda.Event()
        self.event.record()

    def restore(self) -> torch.Tensor:
        out = self.host.to(self.device, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()
        return out

    def __del__(self):
        self.pool.give_back(self.host, self.event)


class PinnedHostPool:
    """Exact-size page-locked host buffers for offloaded checkpoints, reused from step to step.

    ``torch.empty(..., pin_memory=True)`` goes through PyTorch's caching host allocator, which rounds every block
    up to a power of two: a 3 GiB checkpoint (384K tokens x 4096 x bf16) takes 4 GiB, and at 384K tokens on the
    H200 (128 GiB host) the offloaded checkpoints of 28 layers filled the host and the process was killed
    (bench/RESULTS.md). Here a buffer is plain host memory of the exact size, page-locked once
    (``cudaHostRegister``) and kept: after the first step no page-locking and no allocation.

    Args:
        page_lock: False keeps the buffers in ordinary memory (tests of the bookkeeping without a GPU).
    Attributes:
        held_bytes: host memory held by the pool's buffers, in use or free.
    """

    def __init__(self, *, page_lock: bool = True):
        self.page_lock = page_lock
        self.held_bytes = 0
        self._free: dict = {}  # (numel, dtype) -> [(buffer, event of its last copy or None)]
        self._locked: dict = {}  # data_ptr -> buffer registered with CUDA (unregistered when dropped)

    def take(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """A contiguous host buffer of ``shape``: a free one of the same size, or a new one."""
        key = (math.prod(shape), dtype)
        free = self._free.get(key)
        if free:
            buf, event = free.pop()
            if event is not None:
                event.synchronize()  # its copy back to the GPU (or to the host) has finished
            return buf.view(shape)
        self._release_free()  # a new size (another sequence length): free buffers of old sizes would only pile up
        buf = torch.empty(key[0], dtype=dtype)
        if self.page_lock:
            buf = self._lock(buf)
        self.held_bytes += buf.numel() * buf.element_size()
        return buf.view(shape)

    def _release_free(self) -> None:
        for free in self._free.values():
            for buf, event in free:
                if event is not None:
                    event.synchronize()
                self._unlock(buf)
                self.held_bytes -= buf.numel() * buf.element_size()
        self._free.clear()

    def give_back(self, buf: torch.Tensor, event=None) -> None:
        self._free.setdefault((buf.numel(), buf.dtype), []).append((buf.view(-1), event))

    def _lock(self, buf):
        err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel() * buf.element_size(), 0)
        if int(getattr(err, "value", err)) != 0:  # could not page-lock (limits): PyTorch's (rounded) pinned block
            return torch.empty(buf.shape, dtype=buf.dtype, pin_memory=True)
        self._locked[buf.data_ptr()] = buf
        return buf

    def _unlock(self, buf) -> None:
        if self._locked.pop(buf.data_ptr(), None) is not None:
            torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())

    def __del__(self):
        if not self._locked:
            return
        try:
            torch.cuda.synchronize()
            for buf in list(self._locked.values()):
                self._unlock(buf)
        except Exception:  # noqa: BLE001 - interpreter shutdown: CUDA may be gone, and the process with it
            pass


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


def _decoder_layers(model) -> list:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _select_layers(layers, n_layers: int, what: str):
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


def _install_checkpointer(model, *, offload=None, preserve_attention=None) -> Checkpointer:
    """Turn checkpointing on (if off) and install one :class:`Checkpointer`; a feature passed as None keeps the
    selection of the checkpointer already installed (so the features add up across calls)."""
    modules = _checkpointed_modules(model)
    if not modules or not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing (no module has a "
                         "`gradient_checkpointing` flag)")
    current = getattr(modules[0], "_gradient_checkpointing_func", None)
    current = getattr(current, "checkpointer", current)
    if not isinstance(current, Checkpointer):
        current = Checkpointer()
    offload = current.offload if offload is None else offload
    preserve_attention = current.preserve_attention if preserve_attention is None else preserve_attention
    if not any(m.gradient_checkpointing for m in modules):
        # the public switch: sets the per-layer flags (every layer) and makes the embedding output require grad
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable()
        else:  # transformers < 5.x with only the older name
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointer = Checkpointer(offload=offload, preserve_attention=preserve_attention,
                                host_buffers=current.host_buffers)
    index = {id(m): i for i, m in enumerate(_decoder_layers(model))}
    for module in modules:
        i = index.get(id(module))
        module._gradient_checkpointing_func = checkpointer if i is None else _LayerCheckpoint(checkpointer, i)
    return checkpointer


def enable_offloaded_checkpointing(model, layers: int | Iterable[int] | None = None) -> Checkpointer:
    """Gradient checkpointing whose saved layer inputs live in (pinned) host memory.

    Each checkpointed decoder layer keeps only its input hidden state ``(batch, seq, hidden)``, moved to host
    memory in forward (non-blocking from CUDA) and copied back when backward recomputes the layer; device memory
    for saved activations drops from ``layers x batch x seq x hidden`` to about one layer's worth. On a CPU device
    nothing moves. Turns gradient checkpointing on if it is off; keeps
    :func:`enable_attention_preserving_checkpointing` if it is on.

    Partial offload: when host memory is smaller than all checkpoints (512K tokens of a 7B model: 32 x 4 GiB),
    offload only some layers and keep the rest on the GPU (``python -m easy_context.advise`` says how many).

    Args:
        model: a transformers ``PreTrainedModel`` whose decoder layers support gradient checkpointing.
        layers: None: every decoder layer; an int n: the first n decoder layers; or decoder-layer indices.
    Returns:
        The :class:`Checkpointer` installed on the model's layers (``offloaded_bytes`` counts the traffic).
    Raises:
        ValueError: the model does not support gradient checkpointing, or ``layers`` is out of range.
    """
    return _install_checkpointer(model, offload=_select_layers(layers, len(_decoder_layers(model)), "offload"))


def apply_unsloth_offloaded_gradient_checkpoint_monkey_patch() -> None:
    """Seed-compatible global form of :func:`enable_offloaded_checkpointing`.

    Makes every model that turns gradient checkpointing on afterwards (``activation_checkpointing_enable`` /
    ``gradient_checkpointing_enable``, e.g. from ``Trainer``) checkpoint with host-offloaded layer inputs: the
    checkpoint function transformers binds at that moment (``transformers.modeling_utils.checkpoint``) is replaced
    by an offloading :class:`Checkpointer`. Models that enabled checkpointing before keep their function.
    Prefer the per-model :func:`enable_offloaded_checkpointing`.
    """
    import transformers.modeling_utils as modeling_utils

    if not isinstance(modeling_utils.checkpoint, Checkpointer):
        modeling_utils.checkpoint = Checkpointer(offload=True)


# ---------------------------------------------------------------- attention-preserving checkpointing
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


def _attention_frame_contexts():
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


def _light_hooks(entry: _PreservedEntry):
    """Saved-tensor hooks for the first forward: keep everything (shadowing the checkpoint's hooks, which would
    drop it) except q, k, v themselves, which the recompute provides again. So a layer keeps its attention
    output and lse, not its q/k/v: about ``seq x hidden`` instead of ``(2 + 2 kv/heads) x seq x hidden``."""
    ptrs = [(t.untyped_storage().data_ptr(), t.device, t.dtype) for t in entry.inputs]

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.device, t.dtype)
        return _Slot(ptrs.index(key), t) if key in ptrs else t

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
        from .comm import LEAN_ALL_TO_ALL

        lean = LEAN_ALL_TO_ALL.set(True)  # Ulysses/USP: save sequence-sharded inputs, not head-sharded copies
        try:
            with torch.enable_grad(), _light_hooks(entry):
                out, _ = call(*detached)
        finally:
            LEAN_ALL_TO_ALL.reset(lean)
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


def _inner_attention(inner_name: str, module):
    """The attention function that ``inner_name`` means for ``module``'s model."""
    if inner_name == "eager":
        # "eager" is not in the registry: each modeling file has its own eager_attention_forward
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise TypeError(f"{type(module).__name__}: no eager_attention_forward in its modeling module; use "
                            "attn_implementation='sdpa' with attention-preserving checkpointing")
        return fn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[inner_name]


def make_preserving_attention(inner_name: str):
    """The attention function registered by :func:`enable_attention_preserving_checkpointing` for ``inner_name``.

    Outside a checkpointed layer (checkpointing off, eval, no_grad, layers skipped by ``every_n_layers``) it calls
    the inner attention unchanged. In the first forward of a checkpointed layer it runs the inner attention once
    and keeps its graph; during that layer's recompute it returns the kept output instead of recomputing.
    """

    def preserving_attention(module, query, key, value, attention_mask, **kwargs):
        inner = _inner_attention(inner_name, module)
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

    preserving_attention.__qualname__ = f"preserving_attention[{inner_name}]"
    return preserving_attention


def preserving_name(inner_name: str) -> str:
    """The ``attn_implementation`` name of the preserving wrapper around ``inner_name``."""
    from .hf import _RESERVED_SUBSTRINGS

    name = f"{inner_name}_attn_preserving"
    for bad, good in _RESERVED_SUBSTRINGS.items():
        name = name.replace(bad, good)
    return name


def enable_attention_preserving_checkpointing(model, layers: int | Iterable[int] | None = None) -> Checkpointer:
    """Gradient checkpointing whose backward recompute skips the attention forward (LightSeq's idea).

    Registers with transformers' ``AttentionInterface`` a wrapper around the model's current
    ``attn_implementation`` (``"sdpa"``, ``"eager"`` or an easy_context sequence-parallel one; the mask function
    is the inner one's) and switches the model to it; installs a :class:`Checkpointer` whose ``context_fn`` lets
    the wrapper tell the first forward from the recompute. Turns gradient checkpointing on if it is off; keeps
    offloading if it is on.

    Memory: per preserving layer, on top of the layer input, what the attention's own backward saves except q, k
    and v (the recompute provides those again): for fused kernels and the easy_context algorithms out and lse,
    about ``seq x hidden`` (one more layer input's worth; Ulysses/USP re-run their all-to-alls in backward rather
    than keep head-sharded copies); for ``eager`` the ``seq x seq`` probabilities (short sequences only). Compute: one attention forward per preserving layer per step fewer. When memory allows only
    some, preserve some (``layers``): each one saves its attention forward.

    Call it after :func:`easy_context.apply_seq_parallel_monkey_patch` (which switches the implementation itself)
    and before training. Limits: non-reentrant checkpointing only; one backward per forward (a second backward
    through a retained graph raises); ``output_attentions`` weights come back as None under checkpointing.

    Args:
        model: a transformers ``PreTrainedModel`` routing attention through ``AttentionInterface``.
        layers: None: every decoder layer; an int n: the first n decoder layers; or decoder-layer indices.
    Returns:
        The :class:`Checkpointer` installed on the model's layers.
    Raises:
        ValueError: the model does not support gradient checkpointing, or ``layers`` is out of range.
        TypeError: the model's attention does not go through ``AttentionInterface``.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    inner_name = model.config._attn_implementation
    if not inner_name.endswith("_attn_preserving"):
        name = preserving_name(inner_name)
        AttentionInterface.register(name, make_preserving_attention(inner_name))
        if inner_name in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
            # same masks as the inner implementation (none for easy_context's, where none is registered)
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner_name])
        model.set_attn_implementation(name)
        if model.config._attn_implementation != name:
            raise TypeError(f"{type(model).__name__} does not route its attention through transformers' "
                            "AttentionInterface; attention-preserving checkpointing cannot be applied to it")
    selection = _select_layers(layers, len(_decoder_layers(model)), "attention preserving")
    return _install_checkpointer(model, preserve_attention=selection)


# ---------------------------------------------------------------- tiled MLP
# Default MLP tile: this many hidden_size's of tokens (bench/RESULTS.md: 4 x 4096 = 16K-token tiles, 4-layer
# Llama-2-7B at 256K, 23.9 s vs 26.8 s for 4096-token tiles; the tile's intermediates stay ~1.3 GiB).
TILE_HIDDENS = 4


def _is_zero3(params) -> bool:
    return any(hasattr(p, "ds_id") for p in params)


class _TiledMLP(torch.autograd.Function):
    """``mlp(x)`` over sequence tiles; neither pass materialises ``(seq, intermediate)`` activations in full.

    Forward runs the tiles under no_grad and saves only ``x``. Backward recomputes one tile at a time with grad
    and differentiates it at once. Parameter gradients: summed over tiles and returned as this Function's
    gradients for the parameters (each parameter's grad accumulator fires once per backward, as DDP expects);
    under DeepSpeed ZeRO-3 they are accumulated tile by tile through ZeRO's own hooks, with ``ds_grad_is_ready``
    held back until the last tile, as DeepSpeed's TiledMLP does. There the parameters come in ``zero3_params`` (a
    tuple, not Function inputs): a partitioned parameter made a Function input gets its gradient accumulator created
    with the empty partition's shape, and the tile's Linear backward then fails ("invalid gradient ... expected shape
    compatible with [0]", seen on 2xH200).
    """

    @staticmethod
    def forward(ctx, forward_fn, tile_size, zero3_params, x, *params):
        ctx.forward_fn, ctx.tile_size, ctx.params = forward_fn, tile_size, zero3_params or params
        device_type = x.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.save_for_backward(x)
        with torch.no_grad():
            # (b, s, hidden) -> tiles (b, <=tile, hidden) -> mlp -> (b, s, hidden)
            return torch.cat([forward_fn(t) for t in x.split(tile_size, dim=-2)], dim=-2)

    @staticmethod
    def backward(ctx, dout):
        (x,) = ctx.saved_tensors
        params = [p for p in ctx.params if p.requires_grad]
        zero3 = _is_zero3(ctx.params)
        dx = torch.empty_like(x) if x.requires_grad else None
        dparams = [None] * len(params)
        tiles = list(zip(x.split(ctx.tile_size, dim=-2), dout.split(ctx.tile_size, dim=-2)))
        device_type, autocast_on, autocast_dtype = ctx.autocast
        offset = 0
        for i, (x_tile, dout_tile) in enumerate(tiles):
            x_tile = x_tile.detach().requires_grad_(x.requires_grad)
            with torch.enable_grad(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
                y_tile = ctx.forward_fn(x_tile)
            n = x_tile.shape[-2]
            if zero3:
                for p in params:
                    p.ds_grad_is_ready = i == len(tiles) - 1
                # No `inputs=`: naming the partitioned parameters there makes autograd take their gradient edges
                # when their data is the empty partition (seen on 2xH200: "invalid gradient ... expected shape
                # compatible with [0]"). The tile's graph reaches only x_tile (a detached leaf) and the parameters,
                # whose gradients ZeRO's hooks collect; this is how DeepSpeed's own TiledMLP calls it.
                torch.autograd.backward(y_tile, dout_tile)
                if dx is not None:
                    dx.narrow(-2, offset, n).copy_(x_tile.grad)
            else:
                inputs = ([x_tile] if x.requires_grad else []) + params
                grads = torch.autograd.grad(y_tile, inputs, dout_tile, allow_unused=True)
                if x.requires_grad:
                    dx.narrow(-2, offset, n).copy_(grads[0])
                    grads = grads[1:]
                for j, g in enumerate(grads):
                    if g is not None:
                        # sum tiles in float32: bf16 sums over many tiles lose ~1e-2 relative accuracy
                        g = g.float() if g.dtype in (torch.bfloat16, torch.float16) else g
                        dparams[j] = g if dparams[j] is None else dparams[j].add_(g)
            offset += n
        if zero3:
            return None, None, None, dx
        dparams = [g.to(p.dtype) if g is not None else None for g, p in zip(dparams, params)]
        it = iter(dparams)
        return (None, None, None, dx, *[next(it) if p.requires_grad else None for p in ctx.params])


def _tiled_forward(self, x, *args, **kwargs):
    tile_size = self._easy_context_tile_size or math.ceil(x.shape[-2] / self._easy_context_num_tiles)
    forward_fn = self._easy_context_mlp_forward
    if args or kwargs or x.shape[-2] <= tile_size:
        return forward_fn(x, *args, **kwargs)
    params = tuple(self.parameters())
    if _is_zero3(params):  # partitioned parameters must not be Function inputs (see _TiledMLP)
        return _TiledMLP.apply(forward_fn, tile_size, params, x)
    return _TiledMLP.apply(forward_fn, tile_size, None, x, *params)


def enable_tiled_mlp(model, *, tile_size: int | None = None, num_tiles: int | None = None) -> int:
    """Compute every decoder layer's MLP in sequence tiles, forward and backward (DeepSpeed ALST's TiledMLP).

    The ``(batch, tile, intermediate)`` activations of one tile exist at a time instead of
    ``(batch, seq, intermediate)``; backward recomputes each tile's MLP (one extra MLP forward per step). MLPs are
    per-token, so the result is exact and independent of sequence sharding; it composes with gradient
    checkpointing (the recompute re-runs the tiled forward) and with the other features here.

    Each ``layer.mlp`` (Llama, Mistral, Qwen2/3 and any decoder whose layers have an ``mlp`` taking
    ``(batch, seq, hidden)``) keeps its class and parameter names: only the instance's ``forward`` is replaced,
    and the original forward is called per tile. Under DeepSpeed ZeRO-3 the module's hooks gather the parameters
    once around the tiled forward, and ZeRO's pre-backward hook gathers them before the per-tile recompute.

    Args:
        tile_size: tokens per tile. num_tiles: tiles per sequence (tile size = ceil(seq / num_tiles)).
            Neither: ``TILE_HIDDENS x hidden_size`` tokens (16K for a 4096-wide model: a tile's intermediate
            activations are a few MLP weight matrices in size; on the H200 that ran a 256K step 1.12x faster
            than tiles of ``hidden_size`` tokens, DeepSpeed ALST's choice).
    Returns:
        The number of MLPs tiled.
    Raises:
        ValueError: both or a non-positive tile option given, or no decoder layer with an ``mlp`` found.
    """
    if tile_size is not None and num_tiles is not None:
        raise ValueError("pass tile_size or num_tiles, not both")
    for what, value in (("tile_size", tile_size), ("num_tiles", num_tiles)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{what} must be a positive int, got {value!r}")
    if tile_size is None and num_tiles is None:
        tile_size = TILE_HIDDENS * model.config.get_text_config().hidden_size
    from transformers.modeling_layers import GradientCheckpointingLayer

    mlps = [layer.mlp for layer in model.modules()
            if isinstance(layer, GradientCheckpointingLayer) and isinstance(getattr(layer, "mlp", None), torch.nn.Module)]
    if not mlps:
        raise ValueError(f"{type(model).__name__}: no decoder layer with an `mlp` module found; tiled MLP supports "
                         "Llama/Mistral/Qwen-style decoders")
    for mlp in mlps:
        if "_easy_context_mlp_forward" not in mlp.__dict__:
            mlp._easy_context_mlp_forward = mlp.forward
        mlp._easy_context_tile_size, mlp._easy_context_num_tiles = tile_size, num_tiles
        mlp.forward = MethodType(_tiled_forward, mlp)
    return len(mlps)


__all__ = ["Checkpointer", "PinnedHostPool", "enable_offloaded_checkpointing", "apply_unsloth_offloaded_gradient_checkpoint_monkey_patch",
           "enable_attention_preserving_checkpointing", "make_preserving_attention", "preserving_name",
           "enable_tiled_mlp", "enable_low_memory_rmsnorm"]
