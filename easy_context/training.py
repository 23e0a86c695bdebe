"""The training loop behind ``train.py``: model, data, accelerate (DDP or DeepSpeed ZeRO-3), checkpoints, logs.

How the loss reaches data parallelism. The model is wrapped in :class:`CausalLMWithShardedLoss`, whose forward runs
the decoder and returns :func:`easy_context.loss.sharded_cross_entropy` of the final hidden states against this
rank's targets (full-vocabulary logits never exist). ``accelerator.prepare`` wraps *that* module, so DDP's forward
(which arms its gradient all-reduce hooks) and DeepSpeed ZeRO-3's module hooks (which gather partitioned
parameters) run around the whole computation; calling ``model.model(...)`` on an unwrapped module would bypass
both. The LM head's weight is used by the wrapper rather than by ``lm_head.forward``, so under ZeRO-3 it is
registered as an external parameter of the wrapper (DeepSpeed's documented way to gather such a parameter).

Scaling. The loss group is the whole world: rank r returns ``W * S_r / N`` (``S_r`` its CE sum, ``N`` the valid
targets of all ranks, ``W`` the world size). DDP averages gradients over all W ranks, and so does DeepSpeed (ZeRO
divides the reduced gradients by its data-parallel world, which is W because DeepSpeed knows nothing of our sequence
parallelism); both therefore apply the gradient of the token mean over the global batch, for any mix of DP replicas
and SP groups. ``global_loss`` (that token mean, identical on all ranks) is what is logged. Gradient accumulation
divides each micro-batch's loss by the number of micro-batches (accelerate / DeepSpeed): the update is the mean of
the micro-batch token means.

Data order and resume. Epoch ``e`` visits the dataset in the permutation of ``torch.Generator().manual_seed(seed +
e)``; ranks of an SP group read the same rows, DP replicas alternate rows (accelerate's batch sharding). A checkpoint
at optimizer step ``k`` holds accelerate's state (model, optimizer, the LR scheduler, RNG; DeepSpeed's own
checkpoint under ZeRO-3) plus ``k``; resuming reloads it and skips the ``k * gradient_accumulate_every`` micro-batches
already consumed, so the continued run sees the same batches and produces the same loss curve.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import time

import torch
from torch import nn

from . import memory
from .data import SYNTHETIC, FixedLengthCollator, load_train_dataset, shift_targets
from .fused import enable_fused_kernels, enable_low_memory_rmsnorm
from .sharding import SEQ_ALGOS

# Built-in configurations for --model_config (no files or downloads): small Llama models for demos and tests.
BUILTIN_CONFIGS = {
    "tiny-llama": dict(model_type="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=4096,
                       tie_word_embeddings=False),
    "small-llama": dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=4, vocab_size=32000,
                        max_position_embeddings=32768, tie_word_embeddings=False),
}
CHECKPOINT_PREFIX = "step_"
STATE_FILE = "trainer_state.json"
LOG_FILE = "train_log.jsonl"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Long-context full fine-tuning with exact sequence parallelism. "
                                "Launch with `accelerate launch --config_file accelerate_configs/<cfg>.yaml train.py`.")
    a = p.add_argument
    a("--parallel_mode", "--parallel-mode", dest="parallel_mode", choices=SEQ_ALGOS, default="zigzag_ring_attn")
    a("--model", default=None, help="local folder or hub id of a causal LM (weights loaded unless --init_random)")
    a("--model_config", "--model-config", dest="model_config", default=None,
      help=f"with --init_random: built-in {sorted(BUILTIN_CONFIGS)}, a config.json/folder or a hub id")
    a("--init_random", "--init-random", dest="init_random", action="store_true",
      help="random weights from --model_config (or --model's config)")
    a("--vocab-size", type=int, default=None, help="override the config's vocab size (--init_random only)")
    a("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
      help="model weights; auto = bfloat16 on GPU, float32 on CPU")
    a("--cpu", action="store_true", help="run on CPU with gloo even if GPUs exist (automatic without CUDA)")
    a("--mixed-precision", choices=("no", "bf16", "fp16"), default=None,
      help="default: the accelerate config's (DeepSpeed configs on CUDA: bf16)")
    a("--dataset", default=SYNTHETIC, help="'synthetic', a save_to_disk folder, a json/jsonl/parquet/arrow file "
      "or a hub id, with an input_ids column (see prepare_data.py)")
    a("--seq-length", type=int, default=16384)
    a("--rope-theta", type=float, default=None, help="RoPE base (default: the model's)")
    a("--batch-size", type=int, default=1, help="sequences per DP replica per micro-batch")
    a("--gradient-accumulate-every", type=int, default=1)
    a("--learning-rate", type=float, default=2e-5)
    a("--lr-schedule", choices=("constant", "linear", "cosine"), default="constant")
    a("--warmup-steps", type=int, default=0)
    a("--weight-decay", type=float, default=0.0)
    a("--adam-betas", type=float, nargs=2, default=(0.9, 0.95))
    a("--adam-eps", type=float, default=1e-8)
    a("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    a("--max-train-steps", type=int, default=400, help="optimizer steps")
    a("--sp-size", type=int, default=None, help="ranks per sequence-parallel group (default: the whole world)")
    a("--ring-degree", type=int, default=None, help="usp_attn: ring dimension of the SP group")
    a("--attn-backend", default=None, help="local attention kernel (cudnn, flash, flash_attn, math)")
    a("--loss-chunk-size", type=int, default=4096, help="tokens per chunk of the fused LM-head cross-entropy")
    a("--output-dir", required=True)
    a("--seed", type=int, default=42)
    a("--report-to", choices=("tensorboard", "wandb", "none"), default="tensorboard",
      help="wandb runs offline with WANDB_MODE=offline")
    a("--project-name", default="easy_context")
    a("--checkpointing-steps", type=int, default=0, help="save accelerate state every N optimizer steps (0: never)")
    a("--resume-from-checkpoint", default=None, help="a checkpoint folder, or 'latest' in --output-dir/checkpoints")
    a("--stop-after-steps", type=int, default=None,
      help="exit after this optimizer step without saving the model, as if the job were killed (tests resume)")
    a("--gradient-checkpointing", action="store_true")
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
           "on CUDA (easy_context.fused)")
    a("--tiled-mlp", action="store_true", help="MLP computed in sequence tiles (easy_context.memory)")
    a("--tiled-mlp-tile-size", type=int, default=None, help="tokens per MLP tile (default: 4 x hidden_size)")
    a("--no-save-model", dest="save_model", action="store_false", help="skip the final save_pretrained")
    return p


def validate_args(args, world_size: int) -> None:
    """Reject inconsistent flags early with the flag to change."""
    if args.model is None and args.model_config is None:
        raise ValueError("pass --model (path or hub id) or --model_config with --init_random")
    if args.model_config is not None and not args.init_random:
        raise ValueError("--model_config builds a model from a configuration: add --init_random (or use --model)")
    if args.vocab_size is not None and not args.init_random:
        raise ValueError("--vocab-size only applies with --init_random")
    if args.parallel_mode == "data_parallel" and args.sp_size not in (None, 1):
        raise ValueError("--sp-size is for the sequence-parallel modes; data_parallel has no SP group")
    if args.sp_size is not None and (args.sp_size < 1 or world_size % args.sp_size):
        raise ValueError(f"--sp-size {args.sp_size} must divide the number of processes {world_size}")
    if args.ring_degree is not None and args.parallel_mode != "usp_attn":
        raise ValueError("--ring-degree is a usp_attn option")
    for flag in ("seq_length", "batch_size", "gradient_accumulate_every", "max_train_steps"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")


def _set_rope_theta(config, theta: float) -> None:
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict):  # transformers 5
        rope["rope_theta"] = theta
    else:
        config.rope_theta = theta


def load_config(args):
    """The model configuration: built-in name, config.json / folder / hub id, or --model's; flags applied."""
    from transformers import AutoConfig, CONFIG_MAPPING

    source = args.model_config or args.model
    if source in BUILTIN_CONFIGS:
        kw = dict(BUILTIN_CONFIGS[source])
        config = CONFIG_MAPPING[kw.pop("model_type")](**kw)
    elif os.path.isfile(source):  # any JSON file of a config, whatever its name
        with open(source) as f:
            kw = json.load(f)
        if "model_type" not in kw:
            raise ValueError(f"--model_config {source}: no 'model_type' key; a transformers config.json names it "
                             f"(e.g. \"model_type\": \"llama\")")
        config = AutoConfig.for_model(kw.pop("model_type"), **kw)
    else:
        config = AutoConfig.from_pretrained(source)
    if args.rope_theta is not None:
        _set_rope_theta(config, args.rope_theta)
    if args.vocab_size is not None:
        config.vocab_size = args.vocab_size
    if getattr(config, "max_position_embeddings", args.seq_length) < args.seq_length:
        config.max_position_embeddings = args.seq_length
    if getattr(config, "attention_dropout", 0.0):
        config.attention_dropout = 0.0  # the SP kernels have no dropout
    return config


