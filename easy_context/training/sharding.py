"""What train.py adds around the model for ``--fsdp2`` and ``--lora-r``: torch's FSDP2 (``fully_shard``) applied by
train.py itself, and LoRA adapters through peft.

Why train.py shards the model itself rather than through accelerate's FSDP plugin (``fsdp_version: 2``): accelerate
keeps FSDP only for GPU-like devices (``AcceleratorState`` turns a CPU launch into plain ``MULTI_CPU`` and drops the
plugin silently), so the plugin's path could never be tested on the CPU suite, while ``fully_shard`` itself runs on
gloo. Applying it here is the same code on CPU and GPU: one ``fully_shard`` per decoder layer (the classes of the
model's ``_no_split_modules``), then one over :class:`~easy_context.loss.CausalLMWithShardedLoss`, whose root unit
keeps the embeddings and the LM head (the chunked loss runs as the head's forward, so it is gathered in any
unit). The mesh is the whole world, like DDP's averaging: SP ranks hold the same parameters, and the
reduce-scatter averages over all W ranks, so the update is the one DDP makes (the loss scaling of loop.py). Our
activation checkpointing and memory features stay as they are (they act inside each layer).

LoRA: ``peft.get_peft_model`` injects adapters into the causal LM in place (after the SP patch, so attention stays
sequence-parallel) and freezes the base weights; the loss wrapper gets the causal LM inside the PEFT wrapper, and
the optimizer gets only the trainable (adapter) parameters.

Checkpoints under --fsdp2: accelerate's ``save_state`` holds the LR schedule and the RNG states (the model and the
optimizer are not given to accelerate: it would write rank 0's shards only); the model and optimizer shards go to
``<checkpoint>/fsdp2`` through torch.distributed.checkpoint, every rank writing its own (:func:`save_sharded`).
"""
from __future__ import annotations

import os

import torch

from .config import PEFT_MISSING


def apply_lora(cfg, model):
    """The PEFT model of ``model`` with the LoRA adapters of ``cfg`` (``--lora-r`` ...), or None without
    ``--lora-r``. ``model`` itself (now holding the adapters) is what the loss wrapper takes."""
    if cfg.lora_r is None:
        return None
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ValueError(f"--lora-r: {PEFT_MISSING}") from None
    targets = [m.strip() for m in cfg.lora_target_modules.split(",") if m.strip()]
    if any(t in ("lm_head", "embed_tokens") for t in targets):
        raise ValueError("--lora-target-modules: the chunked loss reads lm_head's weight directly and the embeddings "
                         "are not adapted here; name linear layers of the decoder (e.g. q_proj,k_proj,v_proj,o_proj)")
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=targets, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # "Target modules {...} not found in the base model"
        raise ValueError(f"--lora-target-modules {cfg.lora_target_modules}: {e}") from None


def apply_fsdp2(wrapper, device, mixed_precision: str | None):
    """``fully_shard`` each decoder layer of ``wrapper.model`` (its ``_no_split_modules`` classes), then
    ``wrapper``, over a 1-D mesh of the whole world on ``device``'s type. ``mixed_precision`` bf16: parameters
    gathered in bfloat16, gradients reduced in float32 (FSDP2's MixedPrecisionPolicy replaces autocast)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise ValueError("--fsdp2 shards over a process group: launch with `accelerate launch --config_file "
                         "accelerate_configs/fsdp2.yaml train.py --fsdp2 ...` (or torchrun)")
    if mixed_precision == "fp16":  # the launcher's choice (the flag's is refused by TrainConfig)
        raise ValueError("--fsdp2 with fp16 mixed precision needs a sharded gradient scaler: pass --mixed-precision "
                         "bf16 (or no)")
    names = set(getattr(wrapper.model, "_no_split_modules", None) or ())
    layers = [m for m in wrapper.model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"--fsdp2: {type(wrapper.model).__name__} names no decoder layer class (_no_split_modules); "
                         "its layers cannot be sharded one by one")
    wrapper.to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if mixed_precision == "bf16" else MixedPrecisionPolicy()
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(wrapper, mesh=mesh, mp_policy=policy)
    return wrapper


def is_fsdp2(module) -> bool:
    """Whether ``module`` was sharded by :func:`apply_fsdp2`."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def full_tensor(t):
    """A DTensor's full value (a collective: every rank calls it), anything else as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_state_dict(wrapper) -> dict | None:
    """The wrapper's full state dict on rank 0 (None elsewhere) under FSDP2, on CPU; a collective."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(wrapper, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if dist.get_rank() == 0 else None


class AccumulatingOptimizer:
    """A torch optimizer that steps and zeroes gradients only on the micro-batches where ``accelerator``
    synchronises, as accelerate's prepared optimizer does (under --fsdp2 the optimizer is not given to accelerate:
    its ``save_state`` would write rank 0's shards of the optimizer state only; :func:`save_sharded` writes all)."""

    def __init__(self, optimizer, accelerator):
        self.optimizer, self.accelerator = optimizer, accelerator

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def step(self):
        if self.accelerator.sync_gradients:
            self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True):
        if self.accelerator.sync_gradients:
            self.optimizer.zero_grad(set_to_none=set_to_none)


SHARDED_DIR = "fsdp2"  # inside a checkpoint: torch.distributed.checkpoint's files of the model and optimizer


def _states(wrapper, optimizer):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(wrapper), "optimizer": get_optimizer_state_dict(wrapper, optimizer)}


def save_sharded(wrapper, optimizer, path: str) -> None:
    """Every rank's shards of the model and the optimizer state into ``path/fsdp2`` (torch.distributed.checkpoint:
    each rank writes its own file; reloadable on another number of ranks); a collective."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_states(wrapper, optimizer.optimizer), checkpoint_id=os.path.join(path, SHARDED_DIR))


def load_sharded(wrapper, optimizer, path: str) -> None:
    """The model and optimizer state of :func:`save_sharded` back into the sharded ``wrapper`` and ``optimizer``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    if not os.path.isdir(os.path.join(path, SHARDED_DIR)):
        raise ValueError(f"--resume-from-checkpoint {path}: no {SHARDED_DIR}/ folder of sharded state (it was not "
                         "written with --fsdp2)")
    states = _states(wrapper, optimizer.optimizer)
    dcp.load(states, checkpoint_id=os.path.join(path, SHARDED_DIR))
    set_model_state_dict(wrapper, states["model"])
    set_optimizer_state_dict(wrapper, optimizer.optimizer, states["optimizer"])


__all__ = ["apply_lora", "apply_fsdp2", "is_fsdp2", "full_tensor", "full_state_dict", "AccumulatingOptimizer",
           "save_sharded", "load_sharded"]
