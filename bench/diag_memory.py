"""Where does a step's GPU memory go? Small-depth Llama-2-7B-width model, one length, each mode:
peak GiB, bytes offloaded by the Checkpointer, q/k/v tensors not kept by attention preservation.

    PYTHONUNBUFFERED=1 python bench/diag_memory.py [--layers 4] [--seq 65536]
"""
import argparse
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import train_step as T  # noqa: E402

from easy_context.memory import attn_preserving  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=65536)
    p.add_argument("--modes", nargs="+", default=["stock", "ec", "ec+off", "ec+keep", "ec+keep+off"])
    a = p.parse_args()
    import transformers
    print("transformers", transformers.__version__, "torch", torch.__version__, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl", init_method=f"file://{tmp}/r", rank=0, world_size=1)
        for mode in a.modes:
            model = T.build(a.layers)
            n_params = sum(x.numel() for x in model.parameters())
            T.configure(model, mode)
            attn_preserving.stats["qkv_not_kept"] = 0
            base = torch.cuda.memory_allocated() / 2**30
            r = T.measure(model, mode, a.seq, n_params, a.layers)
            fns = {getattr(m._gradient_checkpointing_func, "checkpointer", m._gradient_checkpointing_func)
                   for m in model.modules() if hasattr(m, "_gradient_checkpointing_func")}
            r.update(weights_GiB=round(base, 1), checkpoint_fns=sorted(type(f).__name__ for f in fns),
                     offloaded_GiB=round(sum(getattr(f, "offloaded_bytes", 0) for f in fns) / 2**30, 2),
                     qkv_not_kept=attn_preserving.stats["qkv_not_kept"], attn=model.config._attn_implementation)
            print(json.dumps(r), flush=True)
            del model
            torch.cuda.empty_cache()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