def load_model(args, dtype: torch.dtype):
    """The causal LM on CPU (accelerate / DeepSpeed move or partition it), ``sdpa`` attention before any SP patch."""
    from transformers import AutoModelForCausalLM

    config = load_config(args)
    if args.init_random:
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(args.model, config=config, dtype=dtype, attn_implementation="sdpa")


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
        from .loss import sharded_cross_entropy

        # (batch, local_seq) -> (batch, local_seq, hidden): the decoder without the head
        hidden = self.model.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False)[0]
        head = self.model.get_output_embeddings()
        return sharded_cross_entropy(hidden, head.weight, target_ids, bias=head.bias, group=self.loss_group,
                                     chunk_size=self.chunk_size)


def apply_memory_features(args, model) -> None:
    """--gradient-checkpointing, --fused-kernels, then easy_context.memory's --offload-checkpointing /
    --attn-preserving-checkpointing (each installs its checkpoint function, turning checkpointing on),
    --tiled-mlp and --low-memory-rmsnorm. After the SP patch."""
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.fused_kernels:
        enable_fused_kernels(model)

    def layers(flag):  # True: every layer; N: the first N
        return None if flag is True else flag

    if args.offload_checkpointing is not False:
        # per model: the seed's global monkey patch is not needed
        memory.enable_offloaded_checkpointing(model, layers(args.offload_checkpointing))
    if args.attn_preserving_checkpointing is not False:
        # wraps the (SP) attention chosen above
        memory.enable_attention_preserving_checkpointing(model, layers(args.attn_preserving_checkpointing))
    if args.tiled_mlp:
        memory.enable_tiled_mlp(model, tile_size=args.tiled_mlp_tile_size)
    if args.low_memory_rmsnorm:
        enable_low_memory_rmsnorm(model)


