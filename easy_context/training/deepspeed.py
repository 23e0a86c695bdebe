"""Precision and the optimizer under accelerate: the mixed precision that runs (bf16 under DeepSpeed on CUDA unless
a flag says otherwise) and the line that says so, DeepSpeed config filling, and AdamW + schedule prepared the same
way under DDP and DeepSpeed ZeRO-3."""
from __future__ import annotations

import os

import torch

from ..utils import rank_world


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


def mixed_precision_of(cfg) -> str | None:
    """:func:`resolve_mixed_precision` for ``cfg`` in this process's launch environment."""
    return resolve_mixed_precision(
        cfg.mixed_precision, os.environ.get("ACCELERATE_MIXED_PRECISION"),
        deepspeed=os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true",
        cuda=torch.cuda.is_available() and not cfg.cpu)


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


def describe_attention(accelerator, model, seq_algo: str, backend: str | None) -> str | None:
    """The attention kernel line for a run's start (kernels.describe_kernel) for the dtype the attention sees: the
    autocast dtype under mixed precision, else the parameters'. None for data_parallel (the model's own attention)."""
    from ..attention.kernels import describe_kernel

    if seq_algo == "data_parallel":
        return None
    param = next(model.parameters())
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision,
                                                                 getattr(param, "ds_tensor", param).dtype)
    config = getattr(model, "config", None) or model.model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return describe_kernel(backend, accelerator.device, dtype, head_dim)


def _make_scheduler(cfg):
    from transformers import get_scheduler

    name = "constant_with_warmup" if cfg.lr_schedule == "constant" else cfg.lr_schedule
    return lambda optimizer: get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps,
                                           num_training_steps=cfg.max_train_steps)


def fill_auto(config: dict, values: dict) -> None:
    """Replace ``"auto"`` entries of a DeepSpeed config (dotted keys) by the values the flags give."""
    for dotted, value in values.items():
        *parents, leaf = dotted.split(".")
        node = config
        for key in parents:
            node = node.get(key, {})
        if node.get(leaf) == "auto":
            node[leaf] = value


def host_optimizer_threads(config: dict, env=None, cores: int | None = None) -> int | None:
    """Threads per process for an optimizer that a DeepSpeed ``config`` offloads to the host, or None to leave the
    thread count as launched.

    Why: DeepSpeed's CPU Adam is an OpenMP loop, and ``torchrun`` / ``accelerate launch`` export
    ``OMP_NUM_THREADS=1`` on GPUs, so it ran on one core: 9.9 s of an 84 s ZeRO-3 step (3.37 B parameters per rank,
    2xH200, bench/RESULTS.md 8b), the largest share of the optimizer's overhead. The answer is this node's usable
    cores over its processes (``LOCAL_WORLD_SIZE``); an ``OMP_NUM_THREADS`` above 1 is the user's choice and kept.
    """
    env = os.environ if env is None else env
    if config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") != "cpu":
        return None
    if int(env.get("OMP_NUM_THREADS") or 1) > 1:
        return None
    cores = cores if cores is not None else len(os.sched_getaffinity(0))
    threads = cores // max(1, int(env.get("LOCAL_WORLD_SIZE") or 1))
    return threads if threads > 1 else None


def prepare_optimization(cfg, accelerator, wrapper):
    """``(model, optimizer, scheduler)`` prepared by accelerate; the same AdamW and schedule under DDP and DeepSpeed.

    DDP: torch AdamW and the scheduler, which is stepped once per optimizer step by the loop (accelerate's
    prepared scheduler would step it once per process) and registered for checkpointing. DeepSpeed: its own AdamW
    (DeepSpeedCPUAdam when the optimizer is offloaded) from the config's ``optimizer`` section, whose ``"auto"``
    values (and micro-batch size, clipping) are filled from the flags; the schedule is the same
    ``transformers.get_scheduler`` built on DeepSpeed's optimizer, which the engine steps itself.
    """
    from accelerate.utils import DummyOptim, DummyScheduler

    trainable = [p for p in wrapper.parameters() if p.requires_grad]  # LoRA: the adapters only
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps)
        scheduler = _make_scheduler(cfg)(optimizer)
        accelerator.register_for_checkpointing(scheduler)
        if cfg.fsdp2:  # sharded already (sharding.apply_fsdp2): accelerate wraps neither it (DDP) nor the optimizer
            from .sharding import AccumulatingOptimizer

            return wrapper, AccumulatingOptimizer(optimizer, accelerator), scheduler
        model, optimizer = accelerator.prepare(wrapper, optimizer)
        return model, optimizer, scheduler
    config = plugin.deepspeed_config
    if cfg.lora_r is not None and config.get("zero_optimization", {}).get("stage") == 3:
        raise ValueError("--lora-r under DeepSpeed ZeRO-3 is not supported by train.py (untested: frozen partitioned "
                         "base weights and the adapter save): train LoRA under DDP (accelerate_configs/multi_gpu.yaml) "
                         "or a ZeRO-2 config, or drop --lora-r")
    if "scheduler" in config:
        raise ValueError("remove the 'scheduler' section of the DeepSpeed config: the schedule comes from "
                         "--lr-schedule / --warmup-steps / --learning-rate")
    config.setdefault("optimizer", {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto",
                                                                "betas": "auto", "eps": "auto"}})
    fill_auto(config, {"optimizer.params.betas": list(cfg.adam_betas), "optimizer.params.eps": cfg.adam_eps,
                        "train_micro_batch_size_per_gpu": cfg.batch_size,
                        # DeepSpeed counts every rank as a data-parallel one (it knows nothing of our SP groups)
                        "train_batch_size": cfg.batch_size * cfg.gradient_accumulate_every
                        * rank_world((0, accelerator.num_processes))[1],
                        "gradient_accumulation_steps": cfg.gradient_accumulate_every,
                        "gradient_clipping": cfg.max_grad_norm})
    threads = host_optimizer_threads(config)
    if threads:  # before DeepSpeed loads its CPU Adam: an OpenMP runtime of its own would read the variable
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)  # the runtime torch shares with it: this thread's OpenMP team size
        accelerator.print(f"host optimizer: {threads} threads per process (OMP_NUM_THREADS was 1, the launcher's "
                          "default; set it above 1 to choose)")
    optimizer = DummyOptim(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = DummyScheduler(optimizer, lr_scheduler_callable=_make_scheduler(cfg))
    return accelerator.prepare(wrapper, optimizer, scheduler)


__all__ = ["resolve_mixed_precision", "mixed_precision_of", "describe_precision", "fill_auto", "host_optimizer_threads",
           "prepare_optimization"]
