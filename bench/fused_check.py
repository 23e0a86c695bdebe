"""Fused RMSNorm / SwiGLU / RoPE on the GPU: accuracy of the compiled kernels and their time vs the plain
transformers code, in the same run.

    PYTHONPATH=$PWD PYTHONUNBUFFERED=1 python bench/fused_check.py --seq 131072

Accuracy (at --check-seq tokens): relative error ||x - ref|| / ||ref|| of each output (rope: q and k) and the input
gradients
of (a) the plain transformers code in bf16 and (b) the fused op (torch.compile'd on CUDA), both against the plain
code in float64 on the same bf16 inputs. Time (at --seq tokens, Llama-2-7B widths): forward and forward+backward,
median of --reps runs; speed-up = plain / fused. One JSON line per op.
"""
import argparse
import json
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from easy_context.memory.ops import low_memory_rms_norm, rope, silu_mul

HIDDEN, INTERMEDIATE, HEADS, HEAD_DIM = 4096, 11008, 32, 128
DEVICE = "cuda"


def make_inputs(seq, dtype=torch.bfloat16):
    device = DEVICE
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    angles = torch.arange(seq, dtype=torch.float64)[:, None] / 10000 ** (torch.arange(HEAD_DIM) % (HEAD_DIM // 2) / 64)
    return {
        "rmsnorm": (randn(1, seq, HIDDEN, scale=3.0), randn(HIDDEN, scale=0.1) + 1),
        "swiglu": (randn(1, seq, INTERMEDIATE, scale=2.0), randn(1, seq, INTERMEDIATE)),
        # q/k as transformers makes them: (batch, heads, seq, head_dim) views of (batch, seq, heads, head_dim)
        "rope": (randn(1, seq, HEADS, HEAD_DIM).transpose(1, 2), randn(1, seq, HEADS, HEAD_DIM).transpose(1, 2),
                 angles.cos()[None].to(device=device, dtype=dtype), angles.sin()[None].to(device=device, dtype=dtype)),
    }


def plain_norm(x, w):
    """transformers' LlamaRMSNorm.forward with ``w`` (a differentiable input here) as its weight."""
    return LlamaRMSNorm.forward(SimpleNamespace(weight=w, variance_epsilon=1e-6), x)


def _fused_rope(q, k, cos, sin, unsqueeze_dim=1):
    """apply_rotary_pos_emb through easy_context.memory.ops.rope (what enable_fused_rope installs)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return rope(q, cos, sin), rope(k, cos, sin)


OPS = {  # name: (plain, fused, number of differentiable inputs)
    "rmsnorm": (plain_norm, lambda x, w: low_memory_rms_norm(x, w, 1e-6), 2),
    "swiglu": (lambda g, u: F.silu(g) * u, silu_mul, 2),
    "rope": (apply_rotary_pos_emb, _fused_rope, 2),
}


def run(fn, inputs, n_grad, dout=None):
    """Outputs as a tuple, and the input gradients for ``dout`` (a tuple like the outputs; None: forward only)."""
    leaves = [t.detach().requires_grad_(i < n_grad) for i, t in enumerate(inputs)]
    out = fn(*leaves)
    out = out if isinstance(out, tuple) else (out,)
    if dout is None:
        return out, []
    torch.autograd.backward(out, dout)
    return tuple(o.detach() for o in out), [t.grad for t in leaves[:n_grad]]


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def rel_all(actual, expected):
    return [round(rel(a, b), 6) for a, b in zip(actual, expected)]


def accuracy(name, seq):
    plain, fused, n_grad = OPS[name]
    inputs = make_inputs(seq)[name]
    dout = tuple(torch.randn_like(o) for o in run(plain, inputs, n_grad)[0])
    ref_out, ref_grads = run(plain, [t.double() for t in inputs], n_grad, tuple(d.double() for d in dout))
    row = {}
    for what, fn in (("plain_bf16", plain), ("fused", fused)):
        out, grads = run(fn, inputs, n_grad, dout)
        row[what] = rel_all(out, ref_out) + rel_all(grads, ref_grads)
    return row


def timed(fn, inputs, n_grad, dout, reps):
    if DEVICE != "cuda":
        return float("nan")
    times = []
    for _ in range(reps + 1):  # the first call compiles / warms up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run(fn, inputs, n_grad, dout)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times[1:])[reps // 2]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=131072)
    p.add_argument("--check-seq", type=int, default=16384)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--cpu-smoke", action="store_true", help="checks the script only (eager, no timing)")
    a = p.parse_args()
    global DEVICE
    DEVICE = "cpu" if a.cpu_smoke else "cuda"
    for name, (plain, fused, n_grad) in OPS.items():
        row = dict(op=name, check_seq=a.check_seq, rel_err_out_then_grads=accuracy(name, a.check_seq), seq=a.seq)
        inputs = make_inputs(a.seq)[name]
        dout = tuple(torch.randn_like(o) for o in run(plain, inputs, n_grad)[0])
        for what, fn in (("plain", plain), ("fused", fused)):
            row[f"{what}_fwd_ms"] = round(timed(fn, inputs, n_grad, None, a.reps), 2)
            row[f"{what}_fwd_bwd_ms"] = round(timed(fn, inputs, n_grad, dout, a.reps), 2)
        row["speedup_fwd"] = round(row["plain_fwd_ms"] / row["fused_fwd_ms"], 2)
        row["speedup_fwd_bwd"] = round(row["plain_fwd_bwd_ms"] / row["fused_fwd_bwd_ms"], 2)
        print(json.dumps(row), flush=True)
        del inputs, dout
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
