"""Packed-document attention on 2 GPUs (NCCL): per-rank fwd+bwd time and TFLOP/s counting only unmasked work, vs
dense causal cuDNN over the same total tokens on one GPU, in the same run.

    PYTHONUNBUFFERED=1 python bench/packed_attn.py [--seqs 131072 524288] [--backends cudnn flash]

Rows: documents with lengths log-uniform in [--min-doc, --max-doc] (seeded), packed to exactly S tokens, in the
balanced order train.py uses for rings (--no-balance: as generated). For each
algorithm and kernel backend: a warm-up pass on another mix of the same S (new document lengths), then ``cold``: the
first pass on this mix (every kernel shape new: cuDNN builds its execution plans), then ``warm``: the median of
``--reps`` further passes. Work = query-key pairs inside documents (causal); FLOPs = 4 * pairs * heads * d forward,
2.5x that backward (flash-attn's count). Per-rank TFLOP/s = total FLOPs / ranks / the slowest rank's time, so load
imbalance counts as lost speed; ``balance`` = the busiest rank's work / the mean (from the block planner, exact).
``--profile``: one more pass per row under torch.profiler (bench/_profile.py: where the GPU time went).
Writes $OUT/packed_attn.jsonl (one JSON line per row) and prints them.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _profile import profiled  # noqa: E402 - bench/_profile.py (the script's folder is on sys.path)


def doc_mix(seq, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    bounds = [0]
    while bounds[-1] < seq:
        n = int(math.exp(math.log(lo) + torch.rand((), generator=g).item() * (math.log(hi) - math.log(lo))))
        bounds.append(min(seq, bounds[-1] + n))
    return bounds


def pairs(bounds):
    return sum((b - a) * (b - a + 1) // 2 for a, b in zip(bounds[:-1], bounds[1:]))


def ordered(algo, bounds, world):
    """The row's documents in train.py's balanced order for ``algo`` (prepare_seq_parallel_inputs)."""
    from easy_context.attention.documents import balanced_order, zigzag_runs

    if algo != "zigzag_ring_attn":
        return bounds
    perm, _ = balanced_order(tuple(bounds), [zigzag_runs(r, world, bounds[-1] // world) for r in range(world)])
    cuts = [0]
    for i in perm:
        cuts.append(cuts[-1] + bounds[i + 1] - bounds[i])
    return cuts


def balance(algo, bounds, world):
    from easy_context.attention.documents import work, zigzag_runs

    if algo != "zigzag_ring_attn":
        return 1.0  # Ulysses: every rank attends the whole row for its share of the heads
    per = [work([tuple(bounds)], zigzag_runs(r, world, bounds[-1] // world)) for r in range(world)]
    return max(per) / (sum(per) / world)


def travel(algo, bounds, world):
    """The share of each ring position's K/V rows that leave it (plans.block_spans: what other ranks read)."""
    from easy_context.attention.plans import block_spans

    if algo != "zigzag_ring_attn":
        return None
    n = bounds[-1] // world
    return [round(sum(b - a for a, b in block_spans(s, world, n, True, (tuple(bounds),))) / n, 3) for s in range(world)]


def timed(fn):
    torch.cuda.synchronize()
    dist.barrier()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    dt = torch.tensor([time.perf_counter() - t], device="cuda")
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    return dt.item()


def worker(rank, world, args, port):
    from easy_context import get_attn_func, shard_sequence

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    h, d = args.heads, 128
    out_path = os.path.join(os.environ.get("OUT", "bench/results"), "packed_attn.jsonl")
    for seq in args.seqs:
        g = torch.Generator(device="cuda").manual_seed(seq)
        full = [torch.randn(1, seq, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4)]
        if rank == 0:  # dense causal cuDNN over all S tokens on one GPU: the baseline
            from easy_context.attention.kernels import KERNELS
            kern = KERNELS["cudnn"]
            t = lambda x: x.transpose(1, 2)  # noqa: E731
            q, k, v, do = full

            def dense():
                o, l = kern.forward(t(q), t(k), t(v), True, d ** -0.5)
                kern.backward(t(do), t(q), t(k), t(v), o, l, True, d ** -0.5)
            dense()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dense()
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            flops = 3.5 * 4 * pairs([0, seq]) * h * d
            row = dict(kind="dense_cudnn_1gpu", S=seq, s=round(dt, 4), TFLOPs=round(flops / dt / 1e12, 1))
            print(json.dumps(row), flush=True)
            with open(out_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        dist.barrier()
        warm_mix = doc_mix(seq, args.min_doc, args.max_doc, seed=1)
        raw = doc_mix(seq, args.min_doc, args.max_doc, seed=2)
        for algo in args.algos:
            mix = ordered(algo, raw, world) if args.balance else raw
            for backend in args.backends:
                fn = get_attn_func(algo)
                shard = lambda x: shard_sequence(algo, x, rank, world)  # noqa: E731
                q, k, v, do = (shard(x) for x in full)
                q, k, v = (x.requires_grad_() for x in (q, k, v))

                def run(bounds):
                    out = fn(q, k, v, causal=True, backend=backend, cu_seqlens=bounds)
                    out.backward(do)
                    q.grad = k.grad = v.grad = None
                try:
                    run(warm_mix)
                    cold = timed(lambda: run(mix))
                    warm = sorted(timed(lambda: run(mix)) for _ in range(args.reps))[args.reps // 2]
                    prof = profiled(lambda: run(mix), f"packed {algo} {backend} S={seq} rank{rank}",
                                    os.path.join(os.path.dirname(out_path), f"profile_rank{rank}.txt")) \
                        if args.profile else None
                except Exception as e:  # noqa: BLE001 - record and go on
                    row = dict(kind="packed", algo=algo, backend=backend, S=seq, error=repr(e)[:300])
                else:
                    flops = 3.5 * 4 * pairs(mix) * h * d
                    row = dict(kind="packed", algo=algo, backend=backend, S=seq, docs=len(mix) - 1,
                               unmasked_fraction=round(pairs(mix) / pairs([0, seq]), 4),
                               balance=round(balance(algo, mix, world), 3),
                               balance_given_order=round(balance(algo, raw, world), 3),
                               kv_rows_sent=travel(algo, mix, world), cold_s=round(cold, 4),
                               warm_s=round(warm, 4), TFLOPs_per_rank=round(flops / world / warm / 1e12, 1),
                               cold_TFLOPs_per_rank=round(flops / world / cold / 1e12, 1))
                    if prof:
                        row["profile_rank0"] = prof
                if rank == 0:
                    print(json.dumps(row), flush=True)
                    with open(out_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                q = k = v = do = None  # free the tensors (the closures above read these names)
                torch.cuda.empty_cache()
        del full
        torch.cuda.empty_cache()
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seqs", type=int, nargs="+", default=[131072, 524288])
    p.add_argument("--algos", nargs="+", default=["zigzag_ring_attn", "ulysses_attn"])
    p.add_argument("--backends", nargs="+", default=["cudnn", "flash"])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--min-doc", type=int, default=1024)
    p.add_argument("--max-doc", type=int, default=65536)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--profile", action="store_true",
                   help="one more pass per row under torch.profiler: a summary in the row (compute, NCCL, idle "
                   "time), the op tables in profile_rank<r>.txt next to the rows")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--no-balance", dest="balance", action="store_false",
                   help="keep the generated document order (default: train.py's balanced order for rings)")
    args = p.parse_args()
    mp.spawn(worker, args=(args.world, args, 29500 + os.getpid() % 1000), nprocs=args.world)


if __name__ == "__main__":
    main()
