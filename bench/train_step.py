"""One Llama-2-7B training step (random init, bf16, fwd+bwd, no optimizer step) on one GPU:
the stock Hugging Face path vs easy_context, in the same run on the same model.

    PYTHONUNBUFFERED=1 python bench/train_step.py --plan "stock:16384,65536,131072 ec:16384,65536,131072 ..."

Modes: ``stock`` = sdpa attention, gradient checkpointing, the model's own loss (full logits); or ``ec`` =
easy_context attention (cuDNN, W=1 through the registered attention), chunked loss and gradient checkpointing,
plus any of (joined with "+"):
  tile[=N]   tiled MLP (tiles of N tokens; default hidden_size)
  norm       low-memory RMSNorm
  fuse       fused RMSNorm, SwiGLU and RoPE kernels (easy_context.memory.ops; implies norm)
  keep[=N]   attention-preserving checkpointing (no attention forward in the recompute), all or the first N layers
  off[=N]    layer inputs offloaded to pinned host memory, all or the first N layers (the rest stay on the GPU)
e.g. ``ec+keep``, ``ec+norm+tile+keep=20+off=12``; ``@BACKEND`` at the end names the attention kernel
(``ec+fuse+keep@fa4``, ``ec+fuse+keep@cudnn``; default: the library's auto choice, which the first line prints);
``+full=N`` (ec modes) leaves the last N decoder layers out of gradient checkpointing: they keep their activations
and are not recomputed (spends free GPU memory on speed). Model FLOPs = 6*N*T + 3.5 * L * 2*T^2*d (causal attention
fwd+bwd), recompute not counted; MFU against 989 TFLOP/s (H100/H200 dense bf16). Prints one JSON line per run;
writes $OUT/train_step.jsonl as it goes and $OUT/train_step_progress.jsonl (time and memory at each layer's
forward end and backward start: how far a run cut short got). ``--profile`` prints each mode's top GPU kernels.
``--packed 1024:65536``: the ec modes train on packed rows (documents log-uniform in that range).
"""
import argparse
import gc
import json
import os
import tempfile
import time

import torch
import torch.distributed as dist
from modes import apply_features, parse_mode  # bench/modes.py
from transformers import LlamaConfig, LlamaForCausalLM

PEAK = 989e12


DEV = "cuda"


def build(layers, tiny=False):
    dims = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4) if tiny else \
        dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
    cfg = LlamaConfig(num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=1 << 21, rope_theta=1e6,
                      **dims)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(DEV):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.config.use_cache = False
    return model


def configure(model, mode):
    from easy_context import apply_seq_parallel_monkey_patch
    from easy_context.attention.kernels import describe_kernel

    mode, _, backend = mode.partition("@")
    full = [int(p.partition("=")[2]) for p in mode.split("+") if p.startswith("full=")]
    mode = "+".join(p for p in mode.split("+") if not p.startswith("full="))
    f = parse_mode(mode, model.config.num_hidden_layers)  # the grammar above; raises on anything else
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if f is None:  # stock
        return
    apply_seq_parallel_monkey_patch("zigzag_ring_attn", model, backend=backend or None)
    print(describe_kernel(backend or None, model.device, model.dtype, model.config.head_dim), flush=True)
    fused = apply_features(model, f)
    for layer in model.model.layers[len(model.model.layers) - sum(full):]:
        layer.gradient_checkpointing = False  # GradientCheckpointingLayer: this layer runs without a checkpoint
    if fused:
        print(f"fused: {fused}", flush=True)


class Progress:
    """Time and memory at each decoder layer's forward end and backward start, appended to a JSON-lines file."""

    def __init__(self, model, path):
        self.path, self.t0, self.tag = path, time.time(), {}
        for i, layer in enumerate(model.model.layers):
            layer.register_forward_hook(self._forward_hook(i))

    def start(self, **tag):
        self.t0, self.tag = time.time(), tag

    def stop(self):
        self.tag = {}

    def _log(self, what, i):
        if self.path and self.tag:
            with open(self.path, "a") as f:
                f.write(json.dumps(dict(self.tag, at=what, layer=i, t=round(time.time() - self.t0, 2),
                                        alloc_GiB=round(torch.cuda.memory_allocated() / 2**30, 1),
                                        peak_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 1))) + "\n")

    def _forward_hook(self, i):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if torch.is_grad_enabled() and hidden.requires_grad:
                self._log("forward", i)
                hidden.register_hook(lambda grad: self._log("backward", i))
        return hook


PACKED = None  # (min, max) document length: ec modes train on packed rows (--packed)


def packed_positions(seq):
    """Positions restarting at each document (lengths log-uniform in PACKED, seeded by seq) and the pairs count."""
    from packed_attn import doc_mix, pairs  # bench/packed_attn.py

    bounds = doc_mix(seq, *PACKED, seed=seq)
    pos = torch.cat([torch.arange(b - a) for a, b in zip(bounds[:-1], bounds[1:])])
    return pos.to(DEV).unsqueeze(0), pairs(bounds), len(bounds) - 1