def resolve_mixed_precision(flag: str | None, launcher: str | None, *, deepspeed: bool, cuda: bool) -> str | None:
    """The mixed precision to run: ``--mixed-precision`` if given; else bf16 under DeepSpeed on CUDA when the
    launcher's choice (``ACCELERATE_MIXED_PRECISION``) is unset or "no"; else the launcher's.

    Why: accelerate refuses ``mixed_precision`` in a yaml next to a ``deepspeed_config_file``, and ``accelerate
    launch`` then exports ``ACCELERATE_MIXED_PRECISION=no``, so the DeepSpeed engine ran in float32 (the shipped
    configs' ``"bf16": {"enabled": "auto"}`` follows accelerate's choice) and the default cuDNN attention turned that
    into NaN on 2xH200. Pass ``--mixed-precision no`` to train in float32 under DeepSpeed on purpose.
    """
    if flag is not None:
        return flag
    if deepspeed and cuda and launcher in (None, "", "no"):
        return "bf16"
    return launcher or None


def _mixed_precision(args) -> str | None:
    return resolve_mixed_precision(
        args.mixed_precision, os.environ.get("ACCELERATE_MIXED_PRECISION"),
        deepspeed=os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true",
        cuda=torch.cuda.is_available() and not args.cpu)


def describe_precision(accelerator, model) -> str:
    """One line saying which precision runs: accelerate's mixed precision and the dtype of the parameters the
    forward uses (under ZeRO-3 the partitions' dtype; DeepSpeed casts the model to its engine precision)."""
    param = next(model.parameters())
    dtype = getattr(param, "ds_tensor", param).dtype
    line = f"precision: mixed_precision={accelerator.mixed_precision}, parameters {str(dtype).removeprefix('torch.')}"
    if accelerator.state.deepspeed_plugin is not None:
        line += " (DeepSpeed engine; float32 master weights in the optimizer)" if dtype != torch.float32 else \
            " (DeepSpeed engine in float32: --mixed-precision bf16 trains in bfloat16)"
    return line


