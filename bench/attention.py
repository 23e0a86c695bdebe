"""Attention speed on one GPU: kernel backends, and each algorithm's per-rank schedule for W ranks.

    PYTHONUNBUFFERED=1 python bench/attention.py [--seqs 16384 65536 262144] [--worlds 2 4 8]
    PYTHONUNBUFFERED=1 python bench/attention.py --backends cudnn fa4 --singles cudnn fa4 --worlds 2 4 \
        --algos zigzag_ring_attn dist_flash_attn ulysses_attn usp_attn [--packed 1024:65536]

``--backends``: the kernels the algorithms run (each row also gives its speed over the same algorithm on the first
backend: ``vs_first``). ``ulysses_attn``: a rank attends the whole sequence for heads / W of the heads (its all-to-alls
excluded like the ring's p2p). ``--packed MIN:MAX``: rows of documents log-uniform in that range (bench/packed_attn.py's
mix, in train.py's balanced order for zigzag), the per-rank time that of the busiest rank (every rank is timed),
TFLOP/s counting only pairs inside documents; ``vs_dense`` = that TFLOP/s over the same backend's dense single-GPU
causal TFLOP/s on the same tokens.

Per-rank schedules run the library's own forward/backward code for one rank with communication
replaced by local tensors (bench/sim.py NullComm): the time is that rank's kernel calls and merges.
Efficiency = (single-GPU causal cuDNN time over the full sequence / W) / per-rank time, i.e. the fraction
of a perfect W-way split of the fastest single-GPU kernel (same run, same device). Causal FLOPs = half
of full; fwd+bwd = 3.5x fwd. Prints markdown; writes $OUT/attention.json when OUT is set.
"""
import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from sim import NullComm  # noqa: E402

from easy_context.attention import dist_flash  # noqa: E402
from easy_context.attention.kernels import KERNELS, get_kernel, split_causal  # noqa: E402
from easy_context.attention.registry import shard_sequence  # noqa: E402
from easy_context.attention.ring import ring_backward, ring_forward  # noqa: E402

# "cudnn" is the plain single call (the baseline); "cudnn_split" the three-call causal forward of
# kernels.split_causal (opt-in via EASY_CONTEXT_SPLIT_CAUSAL); the rings use get_kernel("cudnn").
SINGLE = {"cudnn": lambda: KERNELS["cudnn"], "cudnn_split": lambda: split_causal(KERNELS["cudnn"], 1),
          "flash": lambda: KERNELS["flash"], "fa4": lambda: KERNELS["fa4"]}


def timed(fn, reps, dev=None):
    """Seconds per call of ``fn`` after one warm-up call: CUDA events on a GPU, wall time on ``dev`` = CPU."""
    fn()
    if dev is not None and dev.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1e3


def make(b, s, h, hkv, d, dev):
    g = torch.Generator(device=dev).manual_seed(0)
    mk = lambda n: torch.randn(b, s, n, d, device=dev, dtype=torch.bfloat16, generator=g)  # noqa: E731
    return mk(h), mk(hkv), mk(hkv), mk(h)


def single(kern, q, k, v, dout, scale, reps):
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    fwd = lambda: kern.forward(t(q), t(k), t(v), True, scale)  # noqa: E731
    o, l = fwd()
    t_f = timed(fwd, reps)
    t_fb = timed(lambda: (fwd(), kern.backward(t(dout), t(q), t(k), t(v), o, l, True, scale)), reps)
    return t_f, t_fb


def schedule(algo, rank, w, kern, q, k, v, dout, scale, reps, docs=None):
    comm = NullComm(rank, w)
    if algo == "dist_flash_attn":
        f = lambda: dist_flash.dist_flash_forward(comm, q, k, v, scale, kern, None)  # noqa: E731
        b = lambda o, l: dist_flash.dist_flash_backward(comm, dout, q, k, v, o, l, scale, kern, None)  # noqa: E731
    else:
        f = lambda: ring_forward(comm, q, k, v, True, scale, kern, docs)  # noqa: E731
        b = lambda o, l: ring_backward(comm, dout, q, k, v, o, l, True, scale, kern, docs)  # noqa: E731
    o, l = f()
    o = o.transpose(1, 2).to(q.dtype)
    return timed(f, reps), timed(lambda: (f(), b(o, l)), reps)


