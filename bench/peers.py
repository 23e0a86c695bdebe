"""easy_context against its peers on the same GPUs, in one run, on the same data: PyTorch's context parallel
(``torch.distributed.tensor.experimental.context_parallel``) and DeepSpeed ALST (``UlyssesSPAttentionHF``).

    # (a)+(c) per-rank causal attention, Llama-2-7B heads, bf16, every method (estimated 4-5 min on 2 x H200)
    PYTHONUNBUFFERED=1 torchrun --nproc_per_node 2 bench/peers.py attn --seqs 65536 131072 262144
    #         GQA (32 query / 8 kv heads; ~1 min)
    PYTHONUNBUFFERED=1 torchrun --nproc_per_node 2 bench/peers.py attn --seqs 131072 --kv-heads 8
    # (b)+(c) one training step of a 4-layer Llama-2-7B-shaped model, every method (estimated 3-4 min)
    PYTHONUNBUFFERED=1 torchrun --nproc_per_node 2 bench/peers.py step --seqs 65536 131072 --layers 4
    #         256K with memory features: easy_context's mode grammar; DeepSpeed gets TiledMLP (auto, from "tile")
    PYTHONUNBUFFERED=1 torchrun --nproc_per_node 2 bench/peers.py step --seqs 262144 --ec-mode ec+norm+tile+keep \
        --methods ec_zigzag ec_ulysses ec_usp torch_cp_alltoall_cudnn ds_alst
    #         the step bench/comm_model.py --step --layers 4 --keep predicts (compare s/step)
    PYTHONUNBUFFERED=1 torchrun --nproc_per_node 2 bench/peers.py step --seqs 262144 --ec-mode ec+keep \
        --methods ec_zigzag ec_ulysses --step-ref none
    # the same step on packed rows vs one document per row (issue 15; the one-GPU reference would materialise a
    # document mask, so: --step-ref none, or consensus over several ec methods)
    PYTHONUNBUFFERED=1 torchrun --nproc_per_node 2 bench/peers.py step --seqs 131072 --layers 8 --ec-mode ec+keep \
        --methods ec_zigzag ec_ulysses --step-ref consensus --packed 1024:65536
    # the script itself on CPU (gloo, 2 processes spawned here, tiny shapes; timings mean nothing)
    python bench/peers.py attn step --cpu-smoke

Methods (``--methods``; default all that apply to the part):
  single: attention only, rank 0: F.scaled_dot_product_attention over the whole sequence (``--sdpa-backend``,
      default cuDNN), the baseline of the efficiency column.
  ec_zigzag, ec_ulysses, ec_usp: easy_context through its public API. attn: ``get_attn_func(algo)`` on
      ``shard_sequence(algo, ...)`` shards (``--ec-backend``, default cudnn; ``--usp-ring-degree``). step:
      ``apply_seq_parallel_monkey_patch(algo, model)`` + ``prepare_seq_parallel_inputs`` +
      ``easy_context.loss.sharded_cross_entropy`` on ``model.model(...)``'s hidden states, memory features from
      ``--ec-mode`` (bench/modes.py grammar: ec, ec+keep, ec+norm+tile=16384+off, ...).
  torch_cp_<rotate>_<sdpa>: rotate allgather / alltoall (``set_rotate_method``), sdpa cudnn / flash (``sdpa_kernel``):
      ``context_parallel(mesh, buffers=..., buffer_seq_dims=...)`` with its head-tail load balancing (rank r holds
      chunks r and 2W-1-r: asserted equal to easy_context's zigzag shards), F.scaled_dot_product_attention on
      (B, H, S/W, D) inside. step: the block wraps forward and backward; the model attends through transformers'
      ``sdpa_attention_forward`` under a registered name with no mask (the head-tail position ids would otherwise
      look like packed documents to transformers); loss: the model's own (``labels``/``shift_labels``, full local
      logits) with ``num_items_in_batch`` = global valid targets / W.
  ds_ulysses: attention: ``UlyssesSPAttentionHF(attn=transformers' sdpa_attention_forward, ...)`` called as
      transformers calls an attention function, contiguous shards, SDPA backend ``--sdpa-backend``.
  ds_alst: step: ``UlyssesSPAttentionHF.register_with_transformers(model, "sdpa", W, B)`` (once per process; its
      override of "sdpa" is removed after the method), batches sharded by ``UlyssesSPDataLoaderAdapter``, loss per
      the ALST recipe: Liger's fused linear cross-entropy when installed (CUDA) else DeepSpeed's
      ``sequence_tiled_compute`` over ``--loss-chunk`` tokens, then the token-weighted differentiable all_gather over
      the SP ranks. ``--ds-features`` (default: mirror ``--ec-mode``: tile -> DeepSpeed's ``TiledMLP`` on every MLP,
      off -> ``get_checkpoint_hidden_states_offloading_ctx_manager``). No DeepSpeed engine: like the other methods,
      forward + backward without an optimizer.
  A peer that is not importable (deepspeed absent) or needs CUDA (torch context parallel on CPU) is a
  ``skipped`` row; a method that fails records ``error`` (``OOM: ...`` for out-of-memory) and the run goes on. A
  failure on one rank only can leave the other in a collective until ``--pg-timeout``.

Formulas. Attention (batch B, global length S, H query heads, head dim D, W ranks): causal forward FLOPs
F = 2*B*S^2*H*D (half of 4*B*S^2*H*D), backward 2.5*F, forward+backward 3.5*F (as bench/attention.py). Per-rank
TFLOP/s = FLOPs / W / t, t = the slowest rank's mean time over ``--reps`` CUDA-event-timed calls (forward alone under
no_grad; forward+backward with the same dout). Efficiency = (t_single / W) / t, t_single = ``single``'s time over the
whole sequence on one GPU. Peak extra memory = the rank's max allocated during the timed calls minus what was
allocated before the method made its inputs.
Step (N parameters, T = B*S tokens, L layers, hidden d = H*D): model FLOPs = 6*N*T + 3.5*L*2*B*S^2*d (causal attention
forward + backward; the checkpoint recompute is not counted); s/step = slowest rank's mean over ``--reps`` steps after
``--warmup``; tokens/s = T / s; MFU = FLOPs / W / s / ``--peak-tflops`` (989, H100/H200 dense bf16). Peak memory = max
allocated per rank during the timed steps (weights and gradients included).

Correctness (c). Attention: one exact reference per length, built on every rank from the same full-sequence inputs
on ``--ref-heads`` query heads (whole kv groups): float32 F.sdpa with the memory-efficient kernel on CUDA, float64
on CPU. The yardstick is F.sdpa in the run's dtype (``--sdpa-backend``) on the same heads against that reference;
each method's out/dq/dk/dv (its own layout, those heads) get rel_l2 = ||x - ref|| / ||ref|| over the whole sequence.
A row is WRONG when any of the four exceeds 2x the yardstick's (floor 1e-5 for float32, whose yardstick is ~1e-7).
GQA through SDPA (single, torch CP) uses ``enable_gqa=True``; a backend that refuses it gets K/V repeated to the query
heads inside the call, and the row says ``gqa: repeat``.
Step: ``--step-ref single`` (default) runs the same model on the whole sequence on rank 0 (transformers' sdpa,
easy_context's chunked cross-entropy in float32, no liger; when it fails, e.g. out of memory, the median of the
methods instead); ``consensus`` takes the median of the methods; ``none`` checks nothing. Every
method reports the global token-mean loss and gnorm = ||sum over ranks of d(rank loss)/d(layers[0].q_proj.weight)|| / W
(each method's rank losses are scaled so that this is the gradient of the global mean). A row is WRONG when its loss
differs from the reference by more than 1e-3 relative or its gnorm by more than ``--gnorm-tol`` (2e-2) relative.
A WRONG row never counts as the best peer.

Output: one JSON line per row, appended as it comes, to ``$OUT/peers_attn.jsonl`` / ``$OUT/peers_step.jsonl``
(``--out-dir``; default ``$OUT``, else bench/results/, with ``--cpu-smoke`` a temporary folder), the first line of each
run a ``kind: env`` row; then a markdown table per part with a "vs best peer" column (best peer's time / this row's:
above 1 = faster than every correct peer). ``--cpu-smoke``: gloo, tiny shapes, easy_context's math kernel; spawns its
2 processes itself unless started by torchrun.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)  # bench/modes.py
sys.path.insert(1, os.path.dirname(BENCH))  # the checkout's easy_context when it is not installed

from _profile import profiled  # noqa: E402
from modes import apply_features, parse_mode  # noqa: E402

EC_ALGOS = {"ec_zigzag": "zigzag_ring_attn", "ec_ulysses": "ulysses_attn", "ec_usp": "usp_attn"}
TORCH_CP = tuple(f"torch_cp_{rotate}_{sdpa}" for rotate in ("allgather", "alltoall") for sdpa in ("cudnn", "flash"))
ATTN_METHODS = ("single", *EC_ALGOS, *TORCH_CP, "ds_ulysses")
STEP_METHODS = (*EC_ALGOS, *TORCH_CP, "ds_alst")
LOSS_RTOL = 1e-3
FP32_ERR_FLOOR = 1e-5
_SDPA = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}


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


# ---------------------------------------------------------------- attention: inputs, reference, yardstick


class Case(NamedTuple):
    """One method's attention ready to run: fwd() -> out; fwdbwd() -> {out, dq, dk, dv}, each (B, S_local, heads, D);
    local(x) -> this rank's slice of a full-sequence (B, S, ...) tensor in the method's layout; info: what the row
    should say about how it ran (filled as it runs)."""
    fwd: Callable
    fwdbwd: Callable
    local: Callable
    info: dict


def attn_inputs(env: Env, b: int, s: int, h: int, hkv: int, d: int, dtype, seed: int) -> dict:
    """q, dout (B, S, H, D) and k, v (B, S, Hkv, D): the same full sequence on every rank (rank 0's, broadcast)."""
    g = torch.Generator(device=env.dev).manual_seed(seed)
    full = {n: torch.randn(b, s, heads, d, device=env.dev, dtype=dtype, generator=g)
            for n, heads in (("q", h), ("k", hkv), ("v", hkv), ("do", h))}
    for t in full.values():
        dist.broadcast(t, src=0)
    return full


def checked_heads(h: int, hkv: int, want: int) -> tuple[list[int], list[int]]:
    """(query heads, kv heads) the correctness check covers: whole GQA groups of evenly spaced kv heads, about
    ``want`` query heads (dk/dv of a kv head sum over its whole group)."""
    group = h // hkv
    n_kv = max(1, min(hkv, want // group))
    kv = list(range(0, hkv, hkv // n_kv))[:n_kv]
    return [j * group + i for j in kv for i in range(group)], kv


def _sdpa_fwd_bwd(full: dict, qi: list[int], ki: list[int], scale: float, dtype, backend: str) -> dict:
    """Full-sequence causal F.sdpa on the chosen heads, forward and backward in ``dtype`` -> (B, S, heads, D)."""
    group = len(qi) // len(ki)
    # (B, S, heads, D) -> (B, heads, S, D); k/v repeated over their group so every SDPA kernel takes them
    q, k, v = (full[n][:, :, idx].to(dtype).transpose(1, 2).contiguous().requires_grad_()
               for n, idx in (("q", qi), ("k", ki), ("v", ki)))
    do = full["do"][:, :, qi].to(dtype).transpose(1, 2).contiguous()
    with sdpa_backend(backend):
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                             is_causal=True, scale=scale)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    return {n: t.detach().transpose(1, 2) for n, t in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv))}


def exact_reference(env: Env, full: dict, qi, ki, scale: float) -> dict:
    """The exact attention: float32 memory-efficient SDPA on CUDA, float64 math on CPU."""
    if env.cuda:
        return _sdpa_fwd_bwd(full, qi, ki, scale, torch.float32, "efficient")
    return _sdpa_fwd_bwd(full, qi, ki, scale, torch.float64, "math")


@torch.no_grad()
def rel_errors(got: dict, ref: dict, reduce: bool) -> dict:
    """rel_l2 of each of out/dq/dk/dv; sums over the ranks when ``reduce`` (each holds a slice)."""
    sums = []
    for n in ("out", "dq", "dk", "dv"):
        x, r = got[n].double(), ref[n].double()
        sums += [(x - r).pow(2).sum(), r.pow(2).sum()]
    sums = torch.stack(sums)
    if reduce:
        dist.all_reduce(sums)
    return {n: float((sums[2 * i] / sums[2 * i + 1].clamp_min(1e-300)).sqrt())
            for i, n in enumerate(("out", "dq", "dk", "dv"))}


def attn_verdict(errs: dict, yard: dict, dtype: torch.dtype) -> tuple[bool, str]:
    """(within 2x the SDPA yardstick on every tensor, what exceeded it). float32 gets a 1e-5 floor."""
    floor = FP32_ERR_FLOOR if dtype == torch.float32 else 0.0
    bad = [f"{n} {errs[n]:.2e} > 2x {yard[n]:.2e}" for n in ("out", "dq", "dk", "dv")
           if not errs[n] <= max(2 * yard[n], floor)]  # NaN fails
    return not bad, "; ".join(bad)


# ---------------------------------------------------------------- attention: one context manager per method


def _case(fwd: Callable, leaves: tuple, dout: torch.Tensor, local: Callable, head_major: bool,
          info: dict | None = None) -> Case:
    """Wrap a forward: fwdbwd differentiates it w.r.t. ``leaves`` with ``dout``. ``head_major``: the tensors are
    SDPA's (B, H, S, D) and are reported as (B, S, H, D)."""
    def fwdbwd():
        out = fwd()
        grads = torch.autograd.grad(out, leaves, dout)
        res = dict(zip(("out", "dq", "dk", "dv"), (out, *grads)))
        return {n: t.transpose(1, 2) for n, t in res.items()} if head_major else res

    return Case(fwd, fwdbwd, local, info if info is not None else {})


def _sdpa_case(q, k, v, dout, scale: float, backend: str, local: Callable) -> Case:
    """F.scaled_dot_product_attention on (B, H, S, D) q/k/v, looked up at each call (context_parallel patches it).

    GQA: ``enable_gqa=True``; if the chosen backend refuses it, K/V repeated to the query heads inside the call
    (the row then says ``gqa: repeat``)."""
    group = q.shape[1] // k.shape[1]
    info = {"gqa": "enable_gqa"} if group > 1 else {}

    def call():
        if info.get("gqa") == "repeat":
            return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                                  is_causal=True, scale=scale)
        gqa = {"enable_gqa": True} if group > 1 else {}
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, **gqa)

    def fwd():
        with sdpa_backend(backend):
            if info.get("gqa") == "enable_gqa" and "tried" not in info:
                info["tried"] = True
                try:
                    return call()
                except RuntimeError as e:  # e.g. "No available kernel" for this backend with enable_gqa
                    info.update(gqa="repeat", gqa_refused=repr(e)[:200])
            return call()

    return _case(fwd, (q, k, v), dout, local, head_major=True, info=info)


