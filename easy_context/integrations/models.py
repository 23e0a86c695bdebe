"""Model configurations and loading, shared by training, evaluation and the planner (easy_context.advise): the one
preset table (built-in shapes without download), any config JSON file, a folder or hub id; the RoPE base override;
the causal LM with ``sdpa`` attention before any sequence-parallel patch."""
from __future__ import annotations

import json
import os

import torch

from ..utils import check_source

# The one table of model presets, as transformers config arguments: small Llama models that train.py builds without
# files or downloads (--model-config, BUILTIN_CONFIGS), and the shapes of the full-size models easy_context.advise
# plans for (its PRESETS are read from here).
PRESETS = {
    "tiny-llama": dict(model_type="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=4096,
                       tie_word_embeddings=False),
    "small-llama": dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=4, vocab_size=32000,
                        max_position_embeddings=32768, tie_word_embeddings=False),
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, intermediate_size=11008, vocab_size=32000),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336, vocab_size=128256),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336, vocab_size=32000),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, intermediate_size=18944, vocab_size=152064),
}
# Built-in configurations for --model-config (no files or downloads): the small Llama models for demos and tests.
BUILTIN_CONFIGS = {name: PRESETS[name] for name in ("tiny-llama", "small-llama")}
# Presets that only describe a shape (easy_context.advise): the full-size models.
SHAPE_PRESETS = tuple(name for name in PRESETS if name not in BUILTIN_CONFIGS)


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


def load_causal_lm(source: str | None, config, dtype: torch.dtype, *, init_random: bool):
    """The causal LM of ``config`` with ``sdpa`` attention: random weights, or ``source``'s (``from_pretrained``)."""
    from transformers import AutoModelForCausalLM

    if init_random:
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(source, config=config, dtype=dtype, attn_implementation="sdpa")


__all__ = ["PRESETS", "BUILTIN_CONFIGS", "SHAPE_PRESETS", "set_rope_theta", "load_config", "load_causal_lm"]
