"""Models: configurations and loading, shared by training and evaluation (built-in shapes without download, any
config JSON file, a folder or hub id; the RoPE base override; the causal LM with ``sdpa`` attention before any
sequence-parallel patch), and what training adds around the loaded model: the memory features of the flags (the
wrapper whose forward returns the exact sharded loss is :class:`easy_context.loss.CausalLMWithShardedLoss`)."""
from __future__ import annotations

import json
import os

import torch

from .. import memory
from ..loss import CausalLMWithShardedLoss  # the public loss wrapper lives with the loss; re-exported for training
from ..utils import check_source

# Built-in configurations for --model-config (no files or downloads): small Llama models for demos and tests.
BUILTIN_CONFIGS = {
    "tiny-llama": dict(model_type="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=4096,
                       tie_word_embeddings=False),
    "small-llama": dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=4, vocab_size=32000,
                        max_position_embeddings=32768, tie_word_embeddings=False),
}


def set_rope_theta(config, theta: float) -> None:
    """Set the RoPE base of a transformers config (``rope_parameters`` in transformers 5, ``rope_theta`` before)."""
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict):
        rope["rope_theta"] = theta
    else:
        config.rope_theta = theta


def load_config(source: str, *, rope_theta: float | None = None, vocab_size: int | None = None,
                min_positions: int | None = None, what: str = "--model-config"):
    """A transformers config from a built-in name, a config JSON file (any name), a model folder or a hub id.

    Args:
        rope_theta, vocab_size: overrides. min_positions: raise ``max_position_embeddings`` to at least this.
    Raises:
        ValueError: a JSON file without ``model_type``. FileNotFoundError: a local-looking path that does not exist.
    """
    from transformers import CONFIG_MAPPING, AutoConfig

    if source in BUILTIN_CONFIGS:
        kw = dict(BUILTIN_CONFIGS[source])
        config = CONFIG_MAPPING[kw.pop("model_type")](**kw)
    elif os.path.isfile(source):  # any JSON file of a config, whatever its name
        with open(source) as f:
            kw = json.load(f)
        if "model_type" not in kw:
            raise ValueError(f"{what} {source}: no 'model_type' key; a transformers config.json names it "
                             f"(e.g. \"model_type\": \"llama\")")
        config = AutoConfig.for_model(kw.pop("model_type"), **kw)
    else:
        check_source(source, what)
        config = AutoConfig.from_pretrained(source)
    if rope_theta is not None:
        set_rope_theta(config, rope_theta)
    if vocab_size is not None:
        config.vocab_size = vocab_size
    if min_positions is not None and getattr(config, "max_position_embeddings", min_positions) < min_positions:
        config.max_position_embeddings = min_positions
    if getattr(config, "attention_dropout", 0.0):
        config.attention_dropout = 0.0  # the SP kernels have no dropout
    return config


def config_for(cfg):
    """The model configuration a :class:`~easy_context.training.config.TrainConfig` asks for (its overrides
    applied; positions raised to cover ``--seq-length``)."""
    return load_config(cfg.model_config or cfg.model, rope_theta=cfg.rope_theta, vocab_size=cfg.vocab_size,
                       min_positions=cfg.seq_length, what="--model-config" if cfg.model_config else "--model")


def load_causal_lm(source: str | None, config, dtype: torch.dtype, *, init_random: bool):
    """The causal LM of ``config`` with ``sdpa`` attention: random weights, or ``source``'s (``from_pretrained``)."""
    from transformers import AutoModelForCausalLM

    if init_random:
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(source, config=config, dtype=dtype, attn_implementation="sdpa")


def apply_memory_features(cfg, model) -> None:
    """--gradient-checkpointing, --fused-kernels, then easy_context.memory's --offload-checkpointing /
    --attn-preserving-checkpointing (each installs its checkpoint function, turning checkpointing on),
    --tiled-mlp and --low-memory-rmsnorm. After the SP patch."""
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.fused_kernels:
        memory.enable_fused_kernels(model)

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
        memory.enable_low_memory_rmsnorm(model)


__all__ = ["BUILTIN_CONFIGS", "set_rope_theta", "load_config", "config_for", "load_causal_lm",
           "CausalLMWithShardedLoss", "apply_memory_features"]