def _leaves(full: dict, local: Callable, head_major: bool):
    """This rank's q, k, v (requiring grad) and dout, contiguous; (B, H, S_local, D) when ``head_major``."""
    def take(n):
        x = local(full[n])
        return x.transpose(1, 2).contiguous() if head_major else x.contiguous()

    q, k, v = (take(n).requires_grad_() for n in ("q", "k", "v"))
    return q, k, v, take("do")


@contextlib.contextmanager
def single_case(env: Env, a, full: dict, scale: float):
    q, k, v, do = _leaves(full, lambda x: x, head_major=True)
    yield _sdpa_case(q, k, v, do, scale, a.sdpa_backend, lambda x: x)


@contextlib.contextmanager
def ec_case(env: Env, a, name: str, full: dict, scale: float):
    import easy_context as ec

    algo, opts = EC_ALGOS[name], ec_options(a, name)

    def local(x):
        return ec.shard_sequence(algo, x, env.rank, env.world, **opts)

    q, k, v, do = _leaves(full, local, head_major=False)
    attn = ec.get_attn_func(algo)
    kw = dict(causal=True, softmax_scale=scale, backend=a.ec_backend, check=not a.ec_no_check, **opts)
    yield _case(lambda: attn(q, k, v, **kw), (q, k, v), do, local, head_major=False)


