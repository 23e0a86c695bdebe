"""Sliding-window attention under sequence parallelism on one GPU: a Gemma-3-like layer's per-rank time in a simulated
zigzag ring of W ranks, windowed against full causal, and against FlashAttention-4's own windowed call on the whole
sequence divided by W (a perfect W-way split of the single-GPU kernel).

    PYTHONUNBUFFERED=1 python bench/window_attn.py                       # one H200: 128K, W=4, window 1024, fa4
    PYTHONUNBUFFERED=1 python bench/window_attn.py --seq 131072 --world 4 --window 1024 --heads 16 --kv-heads 8 \
        --head-dim 256 --backend fa4 --reps 3
    python bench/window_attn.py --smoke                                  # CPU, math kernel, tiny: the script runs

The layer: Gemma 3 12B's attention (16 query heads, 8 kv heads, head dim 256, sliding window 1024; its local layers).
Per-rank schedules run the library's own ring_forward/ring_backward for each rank with communication replaced by
local tensors (bench/sim.py NullComm): the time is that rank's kernel calls and merges (its p2p excluded); blocks
outside the window cost no call (``stats``: ``skipped_blocks``). Every rank is timed; the row gives the busiest.
Prints one JSON line per measurement (forward, forward+backward seconds) and a summary line; also writes them to
$OUT/window_attn.jsonl when OUT is set.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from attention import timed  # noqa: E402  (bench/attention.py)
from sim import NullComm  # noqa: E402

from easy_context.attention.kernels import get_kernel  # noqa: E402
from easy_context.attention.registry import shard_sequence  # noqa: E402
from easy_context.attention.ring import ring_backward, ring_forward  # noqa: E402


def rank_time(rank, w, kern, q, k, v, dout, scale, window, reps, dev):
    """(forward s, forward+backward s, stats) of ``rank``'s zigzag schedule (its shards of q/k/v/dout)."""
    comm = NullComm(rank, w)
    ql, kl, vl, dl = (shard_sequence("zigzag_ring_attn", x, rank, w) for x in (q, k, v, dout))
    stats = {}
    ring_forward(comm, ql, kl, vl, True, scale, kern, window=window, stats=stats)

    def f():
        return ring_forward(comm, ql, kl, vl, True, scale, kern, window=window)

    o, l = f()
    o = o.transpose(1, 2).to(q.dtype)
    t_f = timed(f, reps, dev)
    t_fb = timed(lambda: (f(), ring_backward(comm, dl, ql, kl, vl, o, l, True, scale, kern, window=window)), reps, dev)
    return t_f, t_fb, stats


def single(kern, q, k, v, dout, scale, window, reps, dev):
    """The kernel's own call on the whole sequence: causal, or windowed as one band (0, window - 1)."""
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    mods = {} if window is None else {"band": (0, window - 1)}
    causal = window is None

    def fwd():
        return kern.forward(t(q), t(k), t(v), causal, scale, **mods)

    o, l = fwd()
    t_f = timed(fwd, reps, dev)
    t_fb = timed(lambda: (fwd(), kern.backward(t(dout), t(q), t(k), t(v), o, l, causal, scale, **mods)), reps, dev)
    return t_f, t_fb


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=131072)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=256)
    ap.add_argument("--backend", default="fa4")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="CPU, math kernel, a tiny layer: checks the script runs")
    a = ap.parse_args(argv)
    if a.smoke:
        a.seq, a.world, a.window, a.heads, a.kv_heads, a.head_dim, a.backend, a.reps = 256, 4, 16, 2, 1, 16, "math", 1
    dev = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v, dout = (torch.randn(1, a.seq, h, a.head_dim, device=dev, dtype=dtype, generator=g)
                     for h in (a.heads, a.kv_heads, a.kv_heads, a.heads))
    scale = a.head_dim ** -0.5
    kern = get_kernel(a.backend, dev, dtype, a.head_dim, {"window"})
    rows = []

    def emit(row):
        row.update(seq=a.seq, world=a.world, window=a.window, heads=a.heads, kv_heads=a.kv_heads,
                   head_dim=a.head_dim, backend=kern.name, device=torch.cuda.get_device_name(dev) if dev.type ==
                   "cuda" else "cpu")
        rows.append(row)
        print(json.dumps(row), flush=True)

    for label, window in (("windowed", a.window), ("full_causal", None)):
        per = [rank_time(r, a.world, kern, q, k, v, dout, scale, window, a.reps, dev)
               for r in (range(a.world) if window is not None else (0,))]  # full causal: every rank the same work
        busiest = max(range(len(per)), key=lambda i: per[i][1])
        emit(dict(what=f"ring_per_rank_{label}", rank=busiest, fwd_s=per[busiest][0], fwd_bwd_s=per[busiest][1],
                  per_rank_fwd_bwd_s=[p[1] for p in per], skipped_blocks=[p[2].get("skipped_blocks") for p in per],
                  forward_calls=[p[2].get("forward_calls") for p in per]))
    for label, window in (("windowed", a.window), ("full_causal", None)):
        t_f, t_fb = single(kern, q, k, v, dout, scale, window, a.reps, dev)
        emit(dict(what=f"single_{label}_over_world", fwd_s=t_f / a.world, fwd_bwd_s=t_fb / a.world,
                  whole_fwd_bwd_s=t_fb))
    by = {r["what"]: r["fwd_bwd_s"] for r in rows}
    emit(dict(what="summary",
              windowed_over_full_causal=by["ring_per_rank_windowed"] / by["ring_per_rank_full_causal"],
              windowed_ring_over_single_windowed_split=by["ring_per_rank_windowed"] /
              by["single_windowed_over_world"]))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "window_attn.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


if __name__ == "__main__":
    main()
