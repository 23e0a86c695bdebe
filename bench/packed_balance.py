"""Load balance of packed rows over a ring (CPU, exact: from the block planner's work count, no GPU needed).

    python bench/packed_balance.py [--rows 20] [--seqs 131072 524288] [--worlds 2 4 8]

For rows of documents log-uniform in [--min-doc, --max-doc] tokens (bench/packed_attn.py's generator, seeds
0..rows-1): the busiest rank's causal attention work over the mean for zigzag_ring_attn, in the generated order and
after prepare_seq_parallel_inputs(balance_documents=True) (train.py's default for packed data), mean and worst over
the rows, and the host time the reordering took per row. Ulysses is 1.0 for any row (every rank attends the whole
row for its heads); usp's ring of R positions balances like zigzag over R.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from packed_attn import doc_mix  # noqa: E402

from easy_context.api import prepare_seq_parallel_inputs  # noqa: E402
from easy_context.attention.documents import boundaries_from_positions, imbalance, zigzag_runs  # noqa: E402
from easy_context.attention.registry import shard_sequence  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=20)
    p.add_argument("--seqs", type=int, nargs="+", default=[131072, 524288])
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--min-doc", type=int, default=1024)
    p.add_argument("--max-doc", type=int, default=65536)
    a = p.parse_args()
    print("| tokens | ranks | given order: mean (worst) | balanced: mean (worst) | reorder time per row |")
    print("|---|---|---|---|---|")
    for seq in a.seqs:
        for world in a.worlds:
            runs = [zigzag_runs(r, world, seq // world) for r in range(world)]
            given, balanced, spent = [], [], 0.0
            for seed in range(a.rows):
                bounds = doc_mix(seq, a.min_doc, a.max_doc, seed)
                pos = torch.cat([torch.arange(y - x) for x, y in zip(bounds[:-1], bounds[1:])])[None]
                given.append(imbalance([tuple(bounds)], runs))
                t = time.perf_counter()
                shards = [prepare_seq_parallel_inputs("zigzag_ring_attn", pos, pos, None, r, world, "cpu",
                                                      balance_documents=True)["local_position_ids"]
                          for r in range(world)]
                spent += (time.perf_counter() - t) / world
                full = torch.empty_like(pos)  # put the shards back in sequence order to read the new boundaries
                for r, shard in enumerate(shards):
                    full[:, shard_sequence("zigzag_ring_attn", torch.arange(seq)[None], r, world)[0]] = shard
                balanced.append(imbalance(boundaries_from_positions(full), runs))
            print(f"| {seq // 1024}K | {world} | {sum(given) / len(given):.3f} ({max(given):.3f}) | "
                  f"{sum(balanced) / len(balanced):.3f} ({max(balanced):.3f}) | {spent / a.rows * 1e3:.0f} ms |",
                  flush=True)


if __name__ == "__main__":
    main()