@contextlib.contextmanager
def torch_cp_case(env: Env, a, name: str, full: dict, scale: float):
    need_cuda(env, "torch context_parallel (its SDPA handlers cover the CUDA flash/efficient/cuDNN ops only)")
    import easy_context as ec

    cp = import_peer("torch.distributed.tensor.experimental")
    rotate, backend = name.split("_")[2:4]
    import_peer("torch.distributed.tensor.experimental._attention").set_rotate_method(rotate)

    def local(x):
        return ec.shard_sequence("zigzag_ring_attn", x, env.rank, env.world)

    s = full["q"].shape[1]
    positions = torch.arange(s, device=env.dev).unsqueeze(0)
    original_sdpa = F.scaled_dot_product_attention
    try:
        with cp.context_parallel(env.mesh, buffers=[positions], buffer_seq_dims=[1], no_restore_buffers={positions}):
            # context_parallel sharded the positions its own way: the check below compares like with like only
            # when that is the zigzag layout (chunks r and 2W-1-r)
            if not torch.equal(positions, local(torch.arange(s, device=env.dev).unsqueeze(0))):
                raise RuntimeError("context_parallel's shards are not the zigzag layout; the check would be wrong")
            q, k, v, do = _leaves(full, local, head_major=True)
            yield _sdpa_case(q, k, v, do, scale, backend, local)
    finally:
        # torch 2.11's context_parallel restores F.scaled_dot_product_attention only when its block ends without
        # an exception; a failed method must not leave it patched for the methods after it
        if F.scaled_dot_product_attention is not original_sdpa:
            F.scaled_dot_product_attention = original_sdpa
            with contextlib.suppress(Exception):
                import_peer("torch.distributed.tensor.experimental._attention")._disable_context_parallel_dispatcher()


class _AttentionLayer(torch.nn.Module):
    """What transformers' sdpa_attention_forward and UlyssesSPAttentionHF read from a decoder's attention module."""

    def __init__(self, kv_groups: int):
        super().__init__()
        self.is_causal = True
        self.num_key_value_groups = kv_groups


