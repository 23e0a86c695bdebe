"""Models for training: the configuration a :class:`~easy_context.training.config.TrainConfig` asks for, and what
training adds around the loaded model: the memory features of the flags (the wrapper whose forward returns the exact
sharded loss is :class:`easy_context.loss.CausalLMWithShardedLoss`). Configurations and loading themselves are
easy_context.integrations.models (shared with evaluation), re-exported here."""
from __future__ import annotations

from ..integrations import memory, patch
from ..integrations.models import BUILTIN_CONFIGS, load_causal_lm, load_config, set_rope_theta
from ..loss import CausalLMWithShardedLoss  # the public loss wrapper lives with the loss; re-exported for training


def config_for(cfg):
    """The model configuration a :class:`~easy_context.training.config.TrainConfig` asks for (its overrides
    applied; positions raised to cover ``--seq-length``)."""
    return load_config(cfg.model_config or cfg.model, rope_theta=cfg.rope_theta, vocab_size=cfg.vocab_size,
                       min_positions=cfg.seq_length, what="--model-config" if cfg.model_config else "--model")


def apply_memory_features(cfg, model) -> None:
    """--gradient-checkpointing, --fused-kernels, then easy_context.memory's --offload-checkpointing /
    --attn-preserving-checkpointing (each installs its checkpoint function, turning checkpointing on),
    --tiled-mlp and --low-memory-rmsnorm. After the SP patch."""
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.fused_kernels:
        patch.enable_fused_kernels(model)

    def layers(flag):  # True: every layer; N: the first N
        return None if flag is True else flag

    if cfg.offload_checkpointing is not False:
        # per model: the seed's global monkey patch is not needed
        memory.enable_offloaded_checkpointing(model, layers(cfg.offload_checkpointing))
    if cfg.attn_preserving_checkpointing is not False:
        # wraps the (SP) attention chosen above
        memory.enable_attention_preserving_checkpointing(model, layers(cfg.attn_preserving_checkpointing))
    if cfg.tiled_mlp:
        memory.enable_tiled_mlp(model, tile_size=cfg.tiled_mlp_tile_size)
    if cfg.low_memory_rmsnorm:
        patch.enable_low_memory_rmsnorm(model)


__all__ = ["BUILTIN_CONFIGS", "set_rope_theta", "load_config", "config_for", "load_causal_lm",
           "CausalLMWithShardedLoss", "apply_memory_features"]
