"""easy_context: exact sequence-parallel attention for long-context LLM training.

Importing the package does nothing but import torch and define functions: no process groups, no
prints, no environment changes. transformers-facing helpers load on first use.
"""
from __future__ import annotations

from .attention import (
    ALGORITHMS,
    SEQ_ALGOS,
    dist_flash_attn_func,
    gather_sequence,
    get_attn_func,
    local_attn_func,
    sequence_granularity,
    shard_sequence,
    ulysses_attn_func,
    usp_attn_func,
    zigzag_ring_attn_func,
)
from .loss import (
    CausalLMWithShardedLoss,
    ShardedLoss,
    head_cross_entropy_sum,
    linear_cross_entropy_sum,
    sharded_cross_entropy,
)
from .sp_config import SPAttentionConfig

__version__ = "0.2.0"

# Public names provided by modules that import transformers/accelerate: loaded lazily.
_LAZY = {
    "apply_seq_parallel_monkey_patch": "api",
    "prepare_seq_parallel_inputs": "api",
    "prepare_dataloader": "api",
    "gather_seq_parallel_outputs": "api",
    "prepare_trainer": "integrations.trainer",
    "unpatch_model_type": "integrations.hf",
    "enable_offloaded_checkpointing": "integrations.memory",
    "enable_attention_preserving_checkpointing": "integrations.memory",
    "enable_tiled_mlp": "integrations.memory",
    "enable_low_memory_rmsnorm": "integrations.patch",
    "apply_unsloth_offloaded_gradient_checkpoint_monkey_patch": "integrations.memory",
}
# Also resolved lazily, for the old easy_context.memory.<name> paths (easy_context/memory/__init__.py), not in __all__.
_ALIASES = {
    "make_preserving_attention": "integrations.memory",
    "preserving_name": "integrations.memory",
    "enable_fused_kernels": "integrations.patch",
    "enable_fused_swiglu": "integrations.patch",
    "enable_fused_rope": "integrations.patch",
}

__all__ = [
    "ALGORITHMS", "SEQ_ALGOS", "get_attn_func", "local_attn_func", "zigzag_ring_attn_func", "dist_flash_attn_func",
    "ulysses_attn_func", "usp_attn_func", "shard_sequence", "gather_sequence", "sequence_granularity",
    "CausalLMWithShardedLoss", "sharded_cross_entropy", "linear_cross_entropy_sum", "head_cross_entropy_sum",
    "ShardedLoss", "SPAttentionConfig",
    *_LAZY,
]


def __getattr__(name):
    module = _LAZY.get(name) or _ALIASES.get(name)
    if module is not None:
        import importlib

        return getattr(importlib.import_module(f".{module}", __name__), name)
    raise AttributeError(f"module 'easy_context' has no attribute {name!r}")