@contextlib.contextmanager
def ds_ulysses_case(env: Env, a, full: dict, scale: float):
    group = deepspeed_group(env)
    ulysses_sp = import_peer("deepspeed.runtime.sequence_parallel.ulysses_sp")
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    import easy_context as ec

    b, s, h, d = full["q"].shape
    hkv, sl = full["k"].shape[2], s // env.world
    attn = ulysses_sp.UlyssesSPAttentionHF(
        attn=sdpa_attention_forward, batch_size=b, attn_head_count=h, attn_head_size=d, kv_head_count=hkv,
        num_hidden_layers=1, process_group=group, seq_length_is_variable=True)

    def local(x):  # DeepSpeed's batch adapter gives rank r the r-th contiguous chunk
        return ec.shard_sequence("ulysses_attn", x, env.rank, env.world)

    q, k, v, do = _leaves(full, local, head_major=False)
    layer = _AttentionLayer(h // hkv)
    positions = torch.arange(env.rank * sl, (env.rank + 1) * sl, device=env.dev).unsqueeze(0)

    def fwd():
        with sdpa_backend(a.sdpa_backend):
            # transformers hands attention functions (B, H, S_local, D) views of its (B, S_local, H, D) projections;
            # ALST returns (B, S_local, H*D)
            out, _ = attn(layer, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None,
                          position_ids=positions, dropout=0.0, scaling=scale)
        return out.view(b, sl, h, d)

    yield _case(fwd, (q, k, v), do, local, head_major=False)


def ec_options(a, name: str) -> dict:
    return {"ring_degree": a.usp_ring_degree} if name == "ec_usp" and a.usp_ring_degree else {}


# ---------------------------------------------------------------- attention: runner


def attn_case(env: Env, a, name: str, full: dict, scale: float):
    if name == "single":
        return single_case(env, a, full, scale)
    if name in EC_ALGOS:
        return ec_case(env, a, name, full, scale)
    if name in TORCH_CP:
        return torch_cp_case(env, a, name, full, scale)
    if name == "ds_ulysses":
        return ds_ulysses_case(env, a, full, scale)
    raise ValueError(f"unknown attention method {name!r}; choose from {', '.join(ATTN_METHODS)}")


def measure_attn(env: Env, a, name: str, s: int, full: dict, scale: float, check) -> dict:
    """Check, warm up and time one method at one length on this rank -> its result (status, times, errors)."""
    is_single = name == "single"
    if is_single and env.rank != 0:
        return {"status": "idle"}
    res = {"status": "ok"}
    try:
        base = env.allocated()
        with attn_case(env, a, name, full, scale) as case:
            if check is not None:
                qi, ref = check
                got = case.fwdbwd()
                got = {n: t[:, :, qi] if n in ("out", "dq") else t[:, :, ref["kv"]] for n, t in got.items()}
                res["err"] = rel_errors(got, {n: case.local(ref[n]) for n in ("out", "dq", "dk", "dv")},
                                        reduce=not is_single)
                del got
            env.free()
            env.reset_peak()
            for _ in range(a.warmup):
                case.fwdbwd()
            with torch.no_grad():
                res["ms_fwd"] = env.mean_ms(case.fwd, a.reps, together=not is_single)
            res["ms_fwdbwd"] = env.mean_ms(case.fwdbwd, a.reps, together=not is_single)
            res["peak_extra_GiB"] = env.peak_gib(base)
            res["info"] = {k: v for k, v in case.info.items() if k != "tried"}
            if a.profile:  # one more fwd+bwd under the profiler: its table to profile_rank<r>.txt
                res["profile"] = profiled(case.fwdbwd, f"attn {name} S={s} rank{env.rank}",
                                          os.path.join(a.out_dir, f"profile_rank{env.rank}.txt"))
    except Skip as e:
        res = {"status": "skipped", "why": str(e)}
    except Exception as e:  # noqa: BLE001 - record it and go on with the next method
        oom = isinstance(e, torch.OutOfMemoryError)
        res = {"status": "error", "why": ("OOM: " if oom else "") + repr(e)[:500]}
        if a.verbose_errors:
            traceback.print_exc()
    env.free()
    return res


def attn_row(env: Env, a, name: str, s: int, per_rank: list[dict], yard: dict | None, single_ms, dtype) -> dict:
    w = 1 if name == "single" else env.world
    row = dict(kind="attn", method=name, S=s, W=w, B=a.batch, H=a.heads, KV=a.kv_heads, D=a.head_dim, dtype=a.dtype)
    if name in EC_ALGOS:
        row["ec_backend"] = a.ec_backend
        if name == "ec_usp":
            from easy_context.attention.comm import usp_degrees
            row["usp_ring_ulysses"] = list(usp_degrees(env.world, a.usp_ring_degree))
    statuses = {r["status"] for r in per_rank}
    if statuses != {"ok"}:
        for key in ("error", "skipped"):
            whys = {f"rank{i}": r["why"] for i, r in enumerate(per_rank) if r["status"] == key}
            if whys:
                row[key] = whys if len(set(whys.values())) > 1 else next(iter(whys.values()))
                break
        else:
            row["error"] = "failed"
        return row
    ms_f = max(r["ms_fwd"] for r in per_rank)
    ms_fb = max(r["ms_fwdbwd"] for r in per_rank)
    flops = 2.0 * a.batch * s * s * a.heads * a.head_dim
    row.update(ms_fwd=round(ms_f, 3), ms_fwdbwd=round(ms_fb, 3),
               ms_fwdbwd_per_rank=[round(r["ms_fwdbwd"], 3) for r in per_rank],
               tflops_per_rank_fwd=round(flops / w / ms_f / 1e9, 1),
               tflops_per_rank_fwdbwd=round(3.5 * flops / w / ms_fb / 1e9, 1))
    if single_ms:
        row.update(eff_fwd=round(single_ms[0] / w / ms_f, 3), eff_fwdbwd=round(single_ms[1] / w / ms_fb, 3))
    if env.cuda:
        row["peak_extra_GiB_per_rank"] = [r["peak_extra_GiB"] for r in per_rank]
    row.update(per_rank[0].get("info", {}))
    if "profile" in per_rank[0]:
        row["profile_per_rank"] = [r["profile"] for r in per_rank]
    if "err" in per_rank[0] and yard is not None:
        errs = per_rank[0]["err"]  # all-reduced: the same on every rank
        ok, why = attn_verdict(errs, yard, dtype)
        row.update(err={n: float(f"{e:.3e}") for n, e in errs.items()},
                   yardstick={n: float(f"{e:.3e}") for n, e in yard.items()},
                   check="ok" if ok else "WRONG")
        if not ok:
            row["wrong"] = why
    else:
        row["check"] = "unchecked"
    return row


def run_attn(env: Env, a, write) -> list[dict]:
    dtype = DTYPES[a.dtype]
    methods = a.methods or list(ATTN_METHODS)
    scale = 1.0 / math.sqrt(a.head_dim)
    rows = []
    for s in a.seqs:
        full = attn_inputs(env, a.batch, s, a.heads, a.kv_heads, a.head_dim, dtype, a.seed + s)
        check = yard = None
        if a.ref_heads > 0:
            t0 = time.time()
            qi, ki = checked_heads(a.heads, a.kv_heads, a.ref_heads)
            try:
                ref = exact_reference(env, full, qi, ki, scale)
                sdpa = _sdpa_fwd_bwd(full, qi, ki, scale, dtype, a.sdpa_backend)
                yard = rel_errors(sdpa, ref, reduce=False)
                del sdpa
                ref["kv"] = ki
                check = (qi, ref)
            except Exception as e:  # noqa: BLE001 - the run goes on unchecked
                write("attn", dict(kind="reference", S=s, error=repr(e)[:500]))
            env.free()
            write("attn", dict(kind="reference", S=s, heads_checked=qi, kv_heads_checked=ki,
                               what="float32 efficient SDPA" if env.cuda else "float64 math SDPA",
                               yardstick=yard and {n: float(f"{e:.3e}") for n, e in yard.items()},
                               yardstick_what=f"F.sdpa {a.dtype} ({a.sdpa_backend})",
                               seconds=round(time.time() - t0, 1)))
        single_ms = None
        for name in methods:
            res = measure_attn(env, a, name, s, full, scale, check)
            per_rank = gather_rows(env, res, 1 if name == "single" else env.world)
            row = attn_row(env, a, name, s, per_rank, yard, single_ms, dtype)
            if name == "single" and "ms_fwd" in row:
                single_ms = (row["ms_fwd"], row["ms_fwdbwd"])
            write("attn", row)
            rows.append(row)
        del full, check
        env.free()
    return rows


# ---------------------------------------------------------------- step: model, data, losses


def build_model(env: Env, a, dtype):
    """Random-init Llama of the configured shape (the same weights for every method: one seed), gradient
    checkpointing (non-reentrant), train mode, transformers' sdpa attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=a.hidden, intermediate_size=a.intermediate, num_attention_heads=a.heads,
                      num_key_value_heads=a.kv_heads, num_hidden_layers=a.layers, vocab_size=a.vocab,
                      max_position_embeddings=2 * max(a.seqs), rope_theta=1e6, use_cache=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(a.seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(env.dev):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def packed_bounds(a, s: int) -> list[int] | None:
    """``--packed MIN:MAX``: the document boundaries of a row of S tokens (log-uniform lengths, seeded by S, as
    bench/packed_attn.py draws them); None without it."""
    if not a.packed:
        return None
    from packed_attn import doc_mix  # bench/packed_attn.py (this script's folder is on sys.path)

    lo, hi = (int(x) for x in a.packed.split(":"))
    return doc_mix(s, lo, hi, seed=s)


def step_batch(env: Env, a, s: int) -> dict:
    """One random sequence (rank 0's on every rank), positions 0..S-1, targets shifted by one (last -100).
    ``--packed``: positions restart at each document and a document's last token predicts nothing (as train.py)."""
    g = torch.Generator(device=env.dev).manual_seed(a.seed + s)
    ids = torch.randint(0, a.vocab, (a.batch, s), device=env.dev, generator=g)
    dist.broadcast(ids, src=0)
    bounds = packed_bounds(a, s)
    if bounds is None:
        pos = torch.arange(s, device=env.dev).unsqueeze(0).expand(a.batch, s).contiguous()
    else:
        pos = torch.cat([torch.arange(y - x) for x, y in zip(bounds[:-1], bounds[1:])]).to(env.dev)
        pos = pos.unsqueeze(0).expand(a.batch, s).contiguous()
    tgt = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    tgt[:, :-1][pos[:, 1:] == 0] = -100
    return {"ids": ids, "pos": pos, "tgt": tgt}


def common_loss(hidden, weight, targets, chunk: int, world: int):
    """``--loss common``: rank loss = W * (this rank's CE sum) / (global valid targets), easy_context's chunked
    cross-entropy without liger -> (rank loss, global token mean)."""
    from easy_context.loss import linear_cross_entropy_sum

    local = linear_cross_entropy_sum(hidden, weight, targets, chunk_size=chunk, use_liger=False)
    stats = torch.stack([local.detach().double(), (targets != -100).sum().double()])
    dist.all_reduce(stats)
    n = stats[1].clamp_min(1)
    return local * (world / n).float(), (stats[0] / n).float()


def q0_gnorm(model, env: Env | None) -> float:
    """||sum over ranks of the q_proj gradient of layer 0|| / W (or the local norm when env is None)."""
    w = model.model.layers[0].self_attn.q_proj.weight
    g = torch.zeros_like(w, dtype=torch.float32) if w.grad is None else w.grad.float()
    if env is None:
        return float(g.norm())
    dist.all_reduce(g)
    return float(g.norm() / env.world)


# ---------------------------------------------------------------- step: methods (setup -> step -> teardown)


class EcStep:
    def __init__(self, env: Env, a, name: str):
        self.env, self.a, self.algo, self.opts = env, a, EC_ALGOS[name], ec_options(a, name)
        self.features = parse_mode(a.ec_mode, a.layers)
        if self.features is None:
            raise ValueError("--ec-mode must start with 'ec' (stock is the reference step, not an easy_context mode)")

    def setup(self, model):
        import easy_context as ec

        ec.apply_seq_parallel_monkey_patch(self.algo, model, backend=self.a.ec_backend, **self.opts)
        self.modeling = {type(m).__module__ for m in model.modules() if hasattr(m, "q_proj")}
        apply_features(model, self.features)

    def step(self, model, batch):
        import easy_context as ec

        env, a = self.env, self.a
        p = ec.prepare_seq_parallel_inputs(self.algo, batch["ids"], batch["pos"], batch["tgt"], env.rank, env.world,
                                           env.dev, balance_documents=bool(a.packed), **self.opts)
        hidden = model.model(input_ids=p["local_input_ids"], position_ids=p["local_position_ids"]).last_hidden_state
        if a.loss == "native":
            res = ec.sharded_cross_entropy(hidden, model.lm_head.weight, p["local_target_ids"], chunk_size=a.loss_chunk)
            loss, glob = res.loss, res.global_loss
        else:
            loss, glob = common_loss(hidden, model.lm_head.weight, p["local_target_ids"], a.loss_chunk, env.world)
        loss.backward()
        return glob

    def teardown(self):
        if self.features.fused_kernels:  # the fused RoPE is module-wide: give the next methods transformers' own
            for name in getattr(self, "modeling", ()):
                fn = getattr(sys.modules[name], "apply_rotary_pos_emb", None)
                if hasattr(fn, "_easy_context_original"):
                    sys.modules[name].apply_rotary_pos_emb = fn._easy_context_original


def _no_mask(*args, **kwargs):
    return None


class TorchCpStep:
    ATTN_NAME = "peers_torch_cp"  # no "sdpa" in it: transformers special-cases that substring

    def __init__(self, env: Env, a, name: str):
        need_cuda(env, "torch context_parallel (its SDPA handlers cover the CUDA flash/efficient/cuDNN ops only)")
        self.env, self.a = env, a
        self.rotate, self.backend = name.split("_")[2:4]
        self.cp = import_peer("torch.distributed.tensor.experimental")
        self.cp_private = import_peer("torch.distributed.tensor.experimental._attention")

    def setup(self, model):
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(self.ATTN_NAME, sdpa_attention_forward)
        AttentionMaskInterface.register(self.ATTN_NAME, _no_mask)
        model.set_attn_implementation(self.ATTN_NAME)

    def step(self, model, batch):
        env, a = self.env, self.a
        self.cp_private.set_rotate_method(self.rotate)
        ids, pos, tgt = (batch[n].clone() for n in ("ids", "pos", "tgt"))  # sharded in place
        original_sdpa = F.scaled_dot_product_attention
        try:
            with self.cp.context_parallel(env.mesh, buffers=[ids, pos, tgt], buffer_seq_dims=[1, 1, 1],
                                          no_restore_buffers={ids, pos, tgt}):
                with sdpa_backend(self.backend):  # the backward's checkpoint recompute calls SDPA again: inside
                    if a.loss == "native":
                        count = (tgt != -100).sum().double()
                        dist.all_reduce(count)
                        count = count.clamp_min(1)
                        # the model's own loss as sum / num_items_in_batch: W * local sum / global count per rank
                        out = model(input_ids=ids, position_ids=pos, labels=tgt, shift_labels=tgt,
                                    num_items_in_batch=(count / env.world).float())
                        loss = out.loss
                        del out
                        total = loss.detach().double() * count / env.world
                        dist.all_reduce(total)
                        glob = (total / count).float()
                    else:
                        hidden = model.model(input_ids=ids, position_ids=pos).last_hidden_state
                        loss, glob = common_loss(hidden, model.lm_head.weight, tgt, a.loss_chunk, env.world)
                    loss.backward()
        finally:
            if F.scaled_dot_product_attention is not original_sdpa:  # see torch_cp_case
                F.scaled_dot_product_attention = original_sdpa
                with contextlib.suppress(Exception):
                    self.cp_private._disable_context_parallel_dispatcher()
        return glob

    def teardown(self):
        pass


_ALST: dict = {}  # register_with_transformers initialises DeepSpeed's SP groups, which it allows once per process


def ds_feature_list(a) -> list[str]:
    """--ds-features, or (auto) DeepSpeed's counterparts of --ec-mode's features: tile -> tiled_mlp, off -> offload."""
    if a.ds_features != ["auto"]:
        return [f for f in a.ds_features if f != "none"]
    f = parse_mode(a.ec_mode, a.layers)
    return (["tiled_mlp"] if f and f.tiled_mlp else []) + (["offload"] if f and f.offload_layers else [])


def ds_loss_kind(env: Env, a) -> str:
    if a.ds_loss != "auto":
        return a.ds_loss
    import importlib.util

    return "liger" if env.cuda and importlib.util.find_spec("liger_kernel") is not None else "tiled"


def _mlp(mlp, x):
    return mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))


