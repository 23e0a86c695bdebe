"""Activation memory (and the fused ops that cut it) for long-context training: the mechanisms, model-agnostic.

* checkpointing.py: the checkpoint function installed on a model's decoder layers (:class:`Checkpointer`), with
  offloaded layer inputs in page-locked host memory (host_pool.py) and recompute contexts;
* attn_preserving.py: attention-preserving checkpointing (the recompute skips the attention forward);
* tiled_mlp.py: the MLP over sequence tiles, forward and backward;
* ops/: the fused RMSNorm / SwiGLU / rotary Functions.

All are exact (the same loss and gradients as the plain model, up to float rounding), switch on per model, and
compose with each other and with the sequence-parallel attention. Nothing here imports transformers or
easy_context.integrations: applying them to a transformers model (finding its decoder layers, registering the
preserving attention, switching its norms / MLPs / rotary function) is easy_context.integrations.memory and
easy_context.integrations.patch. Imports go down: attn_preserving -> easy_context.attention (the public
``lean_all_to_all``); checkpointing -> host_pool.

The model-level ``enable_*`` functions and ``apply_unsloth_offloaded_gradient_checkpoint_monkey_patch`` keep their
old names here as aliases resolved through the package's public API (``easy_context.<name>``), so this package
itself never imports the transformers layer.
"""
from .checkpointing import Checkpointer, install_checkpointer, select_layers
from .host_pool import PinnedHostPool
from .ops import silu_mul
from .tiled_mlp import TiledMLPForward, mlp_forward, set_mlp_forward, tile_mlps

# Old home of the model-level functions (now easy_context.integrations.memory / .patch): public aliases, resolved
# on first use through the top-level package's lazy table (easy_context/__init__.py).
_MOVED = ("enable_offloaded_checkpointing", "apply_unsloth_offloaded_gradient_checkpoint_monkey_patch",
          "enable_attention_preserving_checkpointing", "make_preserving_attention", "preserving_name",
          "enable_tiled_mlp", "enable_low_memory_rmsnorm", "enable_fused_kernels", "enable_fused_swiglu",
          "enable_fused_rope")

__all__ = ["Checkpointer", "PinnedHostPool", "install_checkpointer", "select_layers", "silu_mul", "TiledMLPForward",
           "tile_mlps", "mlp_forward", "set_mlp_forward", *_MOVED]


def __getattr__(name):
    if name in _MOVED:
        import sys

        return getattr(sys.modules[__name__.rpartition(".")[0]], name)  # the parent package: always loaded first
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