def step(model, mode, seq):
    ids = torch.randint(0, 32000, (1, seq), device=DEV)
    if mode == "stock":
        loss = model(input_ids=ids, labels=ids).loss
    else:
        from easy_context.loss import sharded_cross_entropy

        pos = torch.arange(seq, device=DEV).unsqueeze(0) if PACKED is None else packed_positions(seq)[0]
        hidden = model.model(input_ids=ids, position_ids=pos).last_hidden_state
        targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)
        targets[:, :-1][pos[:, 1:] == 0] = -100  # packed: a document's last token predicts nothing
        loss = sharded_cross_entropy(hidden, model.lm_head.weight, targets).loss
    loss.backward()
    return loss.item()


def measure(model, mode, seq, n_params, layers, progress=None, reps=None):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    reps = reps or (2 if seq <= 32768 else 1)
    try:
        step(model, mode, min(seq, 16384))  # warm-up (kernel plans, library handles) for every mode alike
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        if progress:
            progress.start(mode=mode, S=seq)
        times = []
        for _ in range(reps):
            t = time.time()
            loss = step(model, mode, seq)
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.time() - t)
        dt = sum(times) / reps
        if progress:
            progress.stop()
        causal_pairs = seq * seq / 2
        extra = {}
        if PACKED is not None and mode != "stock":  # only the pairs inside documents are model FLOPs
            _, causal_pairs, docs = packed_positions(seq)
            extra = dict(packed=f"{PACKED[0]}-{PACKED[1]}", docs=docs)
        flops = 6 * n_params * seq + 3.5 * layers * 4 * causal_pairs * 4096
        return dict(mode=mode, S=seq, **extra, layers=layers, s_per_step=round(dt, 2),
                    steps_s=[round(x, 2) for x in times],
                    tok_per_s=round(seq / dt),
                    TFLOPs=round(flops / dt / 1e12, 1), MFU=round(flops / dt / PEAK, 3), loss=round(loss, 3),
                    peak_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 1))
    except torch.OutOfMemoryError:
        model.zero_grad(set_to_none=True)
        return dict(mode=mode, S=seq, layers=layers, oom=True,
                    peak_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 1))
    except Exception as e:  # noqa: BLE001 - record and go on with the next run
        model.zero_grad(set_to_none=True)
        return dict(mode=mode, S=seq, layers=layers, error=repr(e)[:300])


def profile(model, mode, seq, top=25):
    """One warm step, then one profiled step: the GPU kernels that take the time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step(model, mode, seq)
    model.zero_grad(set_to_none=True)
    on_gpu = DEV == "cuda"
    with torch_profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
        step(model, mode, seq)
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    print(f"== profile {mode} S={seq}", flush=True)
    key = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=70), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--plan", default="stock:16384,65536,131072 ec+keep:16384,65536,131072")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU/gloo: checks the script only")
    p.add_argument("--reps", type=int, help="timed steps per length (default: 2 up to 32K tokens, else 1)")
    p.add_argument("--profile", type=int, metavar="SEQ", help="profile each mode of the plan at SEQ tokens instead")
    p.add_argument("--packed", metavar="MIN:MAX", help="ec modes: packed rows of documents log-uniform in MIN..MAX "
                   "tokens (position ids restart per document; model FLOPs count only in-document attention)")
    a = p.parse_args()
    global DEV, PACKED
    if a.packed:
        PACKED = tuple(int(x) for x in a.packed.split(":"))
    if a.cpu_smoke:
        DEV = "cpu"
        torch.cuda.synchronize = lambda: None
        torch.cuda.max_memory_allocated = torch.cuda.memory_allocated = lambda: 0
        torch.cuda.reset_peak_memory_stats = torch.cuda.empty_cache = lambda: None
    with tempfile.TemporaryDirectory() as tmp:  # a world of one rank: the registered attention needs a group
        dist.init_process_group("gloo" if a.cpu_smoke else "nccl", init_method=f"file://{tmp}/rdzv", rank=0,
                                world_size=1)
        rows = []
        for item in a.plan.split():
            mode, lens = item.split(":")
            model = build(a.layers, a.cpu_smoke)
            n_params = sum(p.numel() for p in model.parameters())
            configure(model, mode)
            if a.profile:
                profile(model, mode, a.profile)
                del model
                gc.collect()
                continue
            out_dir = os.environ.get("OUT")
            progress = Progress(model, out_dir and os.path.join(out_dir, "train_step_progress.jsonl"))
            for seq in map(int, lens.split(",")):
                r = measure(model, mode, seq, n_params, a.layers, progress, a.reps)
                print(json.dumps(r), flush=True)
                rows.append(r)
                if os.environ.get("OUT"):  # as it goes: a run cut short keeps what it measured
                    with open(os.path.join(os.environ["OUT"], "train_step.jsonl"), "a") as f:
                        f.write(json.dumps(r) + "\n")
                if r.get("oom") or r.get("error"):
                    break
            del model
            gc.collect()
            torch.cuda.empty_cache()
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "train_step.json"), "w") as f:
                json.dump(rows, f, indent=1)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
