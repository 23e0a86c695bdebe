"""FlashAttention-4's just-in-time compilation on one GPU: what each new kernel configuration costs the first time in
a process, what FA4's on-disk cache (on by default under easy_context) saves a second process, and whether a training
step compiles after its first (packed rows of new document lengths every step).

    PYTHONUNBUFFERED=1 python bench/fa4_compile.py

The parent runs three children in fresh processes with one new cache folder: ``configs`` cold (empty cache),
``configs`` again (the cache on disk), ``configs`` with the cache off; then ``steps``. Each prints JSON lines; the
parent prints a table. ``compiled`` counts the kernels that entered FA4's in-process caches (compiled, or loaded
from the disk cache; bench only: private attributes).
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

CONFIGS = [  # (name, causal, kv heads, varlen): what a ring run asks of the kernel (32 query heads, d 128, bf16)
    ("causal MHA", True, 32, False), ("unmasked MHA", False, 32, False), ("causal GQA 32/8", True, 8, False),
    ("unmasked GQA 32/8", False, 8, False), ("varlen causal GQA 32/8", True, 8, True)]


def compiled():
    """Kernels compiled so far in this process (FA4's in-memory caches)."""
    from flash_attn.cute import interface as fa

    return sum(len(f.compile_cache.cache) for f in (fa._flash_attn_fwd, fa._flash_attn_bwd, fa._bwd_preprocess,
                                                     fa._bwd_postprocess_convert))


def configs():
    from easy_context.attention.kernels import get_kernel

    kern = get_kernel("fa4", torch.device("cuda"), torch.bfloat16, 128)
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    for name, causal, kv, varlen in CONFIGS:
        s = 8192
        q, do = (torch.randn(1, s, 32, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        k, v = (torch.randn(1, s, kv, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        cu = torch.tensor([0, 1000, 4000, 4100, s], dtype=torch.int32, device="cuda")

        def call():
            if varlen:
                o, lse = kern.varlen.forward(q[0], k[0], v[0], cu, 3000, causal, 0.088)
                kern.varlen.backward(do[0], q[0], k[0], v[0], o, lse, cu, 3000, causal, 0.088)
            else:
                o, lse = kern.forward(t(q), t(k), t(v), causal, 0.088)
                kern.backward(t(do), t(q), t(k), t(v), o, lse, causal, 0.088)
            torch.cuda.synchronize()
        times, before = [], compiled()
        for _ in range(2):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        print(json.dumps(dict(child="configs", config=name, first_s=round(times[0], 3), second_s=round(times[1], 4),
                              compiled=compiled() - before)), flush=True)


def steps():
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from easy_context import apply_seq_parallel_monkey_patch, prepare_seq_parallel_inputs

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl", init_method=f"file://{tmp}/rdzv", rank=0, world_size=1)
        cfg = LlamaConfig(hidden_size=1024, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                          num_key_value_heads=2, vocab_size=32000, max_position_embeddings=1 << 16)
        model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
        apply_seq_parallel_monkey_patch("zigzag_ring_attn", model, backend="fa4")
        g = torch.Generator().manual_seed(0)
        s = 16384
        for step in range(5):
            cuts = sorted(torch.randint(1, s, (12,), generator=g).tolist())  # new document lengths every step
            pos = torch.cat([torch.arange(b - a) for a, b in zip([0, *cuts], [*cuts, s])])[None]
            ids = torch.randint(0, 32000, (1, s), generator=g)
            p = prepare_seq_parallel_inputs("zigzag_ring_attn", ids, pos, ids, 0, 1, "cuda")
            before, t0 = compiled(), time.perf_counter()
            logits = model(p["local_input_ids"], position_ids=p["local_position_ids"]).logits
            logits.float().square().mean().backward()
            torch.cuda.synchronize()
            print(json.dumps(dict(child="steps", step=step, s=round(time.perf_counter() - t0, 3),
                                  compiled=compiled() - before)), flush=True)
        dist.destroy_process_group()


def main():
    if len(sys.argv) > 1:
        {"configs": configs, "steps": steps}[sys.argv[1]]()
        return
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=cache)
        for label, child, extra in [("cold", "configs", {}), ("from disk", "configs", {}),
                                    ("cache off", "configs", {"FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED": "0"}),
                                    ("training steps (cache on disk)", "steps", {})]:
            t0 = time.perf_counter()
            run = subprocess.run([sys.executable, __file__, child], env=dict(env, **extra), capture_output=True,
                                 text=True)
            wall = time.perf_counter() - t0
            got = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
            if run.returncode:
                print(run.stderr[-3000:], flush=True)
            for r in got:
                r["run"] = label
                print(json.dumps(r), flush=True)
            rows += got
            print(json.dumps(dict(run=label, process_wall_s=round(wall, 1), rc=run.returncode)), flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "fa4_compile.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
