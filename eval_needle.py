"""Needle-in-a-haystack heatmap with a sequence-parallel forward (one process per GPU).

    accelerate launch --num_processes 8 eval_needle.py --model PATH --parallel_mode zigzag_ring_attn \
        --max_context_length 1000000 --min_context_length 50000 --context_interval 50000 \
        --depth_interval 0.1 --num_samples 2 --num_distractor 3 --output_dir output/needle

CPU (gloo): ``torchrun --nproc_per_node 2 eval_needle.py ...``. Writes ``results.csv`` (one row per cell, appended
as cells finish: a re-run skips them), ``results.json`` and ``heatmap.png`` to ``--output_dir``. Without
``--haystack_dir`` the haystack is built-in synthetic essays; pass a folder of ``*.txt`` (e.g. Paul Graham essays)
for real text. Logic: easy_context/eval/needle.py.
"""
from __future__ import annotations

import argparse
import os

from easy_context.sharding import SEQ_ALGOS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="local model directory (or hub id) for from_pretrained")
    p.add_argument("--max_context_length", type=int, default=100000)
    p.add_argument("--min_context_length", type=int, default=1000)
    p.add_argument("--context_interval", type=int, default=1000)
    p.add_argument("--depth_interval", type=float, default=0.1)
    p.add_argument("--num_samples", type=int, default=10)
    p.add_argument("--rnd_number_digits", type=int, default=7)
    p.add_argument("--haystack_dir", default=None, help="folder of *.txt essays (default: synthetic essays)")
    p.add_argument("--num_distractor", type=int, default=0)
    p.add_argument("--rope_theta", type=float, default=None)
    p.add_argument("--parallel_mode", "--parallel-mode", default="zigzag_ring_attn", choices=SEQ_ALGOS)
    p.add_argument("--output_dir", default=None, help="default: output/needle_<model name>")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), bfloat16, float32...")
    p.add_argument("--seed", type=int, default=24242424)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from easy_context.eval.common import init_distributed, load_model
    from easy_context.eval.needle import NeedleConfig, evaluate_needle

    args = parse_args(argv)
    config = NeedleConfig(min_context_length=args.min_context_length, max_context_length=args.max_context_length,
                          context_interval=args.context_interval, depth_interval=args.depth_interval,
                          num_samples=args.num_samples, rnd_number_digits=args.rnd_number_digits,
                          num_distractor=args.num_distractor, seed=args.seed)
    rank, world, device = init_distributed()
    if world == 1 and args.parallel_mode != "data_parallel":  # one process: the model's own attention is the same
        print(f"single process: running {args.parallel_mode} as data_parallel (launch with torchrun/accelerate)")
        args.parallel_mode = "data_parallel"
    model_name = os.path.basename(args.model.rstrip("/"))
    output_dir = args.output_dir or os.path.join("output", f"needle_{model_name}")
    model, tokenizer = load_model(args.model, args.parallel_mode, device, dtype=args.dtype, rope_theta=args.rope_theta)
    result = evaluate_needle(model, tokenizer, config, seq_algo=args.parallel_mode, output_dir=output_dir,
                             device=device, haystack_dir=args.haystack_dir, model_name=model_name)
    if rank == 0:
        print(f"Average Accuracy: {result['average_accuracy']:.4f} ({len(result['cells'])} cells) -> {output_dir}")
    return result


if __name__ == "__main__":
    main()
