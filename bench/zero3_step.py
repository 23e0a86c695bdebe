"""The seed's recipe with its optimizer step: Llama-2-7B shape (random init), DeepSpeed ZeRO-3 with parameters and
optimizer offloaded (accelerate_configs/single_node.yaml), bf16, sequence parallel, train.py's memory flags; one
step per length, timed in parts: forward, backward, optimizer step (DeepSpeed's CPU Adam over the offloaded
partitions, and the parameter write-back).

    accelerate launch --config_file accelerate_configs/single_node.yaml --num_processes 2 bench/zero3_step.py \
        --lengths 131072,262144,524288 -- --seq-algo zigzag_ring_attn --gradient-checkpointing --fused-kernels \
        --tiled-mlp --attn-preserving-checkpointing --offload-checkpointing 17

Everything after ``--`` is train.py's flags; the model is built exactly as train.py builds it (easy_context.training),
on the GPU for a fast random init, then handed to DeepSpeed by accelerate. One warm-up step at 16K tokens first
(compilation, kernel plans). Per length: seconds per part, tokens/s, MFU per GPU (model FLOPs 6*N*T + causal
attention, recompute not counted, against 989 TFLOP/s), GPU peak (max over ranks) and host memory in use (the whole
machine: both ranks, pinned offload buffers and optimizer state), sampled every 0.2 s. One JSON line per length,
also appended to $OUT/zero3_step.jsonl as it goes (a run cut short keeps what it measured).
"""
import argparse
import json
import os
import sys
import threading
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from easy_context import prepare_seq_parallel_inputs, training  # noqa: E402
from easy_context.advise import PRESETS  # noqa: E402

PEAK = 989e12


class HostMemory:
    """Peak of MemTotal - MemAvailable (GiB) since the last reset, sampled by a thread."""

    def __init__(self):
        self.peak = 0.0
        threading.Thread(target=self._run, daemon=True).start()

    @staticmethod
    def used() -> float:
        info = dict(line.split(":", 1) for line in open("/proc/meminfo"))
        return (int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])) / 2**20

    def _run(self):
        while True:
            self.peak = max(self.peak, self.used())
            time.sleep(0.2)

    def reset(self) -> float:
        self.peak = self.used()
        return self.peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="131072,262144,524288")
    ap.add_argument("--model", default="llama-2-7b", help="an easy_context.advise preset, or 'tiny' (a CPU smoke run "
                    "of this script: DS_ACCELERATOR=cpu with accelerate_configs/single_node.yaml)")
    ap.add_argument("--warmup", type=int, default=16384)
    a, rest = ap.parse_known_args()
    train_flags = rest[1:] if rest[:1] == ["--"] else rest
    out_dir = os.environ.get("OUT", "/tmp")
    shape = PRESETS.get(a.model) or dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=256)
    config = dict(model_type="llama", hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                  num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                  intermediate_size=shape["intermediate"], vocab_size=shape["vocab"], tie_word_embeddings=False,
                  max_position_embeddings=max(map(int, a.lengths.split(","))))
    cfg_path = os.path.join("/tmp", f"{a.model}_config.json")
    with open(cfg_path, "w") as f:
        json.dump(config, f)
    cfg = training.parse_config(
        ["--model-config", cfg_path, "--init-random", "--output-dir", "/tmp/zero3_step", "--report-to", "none",
         *train_flags])

    accelerator = training.make_accelerator(cfg)
    rank, world = dist.get_rank(), dist.get_world_size()
    host = HostMemory() if accelerator.is_local_main_process else None
    tic = time.time()
    with torch.device(accelerator.device):  # random init on the GPU: seconds instead of minutes on the CPU
        model = training.load_causal_lm(None, training.config_for(cfg), torch.bfloat16, init_random=True)
    from easy_context import apply_seq_parallel_monkey_patch

    apply_seq_parallel_monkey_patch(cfg.seq_algo, model, ring_degree=cfg.ring_degree, backend=cfg.attn_backend)
    training.apply_memory_features(cfg, model)
    wrapper = training.CausalLMWithShardedLoss(model, chunk_size=cfg.loss_chunk_size)
    # under a ZeRO-3 launch the model is built inside deepspeed.zero.Init: each parameter is already a partition
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    engine, _, _ = training.prepare_optimization(cfg, accelerator, wrapper)
    accelerator.print(training.describe_precision(accelerator, engine))
    accelerator.print(f"setup {time.time() - tic:.1f} s; {n_params / 1e9:.2f} B parameters; "
                      f"flags: {' '.join(train_flags)}")

    cuda = torch.cuda.is_available()

    def sync():
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()

    def one_step(seq):
        ids = torch.randint(0, config["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(seq))
        tgt = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)
        p = prepare_seq_parallel_inputs(cfg.seq_algo, ids, None, tgt, rank, world, accelerator.device)
        sync()
        t0 = time.time()
        out = engine(p["local_input_ids"], p["local_position_ids"], p["local_target_ids"])
        sync()
        t1 = time.time()
        engine.backward(out.loss)
        sync()
        t2 = time.time()
        engine.step()
        sync()
        t3 = time.time()
        return out.global_loss.item(), t1 - t0, t2 - t1, t3 - t2

    one_step(a.warmup)
    accelerator.print(f"warm-up step at {a.warmup} tokens done")
    L, h = config["num_hidden_layers"], config["hidden_size"]
    for seq in map(int, a.lengths.split(",")):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        base = host.reset() if host else 0.0
        try:
            loss, fwd, bwd, opt = one_step(seq)
            total = fwd + bwd + opt
            flops = 6 * n_params * seq + 3.5 * L * 2 * seq * seq * h
            row = dict(S=seq, gpus=world, loss=round(loss, 4), fwd_s=round(fwd, 2), bwd_s=round(bwd, 2),
                       step_s=round(opt, 2), total_s=round(total, 2), fwd_bwd_s=round(fwd + bwd, 2),
                       optimizer_share=round(opt / (fwd + bwd), 3), tok_per_s=round(seq / total),
                       MFU_per_gpu=round(flops / total / world / PEAK, 3),
                       MFU_fwd_bwd=round(flops / (fwd + bwd) / world / PEAK, 3))
        except torch.OutOfMemoryError:
            row = dict(S=seq, gpus=world, oom=True)
        peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0], device=accelerator.device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        row.update(gpu_peak_GiB=round(peak.item(), 1), host_used_before_GiB=round(base, 1),
                   host_peak_GiB=round(host.peak, 1) if host else None, flags=" ".join(train_flags))
        if accelerator.is_main_process:
            print(json.dumps(row), flush=True)
            with open(os.path.join(out_dir, "zero3_step.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
        if row.get("oom"):
            break


if __name__ == "__main__":
    main()
