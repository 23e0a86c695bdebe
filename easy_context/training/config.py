"""train.py's configuration: every flag as a typed field of :class:`TrainConfig`, the command line that builds it,
and the checks that reject inconsistent flags before anything is loaded (each error names the flag to change).

Flag style: ``--dash-words``; the seed's spellings (``--parallel_mode``, ``--model_config``, ``--init_random``) and
underscore forms of every flag are accepted too. ``--seq-algo`` is the library's name for the algorithm;
``--parallel_mode`` / ``--parallel-mode`` are aliases.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import os
from dataclasses import dataclass, fields

from ..attention.registry import SEQ_ALGOS, algorithm_options, get_attn_func
from ..data import TRAIN_PACKING, check_dataset_source
from ..sp_config import SPAttentionConfig
from ..utils import HelpFormatter, add_flag, check_source, check_sp_size

LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj"
PEFT_MISSING = "LoRA needs peft: pip install 'easy-context[peft]'"


@dataclass(kw_only=True)
class TrainConfig:
    """Everything one training run needs (see ``python train.py --help`` for each field's flag)."""

    output_dir: str
    seq_algo: str = "zigzag_ring_attn"
    # model
    model: str | None = None
    model_config: str | None = None
    init_random: bool = False
    vocab_size: int | None = None
    dtype: str = "auto"
    cpu: bool = False
    mixed_precision: str | None = None
    rope_theta: float | None = None
    # data
    dataset: str = "synthetic"
    seq_length: int = 16384
    packing: str = "auto"
    # optimisation
    batch_size: int = 1
    gradient_accumulate_every: int = 1
    learning_rate: float = 2e-5
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    max_train_steps: int = 400
    seed: int = 42
    # parallelism
    sp_size: int | None = None
    ring_degree: int | None = None
    attn_backend: str | None = None
    loss_chunk_size: int = 4096
    fsdp2: bool = False
    # LoRA through peft (off unless --lora-r)
    lora_r: int | None = None
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: str = LORA_TARGETS
    # memory features (True: every decoder layer; an int n: the first n)
    gradient_checkpointing: bool = False
    offload_checkpointing: bool | int = False
    attn_preserving_checkpointing: bool | int = False
    low_memory_rmsnorm: bool = False
    fused_kernels: bool = False
    tiled_mlp: bool = False
    tiled_mlp_tile_size: int | None = None
    # logs and checkpoints
    report_to: str = "tensorboard"
    project_name: str = "easy_context"
    checkpointing_steps: int = 0
    checkpoints_total_limit: int | None = None
    overwrite_output_dir: bool = False
    resume_from_checkpoint: str | None = None
    stop_after_steps: int | None = None
    save_model: bool = True
    # failures
    max_nonfinite_steps: int = 3
    collective_timeout: float = 600.0

    def __post_init__(self):
        """Checks that need no process group; raise ValueError naming the flag."""
        if self.seq_algo not in SEQ_ALGOS:
            raise ValueError(f"--seq-algo {self.seq_algo!r}: choose one of {', '.join(SEQ_ALGOS)}")
        if self.model is None and self.model_config is None:
            raise ValueError("pass --model (path or hub id) or --model-config with --init-random")
        if self.model_config is not None and not self.init_random:
            raise ValueError("--model-config builds a model from a configuration: add --init-random (or use --model)")
        if self.vocab_size is not None and not self.init_random:
            raise ValueError("--vocab-size only applies with --init-random")
        if get_attn_func(self.seq_algo) is None and self.sp_size not in (None, 1):
            raise ValueError("--sp-size is for the sequence-parallel algorithms; data_parallel has no SP group")
        try:
            algorithm_options(self.seq_algo, ring_degree=self.ring_degree)
        except ValueError as e:  # "ring_degree is a usp_attn option; ..." -> the flag's name
            key, rest = str(e).split(" ", 1)
            raise ValueError(f"--{key.replace('_', '-')} {rest}") from None
        for flag in ("batch_size", "gradient_accumulate_every", "max_train_steps"):
            if getattr(self, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
        if self.packing not in TRAIN_PACKING:
            raise ValueError(f"--packing {self.packing!r}: choose one of {', '.join(TRAIN_PACKING)}")
        if self.seq_length < 2:
            raise ValueError(f"--seq-length {self.seq_length}: a training sequence needs at least 2 tokens (one input "
                             "and its next-token target)")
        if self.max_nonfinite_steps < 1:
            raise ValueError("--max-nonfinite-steps must be >= 1 (consecutive skipped steps before the run stops)")
        if not self.collective_timeout > 0:
            raise ValueError("--collective-timeout must be > 0 seconds")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError("--checkpoints-total-limit must be >= 1 (checkpoints to keep)")
        if self.report_to != "none" and importlib.util.find_spec(self.report_to) is None:
            raise ValueError(f"--report-to {self.report_to}: the {self.report_to} package is not installed; "
                             f"pip install {self.report_to} (or 'easy-context[{self.report_to}]'), or --report-to none")
        for flag, source in (("--model", self.model), ("--model-config", self.model_config)):
            if source is not None:
                check_source(source, flag)
        self._check_fsdp2_and_lora()
        check_dataset_source(self.dataset, "--dataset")  # a missing local path, not a hub id to look up

    def _check_fsdp2_and_lora(self) -> None:
        if self.fsdp2 and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            raise ValueError("--fsdp2 shards the model itself and cannot run under a DeepSpeed launch: use "
                             "accelerate_configs/fsdp2.yaml (or multi_gpu.yaml) with --fsdp2, or a DeepSpeed config "
                             "without --fsdp2")
        if self.fsdp2 and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            raise ValueError("--fsdp2 applies torch's fully_shard itself: launch with accelerate_configs/fsdp2.yaml "
                             "(a plain multi-process config), not an accelerate FSDP config")
        if self.fsdp2 and self.mixed_precision == "fp16":
            raise ValueError("--fsdp2 with --mixed-precision fp16 needs a sharded gradient scaler: use "
                             "--mixed-precision bf16 (parameters gathered in bfloat16, gradients reduced in float32)")
        lora_set = [f for f, default in (("lora_alpha", 16.0), ("lora_dropout", 0.0),
                                         ("lora_target_modules", LORA_TARGETS)) if getattr(self, f) != default]
        if self.lora_r is None:
            if lora_set:
                raise ValueError(f"--{lora_set[0].replace('_', '-')} is a LoRA option: add --lora-r N to train "
                                 "LoRA adapters")
            return
        if self.lora_r < 1:
            raise ValueError("--lora-r must be >= 1 (the adapters' rank)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError("--lora-dropout must be in [0, 1)")
        if not [m for m in self.lora_target_modules.split(",") if m.strip()]:
            raise ValueError("--lora-target-modules: name at least one module, e.g. q_proj,v_proj")
        if importlib.util.find_spec("peft") is None:
            raise ValueError(f"--lora-r: {PEFT_MISSING}")

    @property
    def parallel_mode(self) -> str:
        """The seed's name of :attr:`seq_algo`."""
        return self.seq_algo

    def check_world(self, world_size: int) -> None:
        """Checks against the number of processes; raise ValueError naming the flag."""
        if self.sp_size is not None:
            try:
                check_sp_size(self.sp_size, world_size)
            except ValueError:
                raise ValueError(f"--sp-size {self.sp_size} must divide the number of processes {world_size}") from None

    @property
    def sp(self) -> SPAttentionConfig:
        """The sequence-parallel settings (--seq-algo, --sp-size, --ring-degree, --attn-backend) as the one object
        the API functions take."""
        return SPAttentionConfig(self.seq_algo, sp_size=self.sp_size, ring_degree=self.ring_degree,
                                 backend=self.attn_backend)

    @property
    def sp_degree(self) -> int | None:
        """Ranks per sequence-parallel group, None = the whole world (1 for data_parallel)."""
        return 1 if get_attn_func(self.seq_algo) is None else self.sp_size


def build_parser() -> argparse.ArgumentParser:
    # HelpFormatter: each flag once (the seed's --under_score spellings and --parallel-mode work, unlisted), defaults
    p = argparse.ArgumentParser(
        prog="train.py", formatter_class=HelpFormatter,
        usage="%(prog)s (--model PATH | --model-config NAME --init-random) --output-dir DIR [options]",
        description="Long-context full fine-tuning with exact sequence parallelism. Launch with `accelerate launch "
                    "--config_file accelerate_configs/<cfg>.yaml train.py`. Flags are --dash-words; the seed's "
                    "--under_score spellings are accepted too.")
    a = functools.partial(add_flag, p)
    a("--seq-algo", "--parallel-mode", dest="seq_algo", choices=SEQ_ALGOS, default="zigzag_ring_attn",
      metavar="ALGO", help=f"{' | '.join(SEQ_ALGOS)} (the seed's name: --parallel_mode)")
    a("--model", default=None, help="local folder or hub id of a causal LM (weights loaded unless --init-random)")
    a("--model-config", dest="model_config", default=None,
          help="with --init-random: a built-in name (tiny-llama, small-llama), a config JSON file or folder, or a "
               "hub id")
    a("--init-random", dest="init_random", action="store_true",
          help="random weights from --model-config (or --model's config)")
    a("--vocab-size", type=int, default=None, help="override the config's vocab size (--init-random only)")
    a("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
          help="model weights; auto = bfloat16 on GPU, float32 on CPU")
    a("--cpu", action="store_true", help="run on CPU with gloo even if GPUs exist (automatic without CUDA)")
    a("--mixed-precision", choices=("no", "bf16", "fp16"), default=None,
          help="default: the accelerate config's; under DeepSpeed on CUDA bf16 unless this says otherwise")
    a("--dataset", default="synthetic", help="'synthetic', a save_to_disk folder, a json/jsonl/parquet/arrow "
          "file or a hub id, with an input_ids column (see prepare_data.py)")
    a("--seq-length", type=int, default=16384, help="tokens per training sequence")
    a("--packing", choices=TRAIN_PACKING, default="auto",
          help="packed documents: auto = use the dataset's position_ids column when it has one (prepare_data.py "
               "--packing documents / --sft: each document attends only to itself, no target across a document "
               "boundary); documents = require it; none = ignore it (one causal sequence per row)")
    a("--rope-theta", type=float, default=None, help="RoPE base (default: the model's)")
    a("--batch-size", type=int, default=1, help="sequences per DP replica per micro-batch")
    a("--gradient-accumulate-every", type=int, default=1, help="micro-batches per optimizer step")
    a("--learning-rate", type=float, default=2e-5, help="peak learning rate (AdamW)")
    a("--lr-schedule", choices=("constant", "linear", "cosine"), default="constant",
      help="after the warm-up: constant, or linear / cosine decay to 0 at --max-train-steps")
    a("--warmup-steps", type=int, default=0, help="optimizer steps of linear warm-up from 0")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    a("--adam-betas", type=float, nargs=2, default=(0.9, 0.95), metavar=("BETA1", "BETA2"), help="AdamW betas")
    a("--adam-eps", type=float, default=1e-8, help="AdamW epsilon")
    a("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    a("--max-train-steps", type=int, default=400, help="optimizer steps")
    a("--sp-size", type=int, default=None, help="ranks per sequence-parallel group (default: the whole world)")
    a("--ring-degree", type=int, default=None, help="usp_attn: ring dimension of the SP group")
    a("--attn-backend", default=None, help="local attention kernel (auto, fa4, cudnn, flash, efficient, flash_attn, "
          "math)")
    a("--loss-chunk-size", type=int, default=4096, help="tokens per chunk of the fused LM-head cross-entropy")
    a("--fsdp2", action="store_true",
      help="shard parameters, gradients and optimizer state over all processes with torch's FSDP2 (fully_shard per "
           "decoder layer, then the whole model); instead of DDP, not with DeepSpeed")
    a("--lora-r", type=int, default=None, metavar="R",
      help="train LoRA adapters of rank R through peft (the base model frozen); the final save is the adapter")
    a("--lora-alpha", type=float, default=16.0, help="LoRA scaling numerator (scale = alpha / r)")
    a("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA inputs")
    a("--lora-target-modules", default=LORA_TARGETS, metavar="NAMES",
      help="comma-separated module names that get adapters")
    a("--output-dir", required=True, metavar="DIR",
      help="the run's folder: log, checkpoints, TensorBoard events, the final model")
    a("--seed", type=int, default=42, help="model initialisation, data order, the synthetic data")
    a("--report-to", choices=("tensorboard", "wandb", "none"), default="tensorboard",
          help="wandb runs offline with WANDB_MODE=offline")
    a("--project-name", default="easy_context", help="tracker project (TensorBoard: <output-dir>/<project-name>)")
    a("--checkpointing-steps", type=int, default=0, help="save accelerate state every N optimizer steps (0: never)")
    a("--checkpoints-total-limit", type=int, default=None, help="keep only the newest N checkpoints")
    a("--overwrite-output-dir", action="store_true",
      help="start afresh in an --output-dir that holds an earlier run (its log, checkpoints and TensorBoard events "
           "are deleted; other files are kept)")
    a("--resume-from-checkpoint", default=None, help="a checkpoint folder, or 'latest' in --output-dir/checkpoints")
    # for tests of resuming: exit after this optimizer step without saving the model, as if the job were killed
    a("--stop-after-steps", type=int, default=None, help=argparse.SUPPRESS)
    a("--gradient-checkpointing", action="store_true", help="recompute each decoder layer in backward")
    a("--offload-checkpointing", nargs="?", type=int, const=True, default=False, metavar="N",
          help="gradient checkpointing with the layer inputs kept in host memory (easy_context.memory); with N, only "
               "the first N decoder layers' (partial offload, when host memory is short)")
    a("--attn-preserving-checkpointing", nargs="?", type=int, const=True, default=False, metavar="N",
          help="gradient checkpointing whose recompute reuses the attention output (easy_context.memory); with N, "
               "only in the first N decoder layers (each keeps seq x hidden more)")
    a("--low-memory-rmsnorm", action="store_true",
          help="RMSNorm that saves x and a float32 rstd instead of float32 activation copies (easy_context.memory)")
    a("--fused-kernels", action="store_true",
          help="fused RMSNorm (implies --low-memory-rmsnorm), SwiGLU and rotary embedding: one compiled kernel per op "
               "on CUDA (easy_context.memory.ops)")
    a("--tiled-mlp", action="store_true", help="MLP computed in sequence tiles (easy_context.memory)")
    a("--tiled-mlp-tile-size", type=int, default=None, help="tokens per MLP tile (default: 4 x hidden_size)")
    a("--no-save-model", dest="save_model", action="store_false", help="skip the final save_pretrained")
    a("--max-nonfinite-steps", type=int, default=3, metavar="N",
      help="a step whose gradient norm or loss is inf/NaN is skipped (no update); stop after N in a row")
    a("--collective-timeout", type=float, default=600.0, metavar="SECONDS",
      help="a rank that stops arriving fails the others after this long, naming it where it can; must exceed the "
           "longest wait, e.g. a checkpoint save")
    return p


def from_namespace(ns: argparse.Namespace | TrainConfig) -> TrainConfig:
    """The :class:`TrainConfig` of parsed flags (a TrainConfig is returned as it is)."""
    if isinstance(ns, TrainConfig):
        return ns
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: (tuple(v) if k == "adam_betas" else v) for k, v in vars(ns).items() if k in names})


def parse_config(argv=None) -> TrainConfig:
    """The :class:`TrainConfig` of train.py's command line (``argv``; None: ``sys.argv``)."""
    return from_namespace(build_parser().parse_args(argv))


def validate_args(args, world_size: int) -> TrainConfig:
    """Every check of :class:`TrainConfig` and :meth:`TrainConfig.check_world` for parsed flags; the config."""
    cfg = from_namespace(args)
    cfg.check_world(world_size)
    return cfg


__all__ = ["TrainConfig", "build_parser", "parse_config", "from_namespace", "validate_args"]