def _make_scheduler(args):
    from transformers import get_scheduler

    name = "constant_with_warmup" if args.lr_schedule == "constant" else args.lr_schedule
    return lambda optimizer: get_scheduler(name, optimizer, num_warmup_steps=args.warmup_steps,
                                           num_training_steps=args.max_train_steps)


def fill_auto(config: dict, values: dict) -> None:
    """Replace ``"auto"`` entries of a DeepSpeed config (dotted keys) by the values the flags give."""
    for dotted, value in values.items():
        *parents, leaf = dotted.split(".")
        node = config
        for key in parents:
            node = node.get(key, {})
        if node.get(leaf) == "auto":
            node[leaf] = value


def _world_size(accelerator) -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else accelerator.num_processes


def _rank(accelerator) -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else accelerator.process_index


def prepare_optimization(args, accelerator, wrapper):
    """``(model, optimizer, scheduler)`` prepared by accelerate; the same AdamW and schedule under DDP and DeepSpeed.

    DDP: torch AdamW and the scheduler, which is stepped once per optimizer step by the loop (accelerate's
    prepared scheduler would step it once per process) and registered for checkpointing. DeepSpeed: its own AdamW
    (DeepSpeedCPUAdam when the optimizer is offloaded) from the config's ``optimizer`` section, whose ``"auto"``
    values (and micro-batch size, clipping) are filled from the flags; the schedule is the same
    ``transformers.get_scheduler`` built on DeepSpeed's optimizer, which the engine steps itself.
    """
    from accelerate.utils import DummyOptim, DummyScheduler

    decay = [p for n, p in wrapper.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in wrapper.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=tuple(args.adam_betas), eps=args.adam_eps)
        scheduler = _make_scheduler(args)(optimizer)
        model, optimizer = accelerator.prepare(wrapper, optimizer)
        accelerator.register_for_checkpointing(scheduler)
        return model, optimizer, scheduler
    config = plugin.deepspeed_config
    if "scheduler" in config:
        raise ValueError("remove the 'scheduler' section of the DeepSpeed config: the schedule comes from "
                         "--lr-schedule / --warmup-steps / --learning-rate")
    config.setdefault("optimizer", {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto",
                                                                "betas": "auto", "eps": "auto"}})
    fill_auto(config, {"optimizer.params.betas": list(args.adam_betas), "optimizer.params.eps": args.adam_eps,
                        "train_micro_batch_size_per_gpu": args.batch_size,
                        # DeepSpeed counts every rank as a data-parallel one (it knows nothing of our SP groups)
                        "train_batch_size": args.batch_size * args.gradient_accumulate_every * _world_size(accelerator),
                        "gradient_accumulation_steps": args.gradient_accumulate_every,
                        "gradient_clipping": args.max_grad_norm})
    if config.get("zero_optimization", {}).get("stage") == 3:
        wrapper.register_for_zero3()
    optimizer = DummyOptim(groups, lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = DummyScheduler(optimizer, lr_scheduler_callable=_make_scheduler(args))
    return accelerator.prepare(wrapper, optimizer, scheduler)


def _latest_checkpoint(output_dir: str) -> str:
    root = os.path.join(output_dir, "checkpoints")
    steps = [(int(m.group(1)), d) for d in (os.listdir(root) if os.path.isdir(root) else [])
             if (m := re.fullmatch(CHECKPOINT_PREFIX + r"(\d+)", d))]
    if not steps:
        raise FileNotFoundError(f"--resume-from-checkpoint latest: no checkpoint under {root}")
    return os.path.join(root, max(steps)[1])


def save_checkpoint(accelerator, output_dir: str, step: int) -> str:
    """accelerate state (+ DeepSpeed's) and the optimizer step, under ``output_dir/checkpoints/step_<step>``."""
    path = os.path.join(output_dir, "checkpoints", f"{CHECKPOINT_PREFIX}{step}")
    accelerator.save_state(path)
    if accelerator.is_main_process:
        with open(os.path.join(path, STATE_FILE), "w") as f:
            json.dump({"completed_steps": step}, f)
    accelerator.wait_for_everyone()
    return path


def micro_batches(args, dataset, accelerator, start: int):
    """Endless ``(batch, seq)`` micro-batches in the documented order, skipping the first ``start`` of them."""
    from torch.utils.data import DataLoader, RandomSampler

    from .api import prepare_dataloader

    epoch = 0
    while True:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(args.seed + epoch))
        loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                            collate_fn=FixedLengthCollator(args.seq_length))
        loader = prepare_dataloader(args.parallel_mode, loader, accelerator, sp_size=args.sp_size)
        if len(loader) == 0:
            raise ValueError(f"the dataset has {len(dataset)} rows: fewer than one batch per data-parallel replica")
        if start >= len(loader):
            start -= len(loader)
        else:
            yield from (accelerator.skip_first_batches(loader, start) if start else loader)
            start = 0
        epoch += 1


