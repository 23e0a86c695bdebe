"""Activation memory (and the fused ops that cut it) for long-context training.

* checkpointing.py: the checkpoint function installed on a model's decoder layers (:class:`Checkpointer`) and
  offloaded checkpointing (layer inputs in page-locked host memory, host_pool.py);
* attn_preserving.py: attention-preserving checkpointing (the recompute skips the attention forward);
* tiled_mlp.py: the MLP over sequence tiles, forward and backward;
* ops/: the fused RMSNorm / SwiGLU / rotary Functions; patch.py switches a model's modules to them.

All are exact (the same loss and gradients as the plain model, up to float rounding), switch on per model, and
compose with each other and with the sequence-parallel attention. Imports go down: patch -> ops; attn_preserving ->
checkpointing -> host_pool; nothing here is imported by easy_context.attention.
"""
from .attn_preserving import enable_attention_preserving_checkpointing, make_preserving_attention, preserving_name
from .checkpointing import (Checkpointer, apply_unsloth_offloaded_gradient_checkpoint_monkey_patch,
                            enable_offloaded_checkpointing)
from .host_pool import PinnedHostPool
from .ops import silu_mul
from .patch import enable_fused_kernels, enable_fused_rope, enable_fused_swiglu, enable_low_memory_rmsnorm
from .tiled_mlp import enable_tiled_mlp

__all__ = ["Checkpointer", "PinnedHostPool", "enable_offloaded_checkpointing",
           "apply_unsloth_offloaded_gradient_checkpoint_monkey_patch", "enable_attention_preserving_checkpointing",
           "make_preserving_attention", "preserving_name", "enable_tiled_mlp", "enable_low_memory_rmsnorm",
           "enable_fused_kernels", "enable_fused_swiglu", "enable_fused_rope", "silu_mul"]
