"""What every part of bench/peers.py shares: the method names, where this process runs (:class:`Env`) and the
helpers the methods use (SDPA backend choice, peers that may be missing, DeepSpeed's group, gathering rows)."""
from __future__ import annotations

import contextlib
import gc
import time
from typing import Callable

import torch
import torch.distributed as dist

EC_ALGOS = {"ec_zigzag": "zigzag_ring_attn", "ec_ulysses": "ulysses_attn", "ec_usp": "usp_attn"}
TORCH_CP = tuple(f"torch_cp_{rotate}_{sdpa}" for rotate in ("allgather", "alltoall") for sdpa in ("cudnn", "flash"))
ATTN_METHODS = ("single", *EC_ALGOS, *TORCH_CP, "ds_ulysses")
STEP_METHODS = (*EC_ALGOS, *TORCH_CP, "ds_alst")
LOSS_RTOL = 1e-3
FP32_ERR_FLOOR = 1e-5
_SDPA = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Skip(Exception):
    """A method that cannot run here (a peer not installed, a CUDA-only path on CPU): a ``skipped`` row."""


# ---------------------------------------------------------------- where this process runs


class Env:
    """This rank's device and place in the group, with the timing and memory helpers every method shares."""

    def __init__(self, dev: torch.device, rank: int, world: int, mesh=None):
        self.dev, self.rank, self.world, self.mesh = dev, rank, world, mesh  # mesh: torch CP's 1-D device mesh
        self.cuda = dev.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def barrier(self):
        self.sync()
        dist.barrier()

    def free(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.dev) if self.cuda else 0

    def reset_peak(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.dev)

    def peak_gib(self, base: int = 0) -> float | None:
        return round((torch.cuda.max_memory_allocated(self.dev) - base) / 2**30, 2) if self.cuda else None

    def mean_ms(self, fn: Callable, reps: int, together: bool) -> float:
        """Mean ms of ``reps`` calls (CUDA events on GPU), the ranks starting together when ``together``."""
        if together:
            self.barrier()
        self.sync()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / reps
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) * 1e3 / reps


def sdpa_backend(name: str | None):
    """``sdpa_kernel`` for one named SDPA backend; 'auto' (or None) leaves PyTorch's choice."""
    if name in (None, "auto"):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, _SDPA[name])])


def import_peer(what: str):
    """Import a peer's module or raise Skip naming what is missing."""
    import importlib

    try:
        return importlib.import_module(what)
    except Exception as e:  # noqa: BLE001 - any import failure means the peer cannot run here
        raise Skip(f"{what} not importable: {e!r}"[:300]) from None


def need_cuda(env: Env, what: str):
    if not env.cuda:
        raise Skip(f"{what} needs CUDA")


_DS_GROUPS: dict = {}


def deepspeed_group(env: Env):
    """A process group over all ranks with deepspeed.comm wrapped around torch's (made once per process)."""
    if "all" not in _DS_GROUPS:
        ds_comm = import_peer("deepspeed.comm")
        ds_comm.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False, verbose=False)
        _DS_GROUPS["all"] = dist.new_group(list(range(env.world)))
    return _DS_GROUPS["all"]


def gather_rows(env: Env, mine: dict, ranks: int) -> list[dict]:
    """Every rank's small result dict (first ``ranks`` ranks), on every rank."""
    out = [None] * env.world
    dist.all_gather_object(out, mine)
    return out[:ranks]


def ec_options(a, name: str) -> dict:
    return {"ring_degree": a.usp_ring_degree} if name == "ec_usp" and a.usp_ring_degree else {}