def per_rank(algo, w, kern, s, h, hkv, d, dev, scale, reps, q, k, v, dout, docs):
    """The busiest rank's (fwd, fwd+bwd) seconds of ``algo`` on ``w`` ranks, communication excluded; None where the
    algorithm does not take the case (heads that do not divide, documents for dist_flash)."""
    from easy_context.attention.head_parallel import ulysses_kv_replication

    if algo in ("ulysses_attn", "usp_attn"):
        ring = 1 if algo == "ulysses_attn" else 2  # usp's default mesh: Ulysses w/2 inside, a ring of 2 across
        uly = w // ring
        try:
            rep = ulysses_kv_replication(h, hkv, uly)
        except ValueError:
            return None
        ql, kl, vl, dl = make(1, s // ring, h // uly, hkv * rep // uly, d, dev)
        ranks = range(ring) if docs is not None else [0]  # a ring position's work differs only with documents
        times = [schedule("zigzag_ring_attn", r, ring, kern, ql, kl, vl, dl, scale, reps, docs) for r in ranks]
    else:
        if algo == "dist_flash_attn" and docs is not None:
            return None
        ranks = range(w) if docs is not None else [w - 1 if algo == "dist_flash_attn" else 0]  # the busiest rank
        times = []
        for r in ranks:
            ql, kl, vl, dl = (shard_sequence(algo, x, r, w).contiguous() for x in (q, k, v, dout))
            times.append(schedule(algo, r, w, kern, ql, kl, vl, dl, scale, reps, docs))
    return max(t[0] for t in times), max(t[1] for t in times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seqs", type=int, nargs="+", default=[16384, 65536, 262144])
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--gqa-kv", type=int, default=8, help="kv heads of the extra GQA shape (at the middle length)")
    p.add_argument("--algos", nargs="+", default=["zigzag_ring_attn", "dist_flash_attn", "usp_attn"])
    p.add_argument("--singles", nargs="+", default=["cudnn", "cudnn_split", "flash"],
                   help="single-GPU kernels (first: the baseline)")
    p.add_argument("--backends", nargs="+", default=["cudnn"], help="kernels the algorithms run (first: the base of "
                   "vs_first)")
    p.add_argument("--packed", metavar="MIN:MAX", help="rows of documents log-uniform in MIN..MAX tokens")
    p.add_argument("--no-gqa", action="store_true", help="skip the extra GQA shape")
    a = p.parse_args()
    dev = torch.device("cuda")
    d, rows = 128, []
    gqa = [] if a.no_gqa else [(a.seqs[len(a.seqs) // 2], a.heads, a.gqa_kv)]
    shapes = [(s, a.heads, a.heads) for s in a.seqs] + gqa
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    for s, h, hkv in shapes:
        reps = 3 if s <= 65536 else 1
        q, k, v, dout = make(1, s, h, hkv, d, dev)
        scale = 1 / math.sqrt(d)
        flops_f = 2 * s * s * h * d  # causal: half of 4*s*s*h*d
        docs, work_f = None, flops_f
        if a.packed:
            from packed_attn import doc_mix, ordered, pairs  # bench/packed_attn.py

            from easy_context.attention.documents import normalize

            lo, hi = map(int, a.packed.split(":"))
            bounds = doc_mix(s, lo, hi, seed=2)
            work_f = 4 * pairs(bounds) * h * d  # only the pairs inside documents
        base, dense = None, {}
        for backend in a.singles:
            tf, tfb = single(SINGLE[backend](), q, k, v, dout, scale, reps)
            base = base or (tf, tfb)
            dense[backend] = 3.5 * flops_f / tfb / 1e12
            rows.append(dict(S=s, H=h, KV=hkv, what=f"single {backend}", W=1, t_fwd=tf, t_fb=tfb,
                             tflops_fwd=flops_f / tf / 1e12, tflops_fb=3.5 * flops_f / tfb / 1e12,
                             eff_fwd=base[0] / tf, eff_fb=base[1] / tfb))
            print(rows[-1], flush=True)
        for w in a.worlds:
            for algo in a.algos:
                first = None
                for backend in a.backends:
                    kern = get_kernel(backend, dev, torch.bfloat16, d)
                    if a.packed:
                        mix = ordered(algo, bounds, w) if algo == "zigzag_ring_attn" else bounds
                        docs = normalize(mix, 1, s, algo)
                    got = per_rank(algo, w, kern, s, h, hkv, d, dev, scale, reps, q, k, v, dout, docs)
                    if got is None:
                        continue
                    tf, tfb = got
                    first = first or tfb
                    row = dict(S=s, H=h, KV=hkv, what=algo, backend=backend, W=w, t_fwd=tf, t_fb=tfb,
                               tflops_fwd=work_f / w / tf / 1e12, tflops_fb=3.5 * work_f / w / tfb / 1e12,
                               eff_fwd=base[0] / w / tf, eff_fb=base[1] / w / tfb, vs_first=first / tfb)
                    if a.packed:  # eff (against dense work) means nothing here: vs_dense says it per token pair
                        row.update(packed=a.packed, docs=len(bounds) - 1, eff_fwd=None, eff_fb=None)
                        row["vs_dense"] = row["tflops_fb"] / dense[backend] if backend in dense else None
                    rows.append(row)
                    print(rows[-1], flush=True)
        del q, k, v, dout
        torch.cuda.empty_cache()
    print("\n| S | heads q/kv | what | backend | W | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | fwd+bwd eff "
          "| vs first backend | packed vs dense |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        vs = f"{r['vs_first']:.3f}" if "vs_first" in r else "—"
        vd = f"{r['vs_dense']:.3f}" if r.get("vs_dense") else "—"
        print(f"| {r['S'] // 1024}K | {r['H']}/{r['KV']} | {r['what']} | {r.get('backend', '')} | {r['W']} | "
              f"{r['t_fwd'] * 1e3:.1f} | {r['tflops_fwd']:.0f} | {r['t_fb'] * 1e3:.1f} | {r['tflops_fb']:.0f} | "
              f"{'—' if r['eff_fb'] is None else format(r['eff_fb'], '.3f')} | {vs} | {vd} |")
    if os.environ.get("OUT"):
        name = "attention_packed.json" if a.packed else "attention.json"
        with open(os.path.join(os.environ["OUT"], name), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
