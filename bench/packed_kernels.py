"""Which fused kernel serves document-masked attention best on one GPU: causal attention within the documents of
one packed row (the diagonal block every algorithm computes), fwd+bwd, bf16, 32 heads, d=128.

    PYTHONUNBUFFERED=1 python bench/packed_kernels.py [--seqs 131072 524288]

Methods (each on the same rows, in the same run):
  loop_cudnn / loop_flash  one call of the cuDNN / FA2 op per document (what easy_context's block planner issues)
  varlen_flash             one FA2 varlen call for all documents (aten._flash_attention_forward with cum_seq_q/k)
  varlen_cudnn             one cuDNN ragged call (aten._cudnn_attention_forward with cum_seq_q/k), if this torch has it
  flex                     torch.compile'd flex_attention with a document-causal block mask
  dense_cudnn              causal over the whole row, no documents (the baseline: same tokens, all pairs)
Mixes: documents log-uniform in 1K-64K tokens, and short SFT-like examples (128-2K). ``cold``: the first pass on a
new mix after a warm-up on another mix of the same length (cuDNN builds a plan per new shape; flex builds a block
mask); ``warm``: median of 3 further passes. TFLOP/s count only the pairs inside documents (dense: all causal pairs).
Writes $OUT/packed_kernels.jsonl.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from packed_attn import doc_mix, pairs  # noqa: E402

from easy_context.attention.kernels import KERNELS  # noqa: E402

H, D = 32, 128
SCALE = D ** -0.5


def t(x):
    return x.transpose(1, 2)


def loop(kernel):
    kern = KERNELS[kernel]

    def run(q, k, v, do, bounds):
        for a, b in zip(bounds[:-1], bounds[1:]):
            sl = (slice(None), slice(None), slice(a, b))
            o, l = kern.forward(t(q)[sl], t(k)[sl], t(v)[sl], True, SCALE)
            kern.backward(t(do)[sl], t(q)[sl], t(k)[sl], t(v)[sl], o, l, True, SCALE)
    return run


def varlen_flash(q, k, v, do, bounds):
    cu = torch.tensor(bounds, dtype=torch.int32, device=q.device)
    m = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    q3, k3, v3, do3 = (x[0] for x in (q, k, v, do))  # (T, H, D)
    out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(q3, k3, v3, cu, cu, m, m, 0.0, True, False,
                                                                      scale=SCALE)
    torch.ops.aten._flash_attention_backward(do3, q3, k3, v3, out, lse, cu, cu, m, m, 0.0, True, rng, unused,
                                             scale=SCALE)


def varlen_cudnn(q, k, v, do, bounds):
    cu = torch.tensor(bounds, dtype=torch.int32, device=q.device)
    m = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    q3, k3, v3, do3 = (x[0] for x in (q, k, v, do))
    res = torch.ops.aten._cudnn_attention_forward(q3, k3, v3, None, cu, cu, m, m, True, 0.0, True, False, scale=SCALE)
    torch.ops.aten._scaled_dot_product_cudnn_attention_backward(do3, q3, k3, v3, res[0], res[1], res[6], res[7],
                                                                None, cu, cu, m, m, 0.0, True, scale=SCALE)


_FLEX = {}


def flex(q, k, v, do, bounds):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention)
    seq = bounds[-1]
    doc = torch.zeros(seq, dtype=torch.int32, device=q.device)
    doc[torch.tensor(bounds[1:-1], device=q.device)] = 1
    doc = doc.cumsum(0)

    def mask(b, h, qi, ki):
        return (doc[qi] == doc[ki]) & (ki <= qi)
    # _compile: the block mask from the mask function block by block (uncompiled it materialises S x S: 128 GiB at
    # 128K, the out-of-memory of RESULTS 12)
    bm = create_block_mask(mask, None, None, seq, seq, device=q.device, _compile=True)
    qq, kk, vv = (t(x).detach().requires_grad_() for x in (q, k, v))
    out = _FLEX["fn"](qq, kk, vv, block_mask=bm, scale=SCALE)
    out.backward(t(do))


def dense(q, k, v, do, bounds):
    loop("cudnn")(q, k, v, do, [0, bounds[-1]])


METHODS = {"loop_cudnn": loop("cudnn"), "loop_flash": loop("flash"), "varlen_flash": varlen_flash,
           "varlen_cudnn": varlen_cudnn, "flex": flex, "dense_cudnn": dense}


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seqs", type=int, nargs="+", default=[131072, 524288])
    # varlen_cudnn hit an illegal memory access on torch 2.11 (RESULTS 9c), which poisons the CUDA context and ended
    # the run: name it explicitly, and last, to try it
    p.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "varlen_cudnn"])
    p.add_argument("--mixes", nargs="+", default=["1024:65536", "128:2048"])
    p.add_argument("--short-mix-max", type=int, default=131072, help="mixes after the first only up to this length")
    p.add_argument("--flex-max", type=int, default=131072, help="flex only up to this length (compile per length)")
    a = p.parse_args()
    out_path = os.path.join(os.environ.get("OUT", "bench/results"), "packed_kernels.jsonl")
    for seq in a.seqs:
        g = torch.Generator(device="cuda").manual_seed(seq)
        q, k, v, do = (torch.randn(1, seq, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
        for mix in a.mixes:
            lo, hi = map(int, mix.split(":"))
            warm_mix, bounds = doc_mix(seq, lo, hi, seed=1), doc_mix(seq, lo, hi, seed=2)
            if mix != a.mixes[0] and seq > a.short_mix_max:
                continue  # hundreds of short documents at 512K: the per-shape plans alone would take minutes
            for name in a.methods:
                if (name == "dense_cudnn" and mix != a.mixes[0]) or (name == "flex" and seq > a.flex_max):
                    continue
                fn = METHODS[name]
                work = pairs([0, seq]) if name == "dense_cudnn" else pairs(bounds)
                try:
                    fn(q, k, v, do, warm_mix)
                    cold = timed(lambda: fn(q, k, v, do, bounds))
                    reps = 1 if name == "dense_cudnn" else 3  # one shape: the warm-up already warmed it
                    warm = sorted(timed(lambda: fn(q, k, v, do, bounds)) for _ in range(reps))[reps // 2]
                    flops = 3.5 * 4 * work * H * D
                    row = dict(method=name, S=seq, mix=mix, docs=len(bounds) - 1, cold_s=round(cold, 4),
                               warm_s=round(warm, 4), TFLOPs=round(flops / warm / 1e12, 1),
                               cold_TFLOPs=round(flops / cold / 1e12, 1))
                except Exception as e:  # noqa: BLE001 - record and go on
                    row = dict(method=name, S=seq, mix=mix, error=repr(e)[:240])
                print(json.dumps(row), flush=True)
                with open(out_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                torch.cuda.empty_cache()
        q = k = v = do = None  # free the tensors (the closures above read these names)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
