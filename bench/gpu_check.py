"""GPU numerics (issue: core, item 5). Run on a CUDA machine from the repo root:

    PYTHONUNBUFFERED=1 python bench/gpu_check.py

1. Each kernel backend's forward and backward (GQA, causal and not) in bf16 vs float64, plus the ring
   property: backward of two key blocks called with the *merged* out/lse equals the full backward.
2. bf16 zigzag ring / dist-flash output and gradients vs float64 for W = 1, 2, 4, 8 ranks, simulated in
   one process (bench/sim.py runs each rank's exact schedule in a thread). Goal: error flat in W.
Prints markdown tables; writes $OUT/gpu_check.json when OUT is set.
"""
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from sim import simulate  # noqa: E402

from easy_context.attention.kernels import get_kernel, local_attn_func  # noqa: E402
from easy_context.attention.merge import merge_into, new_accumulators  # noqa: E402


def ref_attn(q, k, v, causal, scale):
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        n = q.shape[1]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def reference(q, k, v, dout, causal, scale):
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out = ref_attn(*leaves, causal, scale)
    out.backward(dout.double())
    return [out.detach()] + [x.grad for x in leaves]


def inputs(seed, b, s, h, hkv, d, dev):
    """Random bf16 q, k, v, dout in the flash layout."""
    torch.manual_seed(seed)
    return [torch.randn(b, s, n, d, device=dev, dtype=torch.bfloat16) for n in (h, hkv, hkv, h)]


def kernel_table(dev, res):
    rows = []
    b, s, h, hkv, d = 2, 2048, 8, 2, 128
    scale = 1 / math.sqrt(d)
    q, k, v, dout = inputs(0, b, s, h, hkv, d, dev)
    for causal in (True, False):
        ref = reference(q, k, v, dout, causal, scale)
        for backend in ("cudnn", "flash", "flash_attn", "math"):
            try:
                leaves = [x.clone().requires_grad_() for x in (q, k, v)]
                out = local_attn_func(*leaves, causal, scale, backend=backend)
                out.backward(dout)
                errs = [rel(out, ref[0])] + [rel(x.grad, r) for x, r in zip(leaves, ref[1:])]
                # ring property: two key blocks, merged forward, per-block backward with the final out/lse
                kern = get_kernel(backend, dev)
                qh, kh, vh, doh = (x.transpose(1, 2) for x in (q, k, v, dout))
                acc_o, acc_l = new_accumulators(qh)
                blocks = [slice(0, s // 2), slice(s // 2, s)]
                for sl in blocks:
                    o, l = kern.forward(qh, kh[:, :, sl], vh[:, :, sl], False, scale)
                    merge_into(acc_o, acc_l, o, l)
                ref_nc = reference(q, k, v, dout, False, scale) if causal else ref
                o_b = acc_o.to(q.dtype)
                dq = torch.zeros_like(qh, dtype=torch.float32)
                dks, dvs = [], []
                for sl in blocks:
                    g = kern.backward(doh, qh, kh[:, :, sl], vh[:, :, sl], o_b, acc_l, False, scale)
                    dq += g[0]
                    dks.append(g[1])
                    dvs.append(g[2])
                ring = [rel(acc_o.transpose(1, 2), ref_nc[0]), rel(dq.transpose(1, 2), ref_nc[1]),
                        rel(torch.cat(dks, 2).transpose(1, 2), ref_nc[2]),
                        rel(torch.cat(dvs, 2).transpose(1, 2), ref_nc[3])]
                rows.append(dict(backend=backend, causal=causal, out=errs[0], dq=errs[1], dk=errs[2], dv=errs[3],
                                 ring_max=max(ring)))
            except Exception as e:  # noqa: BLE001 - report, keep going
                rows.append(dict(backend=backend, causal=causal, error=repr(e)[:200]))
    print(f"\n## Kernel backends vs float64 (bf16, b={b} s={s} h={h} kv={hkv} d={d}; relative error)")
    print("| backend | causal | out | dq | dk | dv | ring: 2 blocks, final out/lse (max) |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['backend']} | {r['causal']} | unavailable: {r['error']} | | | | |")
        else:
            print(f"| {r['backend']} | {r['causal']} | {r['out']:.2e} | {r['dq']:.2e} | {r['dk']:.2e} | "
                  f"{r['dv']:.2e} | {r['ring_max']:.2e} |")
    res["kernels"] = rows


def ring_table(dev, res):
    b, s, h, hkv, d = 1, 8192, 8, 8, 128
    scale = 1 / math.sqrt(d)
    q, k, v, dout = inputs(1, b, s, h, hkv, d, dev)
    ref = reference(q, k, v, dout, True, scale)
    rows = []
    for backend in ("cudnn", "flash"):
        kern = get_kernel(backend, dev)
        for algo in ("zigzag_ring_attn", "dist_flash_attn"):
            for w in (1, 2, 4, 8):
                got = simulate(algo, q, k, v, dout, w, kern, scale)
                errs = {n: rel(g, r) for n, g, r in zip(("out", "dq", "dk", "dv"), got, ref)}
                rows.append(dict(backend=backend, algo=algo, W=w, **errs))
    print(f"\n## bf16 ring vs float64, causal, s={s} h={h} d={d} (relative error; W ranks simulated in one process)")
    print("| backend | algo | W | out | dq | dk | dv |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['algo']} | {r['W']} | {r['out']:.2e} | {r['dq']:.2e} | {r['dk']:.2e} | "
              f"{r['dv']:.2e} |")
    res["ring"] = rows


if __name__ == "__main__":
    dev = torch.device("cuda")
    print(torch.__version__, torch.cuda.get_device_name(), "cudnn", torch.backends.cudnn.version())
    res = {}
    kernel_table(dev, res)
    if "--kernels-only" not in sys.argv:
        ring_table(dev, res)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_check.json"), "w") as f:
            json.dump(res, f, indent=1)