class AlstStep:
    """DeepSpeed ALST's pieces around a plain transformers model (no DeepSpeed engine)."""

    def __init__(self, env: Env, a):
        self.env, self.a = env, a
        self.usp = import_peer("deepspeed.runtime.sequence_parallel.ulysses_sp")
        self.features = ds_feature_list(a)
        self.loss_kind = ds_loss_kind(env, a)

    def setup(self, model):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if "mpu" not in _ALST:
            deepspeed_group(self.env)  # deepspeed.comm on top of the existing torch group
            _ALST["transformers_sdpa"] = ALL_ATTENTION_FUNCTIONS["sdpa"]
            _ALST["mpu"] = self.usp.UlyssesSPAttentionHF.register_with_transformers(
                model_name_or_path=model, core_attn_implementation="sdpa", sequence_parallel_size=self.env.world,
                micro_batch_size=self.a.batch, seq_length_is_variable=True)
            _ALST["ulysses_sdpa"] = ALL_ATTENTION_FUNCTIONS["sdpa"]
        ALL_ATTENTION_FUNCTIONS["sdpa"] = _ALST["ulysses_sdpa"]  # ALST's wrapper replaces the "sdpa" entry
        self.group = _ALST["mpu"].get_sequence_parallel_group()
        if "tiled_mlp" in self.features:
            tiled = self.usp.TiledMLP

            def forward(mlp, x):  # DeepSpeed's documented LlamaMLP patch: ceil(seq / hidden) shards
                shards = max(1, math.ceil(x.shape[-2] / x.shape[-1]))
                return tiled.apply(_mlp, mlp, x, shards, [mlp.gate_proj.weight, mlp.up_proj.weight,
                                                          mlp.down_proj.weight])

            for layer in model.model.layers:
                layer.mlp.forward = forward.__get__(layer.mlp)
        self.offload = contextlib.nullcontext
        if "offload" in self.features:
            from deepspeed.runtime.activation_checkpointing.offload_activations import \
                get_checkpoint_hidden_states_offloading_ctx_manager as offloading

            cuda = self.env.cuda
            self.offload = lambda: offloading(use_pin_memory=cuda, use_streams=cuda)

    def _shard(self, batch):
        adapter = self.usp.UlyssesSPDataLoaderAdapter(
            [{"input_ids": batch["ids"], "position_ids": batch["pos"], "labels": batch["ids"]}],
            sp_rank=self.env.rank, sp_group=self.group, sp_world_size=self.env.world, device=self.env.dev)
        mb = next(iter(adapter))  # sample 0's contiguous chunk for this rank; labels -> shift_labels
        return {k: v.to(self.env.dev) for k, v in mb.items() if torch.is_tensor(v)}

    def _loss_sum(self, model, hidden, labels):
        if self.loss_kind == "liger":
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            return liger_fused_linear_cross_entropy(input=hidden.reshape(-1, hidden.shape[-1]),
                                                    weight=model.lm_head.weight, target=labels.reshape(-1),
                                                    ignore_index=-100, reduction="sum").float()

        def ce(x, y):
            return F.cross_entropy(model.lm_head(x).float().flatten(0, 1), y.flatten(), ignore_index=-100,
                                   reduction="sum")

        seq = hidden.shape[1]
        return self.usp.sequence_tiled_compute(
            ce, seq, max(1, math.ceil(seq / self.a.loss_chunk)), {"x": hidden, "y": labels}, {}, "x",
            compute_params=[model.lm_head.weight], output_unshard_dimension=0, output_reduction="sum")

    def step(self, model, batch):
        env, a = self.env, self.a
        mb = self._shard(batch)
        with self.offload(), sdpa_backend(a.sdpa_backend):  # backward inside: the recompute calls SDPA again
            hidden = model.model(input_ids=mb["input_ids"], position_ids=mb["position_ids"]).last_hidden_state
            labels = mb["shift_labels"]
            if a.loss == "native":
                good = (labels != -100).sum()
                mean = self._loss_sum(model, hidden, labels) / good.clamp_min(1)
                # the ALST recipe: every rank's mean, gathered differentiably, weighted by its valid targets
                means = torch.distributed.nn.functional.all_gather(mean, group=self.group)
                goods = [torch.zeros_like(good) for _ in range(env.world)]
                dist.all_gather(goods, good, group=self.group)
                loss = sum(m * g for m, g in zip(means, goods)) / torch.stack(goods).sum().clamp_min(1)
                glob = loss.detach()
            else:
                loss, glob = common_loss(hidden, model.lm_head.weight, labels, a.loss_chunk, env.world)
            loss.backward()
        return glob

    def teardown(self):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if "transformers_sdpa" in _ALST:
            ALL_ATTENTION_FUNCTIONS["sdpa"] = _ALST["transformers_sdpa"]


