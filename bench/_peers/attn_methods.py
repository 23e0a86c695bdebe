"""bench/peers.py attn: one context manager per method, each yielding a :class:`Case` (its forward, forward +
backward, and this rank's slice of the full sequence in its layout)."""
from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from .common import (
    ATTN_METHODS,
    EC_ALGOS,
    TORCH_CP,
    Env,
    deepspeed_group,
    ec_options,
    import_peer,
    need_cuda,
    sdpa_backend,
)


class Case(NamedTuple):
    """One method's attention ready to run: fwd() -> out; fwdbwd() -> {out, dq, dk, dv}, each (B, S_local, heads, D);
    local(x) -> this rank's slice of a full-sequence (B, S, ...) tensor in the method's layout; info: what the row
    should say about how it ran (filled as it runs)."""
    fwd: Callable
    fwdbwd: Callable
    local: Callable
    info: dict


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


def sdpa_case(q, k, v, dout, scale: float, backend: str, local: Callable) -> Case:
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
    yield sdpa_case(q, k, v, do, scale, a.sdpa_backend, lambda x: x)


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
            yield sdpa_case(q, k, v, do, scale, backend, local)
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
