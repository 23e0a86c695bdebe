"""What both evaluation scripts need: the process group, the model under a parallel mode, and one sharded forward."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


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
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def load_model(path: str, seq_algo: str, device, *, dtype: str = "auto", rope_theta: float | None = None):
    """``(model, tokenizer)`` from a local directory (or hub id), switched to ``seq_algo``, in eval mode.

    Args:
        path: anything ``from_pretrained`` accepts; tests pass a directory they saved.
        seq_algo: a parallel mode of :data:`easy_context.SEQ_ALGOS` (``data_parallel`` keeps the model's own
            attention).
        dtype: ``"auto"`` = bfloat16 on CUDA, float32 on CPU; or a torch dtype name.
        rope_theta: override the RoPE base (the seed's ``--rope_theta``), e.g. for a model trained with a larger
            one than its config says.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..api import apply_seq_parallel_monkey_patch

    if dtype == "auto":
        dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    config = AutoConfig.from_pretrained(path)
    if rope_theta is not None:
        if isinstance(getattr(config, "rope_parameters", None), dict):  # transformers 5
            config.rope_parameters["rope_theta"] = rope_theta
        else:
            config.rope_theta = rope_theta
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=getattr(torch, dtype),
                                                 attn_implementation="sdpa").to(device).eval()
    apply_seq_parallel_monkey_patch(seq_algo, model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.model_max_length = 1 << 62  # silence "sequence longer than the model maximum" warnings
    return model, tokenizer


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_(tensor: torch.Tensor, op=None) -> torch.Tensor:
    """In-place all-reduce over the world (no-op single-process); gloo tensors are moved to CPU and back."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    buf = tensor if dist.get_backend() == "nccl" else tensor.cpu()
    dist.all_reduce(buf, op=op or dist.ReduceOp.SUM)
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


__all__ = ["init_distributed", "load_model", "rank_world", "all_reduce_"]
