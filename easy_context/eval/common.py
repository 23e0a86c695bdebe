"""What both evaluation scripts need: the process group, the model under a parallel mode, and one sharded forward."""
from __future__ import annotations

import contextlib
import json
import os

import torch
import torch.distributed as dist

from ..utils import is_zero3, rank_world

_own_group = False  # True while this process holds a group that init_distributed() created


def init_distributed() -> tuple[int, int, torch.device]:
    """``(rank, world_size, device)``, initialising the default process group if a launcher asked for one.

    ``accelerate launch`` and ``torchrun`` set ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``: the group is NCCL on CUDA
    (one GPU per process, ``cuda:LOCAL_RANK``) and gloo on CPU. An already initialised group (tests) is used as
    is; a plain ``python script.py`` runs single-process.
    """
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    global _own_group
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
        _own_group = True
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def close_distributed() -> None:
    """Destroy the process group if :func:`init_distributed` created it (a script's last step: without it NCCL warns
    at exit that resources may leak); a group someone else made (tests) is left alone."""
    global _own_group
    if _own_group and dist.is_initialized():
        dist.destroy_process_group()
    _own_group = False


def deepspeed_inference_config(dtype: torch.dtype, hidden_size: int) -> dict | None:
    """The DeepSpeed config of an ``accelerate launch --config_file accelerate_configs/zero3_inference.yaml`` run
    (None without DeepSpeed), its ``"auto"`` values filled: precision from ``dtype``, one sequence per rank,
    ZeRO-3 bucket sizes from the hidden size (as accelerate does for training)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path:
        raise ValueError("a DeepSpeed launch without deepspeed_config_file: evaluate with "
                         "accelerate_configs/zero3_inference.yaml (ZeRO-3, parameters offloaded)")
    with open(path) as f:
        config = json.load(f)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    auto = {"bf16.enabled": dtype == torch.bfloat16, "fp16.enabled": dtype == torch.float16,
            "train_batch_size": world, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
            "zero_optimization.reduce_bucket_size": hidden_size * hidden_size}
    from ..training.deepspeed import fill_auto

    fill_auto(config, auto)
    left = [k for k, v in _flatten(config).items() if v == "auto"]
    if left:
        raise ValueError(f"{path}: cannot fill 'auto' for {left} in an evaluation run; give values")
    return config


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def load_model(path: str, seq_algo: str, device, *, dtype: str = "auto", rope_theta: float | None = None):
    """``(model, tokenizer)`` from a local directory (or hub id), switched to ``seq_algo``, in eval mode.

    Under ``accelerate launch`` with a DeepSpeed config (``accelerate_configs/zero3_inference.yaml``) the weights
    load straight into ZeRO-3 partitions (each rank holds ``1/world`` of them, offloaded to host memory as the
    config says) and every forward gathers one layer at a time: for models too large for one GPU.

    Args:
        path: anything ``from_pretrained`` accepts; tests pass a directory they saved.
        seq_algo: a parallel mode of :data:`easy_context.SEQ_ALGOS` (``data_parallel`` keeps the model's own
            attention).
        dtype: ``"auto"`` = bfloat16 on CUDA, float32 on CPU; or a torch dtype name.
        rope_theta: override the RoPE base (the seed's ``--rope_theta``), e.g. for a model trained with a larger
            one than its config says.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..api import apply_seq_parallel_monkey_patch
    from ..integrations.models import load_config

    if dtype == "auto":
        dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    config = load_config(path, rope_theta=rope_theta, what="--model")
    ds_config = deepspeed_inference_config(getattr(torch, dtype), config.get_text_config().hidden_size)
    if ds_config is None:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=getattr(torch, dtype),
                                                     attn_implementation="sdpa").to(device).eval()
    else:
        try:
            import deepspeed
            from transformers.integrations import HfDeepSpeedConfig
        except ImportError as err:
            raise ImportError("a DeepSpeed launch needs deepspeed: pip install deepspeed") from err
        # while this object lives, from_pretrained loads into ZeRO-3 partitions (no full copy per rank)
        hf_ds = HfDeepSpeedConfig(ds_config)
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=getattr(torch, dtype),
                                                     attn_implementation="sdpa")
        engine = deepspeed.initialize(model=model, config=ds_config)[0]
        model = engine.module.eval()
        model._easy_context_deepspeed = (engine, hf_ds)  # keep both alive with the model
    apply_seq_parallel_monkey_patch(seq_algo, model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.model_max_length = 1 << 62  # silence "sequence longer than the model maximum" warnings
    return model, tokenizer


def gathered(module: torch.nn.Module):
    """Context in which ``module``'s parameters are whole: a ZeRO-3 gather for partitioned ones (used when a weight
    is read outside its module's forward, e.g. the LM head in the chunked loss), else nothing."""
    params = list(module.parameters())
    if not is_zero3(params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


def all_reduce_(tensor: torch.Tensor, op=None) -> torch.Tensor:
    """In-place all-reduce over the world (no-op single-process); gloo tensors are moved to CPU and back."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    buf = tensor if dist.get_backend() == "nccl" else tensor.cpu()
    dist.all_reduce(buf, op=op or dist.ReduceOp.SUM)
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


__all__ = ["init_distributed", "load_model", "deepspeed_inference_config", "gathered", "rank_world", "all_reduce_"]
