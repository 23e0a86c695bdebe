"""bench/peers.py step: the model, the batch, the one-GPU reference and the verdict; the runner that times and
reports every method (:mod:`.step_methods`) at every length."""
from __future__ import annotations

import contextlib
import statistics
import time
import traceback

import torch
import torch.distributed as dist

from .common import DTYPES, EC_ALGOS, LOSS_RTOL, STEP_METHODS, Env, Skip, gather_rows, sdpa_backend
from .step_methods import ds_feature_list, ds_loss_kind, step_method

# ---------------------------------------------------------------- step: model, batch, gradient norm


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
    from packed_attn import doc_mix  # bench/packed_attn.py (bench/ is on sys.path: peers.py)

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


def q0_gnorm(model, env: Env | None) -> float:
    """||sum over ranks of the q_proj gradient of layer 0|| / W (or the local norm when env is None)."""
    w = model.model.layers[0].self_attn.q_proj.weight
    g = torch.zeros_like(w, dtype=torch.float32) if w.grad is None else w.grad.float()
    if env is None:
        return float(g.norm())
    dist.all_reduce(g)
    return float(g.norm() / env.world)


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