def step_method(env: Env, a, name: str):
    if name in EC_ALGOS:
        return EcStep(env, a, name)
    if a.packed:
        raise Skip("--packed: the peers' steps here take one document per row")
    if name in TORCH_CP:
        return TorchCpStep(env, a, name)
    if name == "ds_alst":
        return AlstStep(env, a)
    raise ValueError(f"unknown step method {name!r}; choose from {', '.join(STEP_METHODS)}")


# ---------------------------------------------------------------- step: runner


def reference_step(env: Env, a, batch, dtype) -> dict:
    """The whole sequence on rank 0: transformers' sdpa, easy_context's chunked CE (float32, no liger); broadcast."""
    from easy_context.loss import linear_cross_entropy_sum

    res = {"status": "idle"}
    if env.rank == 0:
        model = None
        try:
            env.reset_peak()
            t0 = time.perf_counter()
            model = build_model(env, a, dtype)
            with sdpa_backend(a.sdpa_backend):
                hidden = model.model(input_ids=batch["ids"], position_ids=batch["pos"]).last_hidden_state
                n = (batch["tgt"] != -100).sum().clamp_min(1)
                loss = linear_cross_entropy_sum(hidden, model.lm_head.weight, batch["tgt"], chunk_size=a.loss_chunk,
                                                use_liger=False) / n
                del hidden
                loss.backward()
            env.sync()
            res = {"status": "ok", "loss": float(loss.detach()), "gnorm_q0": q0_gnorm(model, None),
                   "seconds": round(time.perf_counter() - t0, 2), "peak_GiB": env.peak_gib()}
        except Exception as e:  # noqa: BLE001 - fall back to the methods' consensus
            res = {"status": "error", "why": ("OOM: " if isinstance(e, torch.OutOfMemoryError) else "") + repr(e)[:500]}
        del model
        env.free()
    return gather_rows(env, res, 1)[0]


def measure_step(env: Env, a, name: str, batch, dtype) -> dict:
    res, method, model = {"status": "ok"}, None, None
    try:
        method = step_method(env, a, name)
        model = build_model(env, a, dtype)
        res["n_params"] = sum(p.numel() for p in model.parameters())
        method.setup(model)
        times = []
        for i in range(a.warmup + a.reps):
            if i == a.warmup:
                env.reset_peak()
            env.barrier()
            t0 = time.perf_counter()
            glob = method.step(model, batch)
            env.sync()
            if i >= a.warmup:
                times.append(time.perf_counter() - t0)
            if i == a.warmup + a.reps - 1:
                res.update(loss=float(glob), gnorm_q0=q0_gnorm(model, env))
            model.zero_grad(set_to_none=True)
        res.update(times=times, peak_GiB=env.peak_gib())
    except Skip as e:
        res = {"status": "skipped", "why": str(e)}
    except Exception as e:  # noqa: BLE001 - record it and go on with the next method
        res = {"status": "error", "why": ("OOM: " if isinstance(e, torch.OutOfMemoryError) else "") + repr(e)[:500]}
        if a.verbose_errors:
            traceback.print_exc()
    if method is not None:
        with contextlib.suppress(Exception):
            method.teardown()
    del model
    env.free()
    return res


