"""Attention speed on one GPU: kernel backends, and each algorithm's per-rank schedule for W ranks.

    PYTHONUNBUFFERED=1 python bench/attention.py [--seqs 16384 65536 262144] [--worlds 2 4 8]

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

import torch

sys.path.insert(0, os.path.dirname(__file__))
from sim import NullComm  # noqa: E402

from easy_context.attention import dist_flash, zigzag_ring  # noqa: E402
from easy_context.attention.kernels import KERNELS, get_kernel, split_causal  # noqa: E402

# "cudnn" is the plain single call (the baseline); "cudnn_split" the three-call causal forward of
# kernels.split_causal (opt-in via EASY_CONTEXT_SPLIT_CAUSAL); the rings use get_kernel("cudnn").
SINGLE = {"cudnn": lambda: KERNELS["cudnn"], "cudnn_split": lambda: split_causal(KERNELS["cudnn"], 1),
          "flash": lambda: KERNELS["flash"]}


def timed(fn, reps):
    fn()
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


def schedule(algo, rank, w, kern, q, k, v, dout, scale, reps):
    comm = NullComm(rank, w)
    if algo == "dist_flash_attn":
        f = lambda: dist_flash.dist_flash_forward(comm, q, k, v, scale, kern, None)  # noqa: E731
        b = lambda o, l: dist_flash.dist_flash_backward(comm, dout, q, k, v, o, l, scale, kern, None)  # noqa: E731
    else:
        f = lambda: zigzag_ring.ring_forward(comm, q, k, v, True, scale, kern)  # noqa: E731
        b = lambda o, l: zigzag_ring.ring_backward(comm, dout, q, k, v, o, l, True, scale, kern)  # noqa: E731
    o, l = f()
    o = o.transpose(1, 2).to(q.dtype)
    return timed(f, reps), timed(lambda: (f(), b(o, l)), reps)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seqs", type=int, nargs="+", default=[16384, 65536, 262144])
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--gqa-kv", type=int, default=8, help="kv heads of the extra GQA shape (at the middle length)")
    p.add_argument("--algos", nargs="+", default=["zigzag_ring_attn", "dist_flash_attn", "usp_attn"])
    p.add_argument("--singles", nargs="+", default=list(SINGLE), help="single-GPU kernels (first: the baseline)")
    p.add_argument("--no-gqa", action="store_true", help="skip the extra GQA shape")
    a = p.parse_args()
    dev = torch.device("cuda")
    d, rows = 128, []
    shapes = [(s, a.heads, a.heads) for s in a.seqs] + ([] if a.no_gqa else [(a.seqs[len(a.seqs) // 2], a.heads, a.gqa_kv)])
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    for s, h, hkv in shapes:
        reps = 3 if s <= 65536 else 1
        q, k, v, dout = make(1, s, h, hkv, d, dev)
        scale = 1 / math.sqrt(d)
        flops_f = 2 * s * s * h * d  # causal: half of 4*s*s*h*d
        base = None
        for backend in a.singles:
            tf, tfb = single(SINGLE[backend](), q, k, v, dout, scale, reps)
            base = base or (tf, tfb)
            rows.append(dict(S=s, H=h, KV=hkv, what=f"single {backend}", W=1, t_fwd=tf, t_fb=tfb,
                             tflops_fwd=flops_f / tf / 1e12, tflops_fb=3.5 * flops_f / tfb / 1e12,
                             eff_fwd=base[0] / tf, eff_fb=base[1] / tfb))
            print(rows[-1], flush=True)
        kern = get_kernel("cudnn", dev)
        for w in a.worlds:
            for algo in a.algos:
                if algo == "usp_attn":
                    ring, uly = 2, w // 2  # default mesh: Ulysses w/2 inside, ring of 2 across
                    if h % uly or (hkv % uly and uly % hkv):
                        continue
                    ql, kl, vl, dl = make(1, s // ring, h // uly, max(hkv // uly, 1), d, dev)
                    tf, tfb = schedule("zigzag_ring_attn", 0, ring, kern, ql, kl, vl, dl, scale, reps)
                else:
                    ql, kl, vl, dl = (x[:, : s // w].contiguous() for x in (q, k, v, dout))
                    rank = w - 1 if algo == "dist_flash_attn" else 0  # the busiest rank
                    tf, tfb = schedule(algo, rank, w, kern, ql, kl, vl, dl, scale, reps)
                rows.append(dict(S=s, H=h, KV=hkv, what=algo, W=w, t_fwd=tf, t_fb=tfb,
                                 tflops_fwd=flops_f / w / tf / 1e12, tflops_fb=3.5 * flops_f / w / tfb / 1e12,
                                 eff_fwd=base[0] / w / tf, eff_fb=base[1] / w / tfb))
                print(rows[-1], flush=True)
        del q, k, v, dout
        torch.cuda.empty_cache()
    print("\n| S | heads q/kv | what | W | fwd ms | fwd TFLOP/s | fwd eff | fwd+bwd ms | fwd+bwd TFLOP/s | fwd+bwd eff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['S'] // 1024}K | {r['H']}/{r['KV']} | {r['what']} | {r['W']} | {r['t_fwd'] * 1e3:.1f} | "
              f"{r['tflops_fwd']:.0f} | {r['eff_fwd']:.2f} | {r['t_fb'] * 1e3:.1f} | {r['tflops_fb']:.0f} | {r['eff_fb']:.2f} |")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "attention.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
