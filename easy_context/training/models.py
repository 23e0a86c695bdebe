"""Models: configurations and loading, shared by training and evaluation (built-in shapes without download, any
config JSON file, a folder or hub id; the RoPE base override; the causal LM with ``sdpa`` attention before any
sequence-parallel patch), and what training adds around the loaded model: the memory features of the flags and the
wrapper whose forward returns the exact sharded loss."""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from .. import memory
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


class CausalLMWithShardedLoss(nn.Module):
    """``forward(input_ids, position_ids, target_ids) -> ShardedLoss`` of a causal LM on this rank's shard.

    Wrap the causal LM in this and give *this* to ``accelerator.prepare`` (see the module docstring: DDP and
    ZeRO-3 hooks then cover the decoder and the loss).

    Args:
        model: a transformers causal LM (``base_model`` = the decoder, ``get_output_embeddings()`` = the head).
        loss_group: the ranks whose tokens form one token mean (None: the whole world).
        chunk_size: tokens per chunk of the fused head + cross-entropy.
    """

    def __init__(self, model, *, loss_group=None, chunk_size: int = 4096):
        super().__init__()
        self.model = model
        self.loss_group = loss_group
        self.chunk_size = chunk_size

    @property
    def config(self):
        """The causal LM's config (accelerate sizes DeepSpeed's "auto" buckets from ``config.hidden_size``)."""
        return self.model.config

    def register_for_zero3(self) -> None:
        """Make ZeRO-3 gather the LM head weight for this module's forward (it is read outside ``lm_head``)."""
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter

        head = self.model.get_output_embeddings()
        for param in head.parameters():
            register_external_parameter(self, param)

    def forward(self, input_ids, position_ids, target_ids):
        from ..loss import sharded_cross_entropy

        # (batch, local_seq) -> (batch, local_seq, hidden): the decoder without the head. No cache and no
        # attention_mask: only then does transformers read position_ids that restart at 0 as packed documents and mask
        # attention between them (sdpa/eager, data_parallel); a cache or a 2-D mask would silently turn that off.
        hidden = self.model.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False)[0]
        head = self.model.get_output_embeddings()
        return sharded_cross_entropy(hidden, head.weight, target_ids, bias=head.bias, group=self.loss_group,
                                     chunk_size=self.chunk_size)


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
