"""bench/peers.py attn: the inputs, the exact reference, the SDPA yardstick and the verdict; the runner that checks,
times and reports every method (:mod:`.attn_methods`) at every length."""
from __future__ import annotations

import math
import os
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _profile import profiled  # bench/_profile.py

from .attn_methods import attn_case
from .common import ATTN_METHODS, DTYPES, EC_ALGOS, FP32_ERR_FLOOR, Env, Skip, gather_rows, sdpa_backend

# ---------------------------------------------------------------- attention: inputs, reference, yardstick

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


# ---------------------------------------------------------------- attention: runner

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
