"""Pick a parallel mode and memory features for a model, a sequence length and a set of GPUs.

    python -m easy_context.advise --model-config llama-2-7b --seq-length 524288 --gpus 8 --gpu-mem-gib 141

A first-order memory model of one training step per GPU (bf16 weights, DeepSpeed ZeRO-3 with the optimizer
offloaded to host memory, gradient checkpointing per decoder layer), with the per-layer working set
calibrated on the one-H200 Llama-2-7B measurements in bench/RESULTS.md (``WORK_FACTOR``). It prints the
predicted peak and the choice; it is a planning aid, not a guarantee: allocator fragmentation and
framework buffers add a few GiB.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

GIB = 2**30

# Transient activations of the layer in flight (recompute + backward), in units of tokens x hidden x 2 bytes,
# tiled MLP and chunked loss on. Calibrated on bench/RESULTS.md (one H200, Llama-2-7B, 2026-11-29): mode "ec"
# at 128K: (67.2 GiB peak - 25.1 weights+grads - 32 checkpoints) / 1 GiB = 10.1; with offloading ("ec_off",
# 256K) the in-flight copies raise it to (69.0 - 25.1) / 2 GiB = 22.
WORK_FACTOR = {False: 10.1, True: 22.0}
# Attention-preserving checkpointing keeps, per layer, this many units (measured "ec_keep_off" at 64K:
# (87.9 - 25.1 - 22 x 0.5) / 32 layers / 0.5 GiB = 3.2; the attention output alone would be 1).
KEEP_FACTOR = 3.2
# Measured per-rank attention efficiency of the zigzag ring vs single-GPU cuDNN (bench/RESULTS.md):
# >= 0.95 once each rank holds >= 16K tokens; below ~4K per rank launch overheads dominate.
RING_EFFICIENT_TOKENS = 16384

PRESETS = {
    "llama-2-7b": dict(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32000),
    "llama-3-8b": dict(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256),
    "mistral-7b": dict(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=32000),
    "qwen2.5-7b": dict(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab=152064),
}


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int

    @property
    def params(self) -> int:
        h, kv = self.hidden, self.hidden * self.kv_heads // self.heads
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * self.intermediate + 2 * h
        return self.layers * per_layer + 2 * self.vocab * h + h


def load_shape(name_or_path: str) -> ModelShape:
    """A preset name or a path/hub id of a transformers config."""
    if name_or_path in PRESETS:
        return ModelShape(**PRESETS[name_or_path])
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(name_or_path).get_text_config()
    return ModelShape(c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
                      getattr(c, "num_key_value_heads", None) or c.num_attention_heads, c.intermediate_size, c.vocab_size)


@dataclass
class Plan:
    seq_algo: str
    sp_size: int
    ring_degree: int | None
    offload_checkpoints: bool
    attn_preserving: bool
    gpu_gib: float
    host_gib: float
    notes: list


def predict_gib(m: ModelShape, tokens_per_gpu: int, gpus: int, *, offload: bool, keep_attn: bool) -> tuple[float, float]:
    """(GPU GiB, host GiB) of one step: ZeRO-3 shards of bf16 weights+grads, one gathered layer, the
    checkpoints (layer inputs; on the host when offloaded), preserved attention outputs, the working set."""
    act = tokens_per_gpu * m.hidden * 2
    # bf16 weights + grads: ZeRO-3 shards plus one gathered layer; on one GPU simply all of them
    weights = 2 * 2 * m.params if gpus == 1 else 2 * 2 * m.params / gpus + 2 * 2 * m.params / m.layers
    ckpt = m.layers * act
    keep = KEEP_FACTOR * m.layers * act if keep_attn else 0
    gpu = weights + WORK_FACTOR[offload] * act + keep + (0 if offload else ckpt)
    host = 12 * m.params / gpus + (ckpt if offload else 0)  # Adam fp32 master, m, v per GPU's shard
    return gpu / GIB, host / GIB


def advise(m: ModelShape, seq_length: int, gpus: int, gpu_mem_gib: float, host_mem_gib: float) -> Plan:
    notes = []
    uly = math.gcd(gpus, m.heads)
    uly = max(d for d in range(1, min(uly, 8) + 1) if gpus % d == 0 and m.heads % d == 0)
    if gpus == 1:
        algo, ring = "zigzag_ring_attn", None
        notes.append("one GPU: a ring of one is plain cuDNN attention through easy_context's kernels, which is "
                     "what attention-preserving checkpointing needs; the memory features do the work")
    elif uly == gpus:
        algo, ring = "ulysses_attn", None
        notes.append(f"heads ({m.heads}) divide by {gpus}: Ulysses all-to-all inside the node")
    elif uly > 1:
        algo, ring = "usp_attn", gpus // uly
        notes.append(f"Ulysses {uly} x ring {gpus // uly}: heads limit Ulysses to {uly}")
    else:
        algo, ring = "zigzag_ring_attn", None
    per_gpu = seq_length // gpus
    if algo == "zigzag_ring_attn" and per_gpu < RING_EFFICIENT_TOKENS:
        notes.append(f"only {per_gpu} tokens per rank: ring steps are short, expect < 95% attention efficiency")
    budget = gpu_mem_gib * 0.92  # allocator slack
    for offload, keep in ((False, True), (True, True), (False, False), (True, False)):
        gpu, host = predict_gib(m, per_gpu, gpus, offload=offload, keep_attn=keep)
        if gpu <= budget and host <= host_mem_gib * 0.9:
            break
    else:
        notes.append("does not fit even with every feature on: use more GPUs or a shorter sequence")
    return Plan(algo, gpus, ring, offload, keep, gpu, host, notes)


def check(path: str) -> list:
    """Predicted vs measured peak GiB for the single-GPU rows of a bench/train_step.py JSON-lines file."""
    import json

    m, out = ModelShape(**PRESETS["llama-2-7b"]), []
    for line in open(path):
        r = json.loads(line)
        if r.get("oom") or r.get("error") or r["mode"] == "stock" or r.get("layers") != m.layers:
            continue
        gpu, _ = predict_gib(m, r["S"], 1, offload="off" in r["mode"], keep_attn="keep" in r["mode"])
        out.append((r["mode"], r["S"], gpu, r["peak_GiB"]))
        print(f"{r['mode']:12s} S={r['S']:>7d}: predicted {gpu:6.1f} GiB, measured {r['peak_GiB']:6.1f} GiB")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-config", default="llama-2-7b", help=f"preset ({', '.join(PRESETS)}) or a config path")
    p.add_argument("--seq-length", type=int, default=131072)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpu-mem-gib", type=float, default=141.0)
    p.add_argument("--host-mem-gib", type=float, default=1024.0, help="host memory of the node (all GPUs)")
    p.add_argument("--check", metavar="JSONL", help="compare predictions with bench/train_step.py measurements")
    a = p.parse_args(argv)
    if a.check:
        return check(a.check)
    m = load_shape(a.model_config)
    plan = advise(m, a.seq_length, a.gpus, a.gpu_mem_gib, a.host_mem_gib / a.gpus)
    print(f"model: {a.model_config} ({m.params / 1e9:.2f} B params), {a.seq_length} tokens on {a.gpus} GPU(s)")
    print(f"  --parallel_mode {plan.seq_algo}" + (f" --ring-degree {plan.ring_degree}" if plan.ring_degree else ""))
    print(f"  offloaded checkpointing: {'on' if plan.offload_checkpoints else 'off'}; attention-preserving "
          f"checkpointing: {'on' if plan.attn_preserving else 'off'}; tiled MLP and chunked loss: on")
    print(f"  predicted peak: {plan.gpu_gib:.1f} GiB per GPU, {plan.host_gib:.1f} GiB host per GPU")
    for n in plan.notes:
        print(f"  note: {n}")
    return plan


if __name__ == "__main__":
    main()