def train(args) -> dict:
    """Run the training described by ``args`` (see :func:`build_parser`); return ``{"losses", "grad_norms", "model"}``.

    ``losses`` maps each optimizer step done in this call to its logged global loss, ``grad_norms`` to the global
    gradient norm before clipping (when clipping is on, or under DeepSpeed); ``model`` is the unwrapped
    causal LM (weights as trained, SP attention still active).
    """
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, set_seed
    from tqdm.auto import tqdm

    from .api import apply_seq_parallel_monkey_patch, prepare_seq_parallel_inputs

    accelerator = Accelerator(
        cpu=args.cpu or not torch.cuda.is_available(), mixed_precision=_mixed_precision(args),
        # sync purely every N micro-batches: an epoch end must not force an early step (resume would drift)
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=args.gradient_accumulate_every,
                                                                sync_with_dataloader=False),
        log_with=None if args.report_to == "none" else args.report_to, project_dir=args.output_dir)
    world, rank = _world_size(accelerator), _rank(accelerator)
    validate_args(args, world)
    os.makedirs(args.output_dir, exist_ok=True)
    set_seed(args.seed)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    model = load_model(args, dtype)
    apply_seq_parallel_monkey_patch(args.parallel_mode, model, sp_size=args.sp_size, ring_degree=args.ring_degree,
                                    backend=args.attn_backend)
    apply_memory_features(args, model)
    wrapper = CausalLMWithShardedLoss(model, chunk_size=args.loss_chunk_size)
    sp = 1 if args.parallel_mode == "data_parallel" else (args.sp_size or world)
    replicas = world // sp
    tokens_per_step = args.batch_size * args.seq_length * args.gradient_accumulate_every * replicas
    dataset = load_train_dataset(args.dataset, seq_length=args.seq_length, vocab_size=model.config.vocab_size,
                                 num_samples=args.max_train_steps * args.batch_size * args.gradient_accumulate_every
                                 * replicas, seed=args.seed)
    wrapper, optimizer, scheduler = prepare_optimization(args, accelerator, wrapper)
    accelerator.print(describe_precision(accelerator, wrapper))

    completed = 0
    if args.resume_from_checkpoint:
        path = (_latest_checkpoint(args.output_dir) if args.resume_from_checkpoint == "latest"
                else args.resume_from_checkpoint)
        accelerator.load_state(path)
        with open(os.path.join(path, STATE_FILE)) as f:
            completed = json.load(f)["completed_steps"]
        accelerator.print(f"resumed from {path} at step {completed}")
        if accelerator.is_main_process and os.path.exists(log_path := os.path.join(args.output_dir, LOG_FILE)):
            with open(log_path) as f:  # drop steps the killed run logged after its checkpoint: they are redone
                kept = [line for line in f if json.loads(line)["step"] <= completed]
            with open(log_path, "w") as f:
                f.writelines(kept)
    if args.report_to != "none":
        accelerator.init_trackers(args.project_name, config={k: v for k, v in vars(args).items()
                                                             if isinstance(v, (int, float, str, bool))})
    accelerator.print(f"{world} processes, {args.parallel_mode}, {replicas} data-parallel replica(s) x "
                      f"{sp} sequence-parallel rank(s); {len(dataset)} samples; {tokens_per_step} tokens per step")
    log_path = os.path.join(args.output_dir, LOG_FILE)
    bar = tqdm(total=args.max_train_steps, initial=completed, disable=not accelerator.is_local_main_process)
    stop_at = min(args.max_train_steps, args.stop_after_steps or args.max_train_steps)
    losses, grad_norms, micro_losses, tic = {}, {}, [], time.perf_counter()
    grad_norm = None
    wrapper.train()
    batches = micro_batches(args, dataset, accelerator, completed * args.gradient_accumulate_every)
    while completed < stop_at:
        ids = next(batches)["input_ids"]
        prepared = prepare_seq_parallel_inputs(
            args.parallel_mode, ids, None, shift_targets(ids), rank, world, accelerator.device,
            sp_size=args.sp_size, ring_degree=args.ring_degree)
        with accelerator.accumulate(wrapper):
            out = wrapper(prepared["local_input_ids"], prepared["local_position_ids"], prepared["local_target_ids"])
            accelerator.backward(out.loss)  # under DeepSpeed this also steps the engine (clipping included)
            if accelerator.sync_gradients and args.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(wrapper.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
        micro_losses.append(out.global_loss.item())
        if not accelerator.sync_gradients:
            continue
        if hasattr(wrapper, "get_global_grad_norm"):  # DeepSpeed: the norm its step computed before clipping
            grad_norm = wrapper.get_global_grad_norm()
        scheduler.step()  # under DeepSpeed a no-op wrapper: the engine has stepped it
        completed += 1
        loss = sum(micro_losses) / len(micro_losses)
        elapsed, tic, micro_losses = time.perf_counter() - tic, time.perf_counter(), []
        record = {"step": completed, "loss": loss, "ppl": math.exp(min(loss, 50.0)),
                  "lr": scheduler.get_last_lr()[0], "tokens_per_second": tokens_per_step / elapsed}
        if grad_norm is not None:  # the global gradient norm before clipping
            record["grad_norm"] = float(grad_norm)
            grad_norms[completed] = record["grad_norm"]
        losses[completed] = loss
        if args.report_to != "none":
            accelerator.log(record, step=completed)
        if accelerator.is_main_process:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", ppl=f"{record['ppl']:.2f}", tok_s=f"{record['tokens_per_second']:.0f}")
        if args.checkpointing_steps and completed % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, args.output_dir, completed)
    bar.close()
    unwrapped = accelerator.unwrap_model(wrapper).model
    if completed >= args.max_train_steps and args.save_model:
        save_model(accelerator, wrapper, args)
    for tracker in accelerator.trackers:  # not end_training(): that also destroys the caller's process group
        tracker.finish()
    return {"losses": losses, "grad_norms": grad_norms, "model": unwrapped}


def save_model(accelerator, wrapper, args) -> None:
    """``save_pretrained`` into ``--output-dir`` (ZeRO-3 weights gathered); the tokenizer of ``--model`` if any."""
    accelerator.wait_for_everyone()
    state = accelerator.get_state_dict(wrapper)  # collective under ZeRO-3
    model = accelerator.unwrap_model(wrapper).model
    if accelerator.is_main_process and state is not None:  # ZeRO-3 gathers the full state on global rank 0
        # the wrapper's keys are "model.<causal LM key>"; the attention choice is not saved (reloads as sdpa)
        model.save_pretrained(args.output_dir, state_dict={k.removeprefix("model."): v for k, v in state.items()})
        if not args.init_random:
            try:
                from transformers import AutoTokenizer

                AutoTokenizer.from_pretrained(args.model).save_pretrained(args.output_dir)
            except (OSError, ValueError):
                pass  # a model without a tokenizer: nothing to copy
    accelerator.wait_for_everyone()
    accelerator.print(f"saved the model to {args.output_dir}")


def main(argv=None) -> None:
    """``train.py``: parse the flags, train, then take down the process group accelerate created."""
    import torch.distributed as dist

    train(build_parser().parse_args(argv))
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