def step_row(env: Env, a, name: str, s: int, per_rank: list[dict]) -> dict:
    row = dict(kind="step", method=name, S=s, W=env.world, B=a.batch, layers=a.layers, hidden=a.hidden, heads=a.heads,
               kv_heads=a.kv_heads, dtype=a.dtype, loss_mode=a.loss)
    if name in EC_ALGOS:
        row["ec_mode"] = a.ec_mode
    if name == "ds_alst":
        row.update(ds_features=ds_feature_list(a), ds_loss=ds_loss_kind(env, a) if a.loss == "native" else "common")
    statuses = {r["status"] for r in per_rank}
    if statuses != {"ok"}:
        key = "skipped" if statuses <= {"skipped", "ok"} and "skipped" in statuses else "error"
        whys = {f"rank{i}": r["why"] for i, r in enumerate(per_rank) if r["status"] != "ok"}
        row[key] = whys if len(set(whys.values())) > 1 else next(iter(whys.values()), "failed")
        return row
    t = max(sum(r["times"]) / len(r["times"]) for r in per_rank)  # the slowest rank's mean
    n_params = per_rank[0]["n_params"]
    tokens = a.batch * s
    bounds = packed_bounds(a, s)
    pairs = s * s / 2 if bounds is None else sum((y - x) * (y - x + 1) / 2 for x, y in zip(bounds[:-1], bounds[1:]))
    flops = 6.0 * n_params * tokens + 3.5 * a.layers * 4.0 * a.batch * pairs * a.hidden  # attention: in-document
    if bounds is not None:
        row.update(packed=a.packed, docs=len(bounds) - 1, attn_pairs_fraction=round(pairs / (s * s / 2), 4))
    row.update(s_per_step=round(t, 3), steps_s=[round(x, 3) for x in per_rank[0]["times"]], tok_per_s=round(tokens / t),
               tflops_per_gpu=round(flops / env.world / t / 1e12, 1),
               mfu=round(flops / env.world / t / (a.peak_tflops * 1e12), 4),
               loss=per_rank[0]["loss"], gnorm_q0=per_rank[0]["gnorm_q0"], n_params=n_params)
    if env.cuda:
        row["peak_GiB_per_rank"] = [r["peak_GiB"] for r in per_rank]
    return row


def step_verdict(row: dict, ref: dict, gnorm_tol: float) -> None:
    """Mark ``row`` (in place) against the reference loss and gnorm."""
    if "loss" not in row:
        return
    if ref is None:
        row["check"] = "unchecked"
        return
    d_loss = abs(row["loss"] - ref["loss"]) / abs(ref["loss"])
    d_gnorm = abs(row["gnorm_q0"] - ref["gnorm_q0"]) / max(abs(ref["gnorm_q0"]), 1e-30)
    row.update(loss_rel_diff=float(f"{d_loss:.2e}"), gnorm_rel_diff=float(f"{d_gnorm:.2e}"), ref=ref["what"])
    bad = ([f"loss {row['loss']:.6f} vs {ref['loss']:.6f}"] if not d_loss <= LOSS_RTOL else []) + \
          ([f"gnorm {row['gnorm_q0']:.4e} vs {ref['gnorm_q0']:.4e}"] if not d_gnorm <= gnorm_tol else [])
    row["check"] = "WRONG" if bad else "ok"
    if bad:
        row["wrong"] = "; ".join(bad)


def run_step(env: Env, a, write) -> list[dict]:
    dtype = DTYPES[a.dtype]
    methods = a.methods or list(STEP_METHODS)
    rows = []
    for s in a.seqs:
        batch = step_batch(env, a, s)
        ref = None
        if a.step_ref == "single":
            r = reference_step(env, a, batch, dtype)
            write("step", dict(kind="reference", S=s, what="1 GPU, whole sequence, transformers sdpa", **r))
            if r["status"] == "ok":
                ref = dict(r, what="single")
        # the median of the methods when asked for, or when the one-GPU reference failed (out of memory)
        consensus = a.step_ref == "consensus" or (a.step_ref == "single" and ref is None)
        done = []
        for name in methods:
            per_rank = gather_rows(env, measure_step(env, a, name, batch, dtype), env.world)
            row = step_row(env, a, name, s, per_rank)
            if not consensus:
                step_verdict(row, ref, a.gnorm_tol)
                write("step", row)
            done.append(row)
        if consensus:  # only now is the median known
            good = [r for r in done if "loss" in r]
            ref = good and {"loss": statistics.median(r["loss"] for r in good),
                            "gnorm_q0": statistics.median(r["gnorm_q0"] for r in good), "what": "median"}
            for row in done:
                step_verdict(row, ref or None, a.gnorm_tol)
                write("step", row)
        rows += done
        del batch
        env.free()
    return rows


# ---------------------------------------------------------------- tables


def _size(s: int) -> str:
    return f"{s // 1024}K" if s % 1024 == 0 else str(s)


def _is_peer(name: str) -> bool:
    return name.startswith(("torch_cp_", "ds_"))


def best_peer(rows: list[dict], s: int, key: str, higher: bool):
    """The best value of ``key`` among the peers' rows at length ``s`` that ran and were not WRONG."""
    vals = [r[key] for r in rows if r["S"] == s and _is_peer(r["method"]) and key in r and r.get("check") != "WRONG"]
    return (max if higher else min)(vals) if vals else None


def _table(columns: list[str], rows: list[dict], done: str, cells) -> str:
    """A markdown table, a row per result: ``cells(row)`` for rows that have ``done``; a skip or error note else."""
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        head = f"| {_size(r['S'])} | {r['method']} |"
        if done not in r:
            what = "skipped" if "skipped" in r else "error"
            out.append(f"{head} {what}: {str(r.get(what))[:90]} |" + " |" * (len(columns) - 3))
        else:
            out.append(f"{head} {cells(r)} |")
    return "\n".join(out)


def attn_table(rows: list[dict]) -> str:
    def cells(r):
        best = best_peer(rows, r["S"], "ms_fwdbwd", higher=False)
        vs = f"{best / r['ms_fwdbwd']:.2f}" if best and r["method"] != "single" else ""
        e = r.get("err")
        errs = "/".join(f"{e[n]:.1e}" for n in ("out", "dq", "dk", "dv")) if e else ""
        peak = r.get("peak_extra_GiB_per_rank")
        return (f"{r['ms_fwd']:.1f} | {r['ms_fwdbwd']:.1f} | {r['tflops_per_rank_fwdbwd']:.0f} | "
                f"{r.get('eff_fwdbwd', '')} | {max(peak) if peak else ''} | {errs} | {r.get('check', '')} | {vs}")

    return _table(["S", "method", "fwd ms", "fwd+bwd ms", "TFLOP/s/rank fwd+bwd", "eff fwd+bwd", "peak extra GiB",
                   "rel err out/dq/dk/dv", "check", "vs best peer"], rows, "ms_fwdbwd", cells)


def step_table(rows: list[dict]) -> str:
    def cells(r):
        best = best_peer(rows, r["S"], "tok_per_s", higher=True)
        vs = f"{r['tok_per_s'] / best:.2f}" if best else ""
        peak = r.get("peak_GiB_per_rank")
        return (f"{r['s_per_step']} | {r['tok_per_s']} | {r['tflops_per_gpu']} | {r['mfu']} | "
                f"{max(peak) if peak else ''} | {r['loss']:.5f} | {r['gnorm_q0']:.4e} | {r.get('check', '')} | {vs}")

    return _table(["S", "method", "s/step", "tokens/s", "TFLOP/s/GPU", "MFU", "peak GiB (max rank)", "loss",
                   "gnorm q0", "check", "vs best peer"], rows, "s_per_step", cells)


