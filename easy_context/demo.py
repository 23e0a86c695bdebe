"""A 2-process CPU demo of exact sequence parallelism: ``python -m easy_context.demo [--world 2] [--seq 4096]``.

Shards one random sequence over gloo ranks, runs every sequence-parallel algorithm of the registry forward and
backward, and prints the largest relative error of the output and gradients against single-process float64
attention.
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _run(rank, world, seq, init_file):
    from easy_context.attention import SP_ALGOS, get_attn_func, local_attn_func, shard_sequence

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(0)
    b, h, hkv, d = 1, 8, 2, 64
    q, k, v, dout = (torch.randn(b, seq, n, d, generator=gen) for n in (h, hkv, hkv, h))
    ref_in = [x.double().requires_grad_() for x in (q, k, v)]
    ref = local_attn_func(*ref_in, causal=True, backend="math")  # float64 single-process reference
    ref.backward(dout.double())
    for algo in SP_ALGOS:
        local = [shard_sequence(algo, x, rank, world).requires_grad_() for x in (q, k, v)]
        out = get_attn_func(algo)(*local, causal=True, backend="math")
        out.backward(shard_sequence(algo, dout, rank, world))
        errs = [_rel(out, shard_sequence(algo, ref, rank, world))]
        errs += [_rel(x.grad, shard_sequence(algo, r.grad, rank, world)) for x, r in zip(local, ref_in)]
        worst = torch.tensor(max(errs))
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        if rank == 0:
            print(f"{algo:18s} world={world} seq={seq}: max relative error of out/dq/dk/dv vs float64 "
                  f"full attention = {worst.item():.2e}", flush=True)
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--seq", type=int, default=4096)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_run, args=(a.world, a.seq, os.path.join(tmp, "rdzv")), nprocs=a.world)


if __name__ == "__main__":
    main()
