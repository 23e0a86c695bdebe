"""The memory features on a transformers model: where easy_context.memory's mechanisms meet transformers.

easy_context.memory holds the mechanisms (the :class:`~easy_context.memory.Checkpointer`, the preserved attention,
the tiled MLP) and never imports transformers. Here they are applied to a transformers ``PreTrainedModel``: its
decoder layers are its ``GradientCheckpointingLayer`` modules, the preserving attention is registered with its
``AttentionInterface`` (and the inner implementation's mask function with ``AttentionMaskInterface``, read through
the public mapping API), the seed's global offload patch replaces transformers' checkpoint function. The fused-op
patches of the model's modules are in patch.py.
"""
from __future__ import annotations

import sys
from typing import Iterable

import torch

from ..memory.attn_preserving import attention_frame_contexts, preserving_attention
from ..memory.checkpointing import Checkpointer, install_checkpointer, select_layers
from ..memory.tiled_mlp import TILE_HIDDENS, tile_mlps
from .hf import safe_attn_name


def decoder_layers(model) -> list:
    """``model``'s decoder layers in order: its transformers ``GradientCheckpointingLayer`` modules."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


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
    found = decoder_layers(model)
    return install_checkpointer(model, found, offload=select_layers(layers, len(found), "offload"))


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
    """The attention function registered by :func:`enable_attention_preserving_checkpointing` for ``inner_name``
    (an ``attn_implementation`` name): :func:`easy_context.memory.attn_preserving.preserving_attention` around it."""
    return preserving_attention(lambda module: _inner_attention(inner_name, module), inner_name)


def preserving_name(inner_name: str) -> str:
    """The ``attn_implementation`` name of the preserving wrapper around ``inner_name``."""
    return safe_attn_name(f"{inner_name}_attn_preserving")


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
    than keep head-sharded copies); for ``eager`` the ``seq x seq`` probabilities (short sequences only). Compute:
    one attention forward per preserving layer per step fewer. When memory allows only some, preserve some
    (``layers``): each one saves its attention forward.

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

    # config._attn_implementation: how transformers' attention docs read the current implementation (no public getter)
    inner_name = model.config._attn_implementation
    if not inner_name.endswith("_attn_preserving"):
        name = preserving_name(inner_name)
        AttentionInterface.register(name, make_preserving_attention(inner_name))
        inner_mask = ALL_MASK_ATTENTION_FUNCTIONS.get(inner_name)  # the public Mapping API of the mask registry
        if inner_mask is not None:
            # same masks as the inner implementation (none for easy_context's, where none is registered)
            AttentionMaskInterface.register(name, inner_mask)
        model.set_attn_implementation(name)
        if model.config._attn_implementation != name:
            raise TypeError(f"{type(model).__name__} does not route its attention through transformers' "
                            "AttentionInterface; attention-preserving checkpointing cannot be applied to it")
    found = decoder_layers(model)
    selection = select_layers(layers, len(found), "attention preserving")
    return install_checkpointer(model, found, context=("preserve_attention", selection, attention_frame_contexts))


def enable_tiled_mlp(model, *, tile_size: int | None = None, num_tiles: int | None = None) -> int:
    """Compute every decoder layer's MLP in sequence tiles, forward and backward (DeepSpeed ALST's TiledMLP).

    The ``(batch, tile, intermediate)`` activations of one tile exist at a time instead of
    ``(batch, seq, intermediate)``; backward recomputes each tile's MLP (one extra MLP forward per step). MLPs are
    per-token, so the result is exact and independent of sequence sharding; it composes with gradient
    checkpointing (the recompute re-runs the tiled forward) and with the other features here.

    Each ``layer.mlp`` (Llama, Mistral, Qwen2/3 and any decoder whose layers have an ``mlp`` taking
    ``(batch, seq, hidden)``) keeps its class and parameter names: only the instance's ``forward`` is replaced
    (:func:`easy_context.memory.tiled_mlp.tile_mlps`), and the original forward is called per tile.

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
    mlps = [layer.mlp for layer in decoder_layers(model) if isinstance(getattr(layer, "mlp", None), torch.nn.Module)]
    if not mlps:
        raise ValueError(f"{type(model).__name__}: no decoder layer with an `mlp` module found; tiled MLP supports "
                         "Llama/Mistral/Qwen-style decoders")
    return tile_mlps(mlps, tile_size=tile_size, num_tiles=num_tiles)


__all__ = ["decoder_layers", "enable_offloaded_checkpointing",
           "apply_unsloth_offloaded_gradient_checkpoint_monkey_patch", "enable_attention_preserving_checkpointing",
           "make_preserving_attention", "preserving_name", "enable_tiled_mlp"]