# ---------------------------------------------------------------- main


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="easy_context vs torch context parallel vs DeepSpeed ALST, same run "
                                "(the module docstring has the commands and formulas)")
    p.add_argument("parts", nargs="+", choices=["attn", "step"], help="attention (a), training step (b), or both")
    p.add_argument("--seqs", type=int, nargs="+", help="global lengths (default attn 64K 128K 256K, step 64K 128K)")
    p.add_argument("--methods", nargs="+", help=f"attn: {' '.join(ATTN_METHODS)}; step: {' '.join(STEP_METHODS)}")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=None, help="GQA kv heads (default: --heads, Llama-2-7B)")
    p.add_argument("--head-dim", type=int, default=128, help="attn; the step's is hidden / heads")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--reps", type=int, default=None, help="timed calls / steps (default attn 3, step 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed fwd+bwd calls / steps before timing")
    p.add_argument("--sdpa-backend", default=None, choices=["cudnn", "flash", "efficient", "math", "auto"],
                   help="single, the yardstick, ds_ulysses / ds_alst, the step reference (default cudnn; CPU auto)")
    p.add_argument("--ec-backend", default=None, help="easy_context kernel backend (default cudnn; CPU math)")
    p.add_argument("--ec-no-check", action="store_true", help="attn: easy_context check=False (no shape all-gather)")
    p.add_argument("--usp-ring-degree", type=int, default=None, help="ec_usp's ring degree (library default if unset)")
    p.add_argument("--ref-heads", type=int, default=4, help="attn: query heads the exact check covers (0: none)")
    p.add_argument("--profile", action="store_true", help="attn: one more fwd+bwd per method under torch.profiler: "
                   "compute/NCCL/idle time in the row, the op table in <out-dir>/profile_rank<r>.txt")
    # step
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--ec-mode", default="ec", help="ec[+norm][+fuse][+tile[=N]][+keep[=N]][+off[=N]] (bench/modes.py)")
    p.add_argument("--ds-features", nargs="+", default=["auto"], choices=["auto", "none", "tiled_mlp", "offload"],
                   help="ds_alst memory features (auto: DeepSpeed's counterparts of --ec-mode's tile and off)")
    p.add_argument("--ds-loss", default="auto", choices=["auto", "liger", "tiled"],
                   help="ds_alst native loss (auto: liger when installed on CUDA, else sequence_tiled_compute)")
    p.add_argument("--loss", default="native", choices=["native", "common"],
                   help="native: each framework's own loss; common: easy_context's chunked CE (no liger) for all")
    p.add_argument("--loss-chunk", type=int, default=4096, help="tokens per loss chunk / tile")
    p.add_argument("--packed", metavar="MIN:MAX", default=None,
                   help="step: packed rows of documents log-uniform in MIN..MAX tokens (easy_context methods only, "
                        "documents balanced as train.py does; MFU counts in-document attention)")
    p.add_argument("--step-ref", default="single", choices=["single", "consensus", "none"])
    p.add_argument("--gnorm-tol", type=float, default=2e-2, help="step: relative gnorm difference that is WRONG")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU for MFU")
    # run
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pg-timeout", type=int, default=900, help="seconds before a stuck collective aborts")
    p.add_argument("--out-dir", default=None, help="default $OUT, else bench/results (--cpu-smoke: a temp folder)")
    p.add_argument("--verbose-errors", action="store_true", help="print tracebacks of failing methods")
    p.add_argument("--cpu-smoke", action="store_true", help="gloo + tiny shapes on CPU: checks the script only")
    a = p.parse_args(argv)
    cuda = not a.cpu_smoke
    if a.cpu_smoke:  # tiny shapes unless given
        a.heads = 4 if a.heads == 32 else a.heads
        a.head_dim, a.hidden, a.intermediate, a.vocab = 16, 64, 128, 256
        a.layers = min(a.layers, 2)
        a.reps, a.warmup = a.reps or 1, 0
        a.loss_chunk = min(a.loss_chunk, 48)
    a.kv_heads = a.kv_heads or a.heads
    a.sdpa_backend = a.sdpa_backend or ("cudnn" if cuda else "auto")
    a.ec_backend = a.ec_backend or ("cudnn" if cuda else "math")
    if "step" in a.parts and a.hidden % a.heads:
        p.error(f"--hidden {a.hidden} is not a multiple of --heads {a.heads}")
    known = set(ATTN_METHODS) | set(STEP_METHODS)
    for m in a.methods or []:
        if m not in known:
            p.error(f"unknown method {m!r}; attn: {' '.join(ATTN_METHODS)}; step: {' '.join(STEP_METHODS)}")
    return a


def part_args(a, part: str):
    """The options of one part: its default lengths, reps and methods."""
    b = argparse.Namespace(**vars(a))
    smoke = a.cpu_smoke
    b.seqs = a.seqs or ({"attn": [64, 128], "step": [128]} if smoke else
                        {"attn": [65536, 131072, 262144], "step": [65536, 131072]})[part]
    b.reps = a.reps or {"attn": 3, "step": 2}[part]
    allowed = ATTN_METHODS if part == "attn" else STEP_METHODS
    b.methods = [m for m in (a.methods or allowed) if m in allowed]
    if part == "step":
        b.head_dim = a.hidden // a.heads
    return b


def _worker(rank: int | None, a, init_method: str | None):
    """One rank: join the group (torchrun's env, or the file rendezvous of --cpu-smoke's spawn) and run the parts."""
    timeout = datetime.timedelta(seconds=a.pg_timeout)
    if a.cpu_smoke:
        torch.set_num_threads(1)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        dev = torch.device("cpu")
        kw = dict(init_method=init_method, rank=rank, world_size=2) if init_method else {}
        dist.init_process_group("gloo", timeout=timeout, **kw)
    else:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", timeout=timeout, device_id=dev)
    from torch.distributed.device_mesh import init_device_mesh

    env = Env(dev, dist.get_rank(), dist.get_world_size(),
              init_device_mesh(dev.type, (dist.get_world_size(),), mesh_dim_names=("cp",)))
    out_dir = a.out_dir
    files = {part: os.path.join(out_dir, f"peers_{part}.jsonl") for part in ("attn", "step")}
    run_id = datetime.datetime.now().isoformat(timespec="seconds")

    def write(part: str, row: dict):
        if env.rank == 0:
            line = json.dumps(dict(row, run=run_id))
            print(line, flush=True)
            with open(files[part], "a") as f:
                f.write(line + "\n")

    info = dict(kind="env", world=env.world, device=str(dev), torch=torch.__version__, argv=sys.argv[1:])
    if env.cuda:
        info.update(gpu=torch.cuda.get_device_name(dev), cudnn=torch.backends.cudnn.version())
    for mod in ("transformers", "deepspeed", "liger_kernel", "easy_context"):
        try:
            info[mod] = getattr(__import__(mod), "__version__", "installed")
        except Exception as e:  # noqa: BLE001
            info[mod] = f"unavailable: {e!r}"[:160]
    try:
        for part in a.parts:
            b = part_args(a, part)
            write(part, dict(info, part=part, methods=b.methods, seqs=b.seqs))
            rows = run_attn(env, b, write) if part == "attn" else run_step(env, b, write)
            if env.rank == 0:
                print("\n" + (attn_table(rows) if part == "attn" else step_table(rows)) + "\n", flush=True)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv=None):
    a = parse_args(argv)
    if a.out_dir is None:
        a.out_dir = os.environ.get("OUT") or (tempfile.mkdtemp(prefix="peers_smoke_") if a.cpu_smoke else
                                              os.path.join(BENCH, "results"))
    os.makedirs(a.out_dir, exist_ok=True)
    if a.cpu_smoke and "RANK" not in os.environ:  # not under torchrun: start the 2 gloo ranks here
        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(_worker, args=(a, f"file://{tmp}/rendezvous"), nprocs=2, start_method="spawn")
    else:
        _worker(None, a, None)
    print(f"rows in {a.out_dir}/peers_{{attn,step}}.jsonl", flush=True)


if __name__ == "__main__":
    main()
