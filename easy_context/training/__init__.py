"""The training behind ``train.py``: a typed configuration from the command line (config.py), models built and
wrapped for the sharded loss (models.py, shared with evaluation), precision and the optimizer under DDP or
DeepSpeed ZeRO-3 (deepspeed.py), checkpoints (checkpoints.py), safe resumes (resume.py) and the loop (loop.py)."""
from .checkpoints import (
                          CHECKPOINT_PREFIX,
                          STATE_FILE,
                          CheckpointWriteError,
                          latest_checkpoint,
                          save_checkpoint,
                          save_model,
)
from .config import TrainConfig, build_parser, from_namespace, parse_config, validate_args
from .deepspeed import (
                          describe_precision,
                          fill_auto,
                          host_optimizer_threads,
                          mixed_precision_of,
                          prepare_optimization,
                          resolve_mixed_precision,
)
from .loop import LOG_FILE, CollectiveTimeout, main, make_accelerator, micro_batches, train
from .models import (
                          BUILTIN_CONFIGS,
                          CausalLMWithShardedLoss,
                          apply_memory_features,
                          config_for,
                          load_causal_lm,
                          load_config,
                          set_rope_theta,
)

__all__ = ["CHECKPOINT_PREFIX", "STATE_FILE", "latest_checkpoint", "save_checkpoint", "save_model", "TrainConfig",
           "CheckpointWriteError", "CollectiveTimeout",
           "build_parser", "parse_config", "from_namespace", "validate_args", "config_for", "describe_precision",
           "fill_auto", "mixed_precision_of", "prepare_optimization", "resolve_mixed_precision",
           "host_optimizer_threads",
           "LOG_FILE", "main", "make_accelerator", "micro_batches", "train",
           "BUILTIN_CONFIGS", "CausalLMWithShardedLoss", "apply_memory_features", "load_causal_lm", "load_config",
           "set_rope_theta"]
