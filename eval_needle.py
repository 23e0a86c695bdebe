"""Needle-in-a-haystack heatmap with a sequence-parallel forward (one process per GPU).

    accelerate launch --num_processes 8 eval_needle.py --model PATH --parallel_mode zigzag_ring_attn \
        --max_context_length 1000000 --min_context_length 50000 --context_interval 50000 \
        --depth_interval 0.1 --num_samples 2 --num_distractor 3 --output_dir output/needle

CPU (gloo): ``torchrun --nproc_per_node 2 eval_needle.py ...``. Writes ``results.csv`` (one row per cell, appended
as cells finish: a re-run skips them), ``results.json``, ``heatmap.png`` and ``settings.json`` (the model and the
settings the cells were computed with: a re-run with others is refused) to ``--output_dir``. Without
``--haystack_dir`` the haystack is built-in synthetic essays; pass a folder of ``*.txt`` (e.g. Paul Graham essays)
for real text. ``--task kv`` asks the needle demo's key -> value facts instead of the seed's magic numbers (keys
from the eval key space of easy_context/eval/facts.py; train_scripts/needle_demo.sh); ``--context-lengths 1024,2048``
lists the lengths (e.g. doubling) instead of min..max by interval. Logic: easy_context/eval/needle.py.
"""
from __future__ import annotations

import argparse
import functools
import os

from easy_context.attention import SEQ_ALGOS
from easy_context.eval.needle import NEEDLE_TASKS
from easy_context.eval.needle_grid import SETTINGS_FILE
from easy_context.utils import HelpFormatter, add_flag


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval_needle.py", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    a = functools.partial(add_flag, p)  # --dash-flags; the seed's --under_score spellings work too
    a("--model", required=True, help="local model directory (or hub id) for from_pretrained")
    a("--max-context-length", type=int, default=100000, help="longest context, in tokens (prompt included)")
    a("--min-context-length", type=int, default=1000, help="shortest context, in tokens")
    a("--context-interval", type=int, default=1000, help="step between context lengths")
    a("--depth-interval", type=float, default=0.1, help="step between needle depths (fractions of the haystack)")
    a("--num-samples", type=int, default=10, help="needles per cell (each with its own value)")
    a("--rnd-number-digits", type=int, default=7, help="digits of a needle's value")
    a("--haystack-dir", default=None, help="folder of *.txt essays (default: synthetic essays)")
    a("--num-distractor", type=int, default=0, help="distractor needles (other keys) per prompt")
    a("--task", choices=tuple(NEEDLE_TASKS), default="magic_number",
      help="magic_number: the seed's needles; kv: the needle demo's key -> value facts (easy_context/eval/facts.py)")
    a("--key-length", type=int, default=3, help="--task kv: capitals per key")
    a("--context-lengths", default=None, help="comma-separated context lengths (overrides min/max/interval)")
    a("--rope-theta", type=float, default=None, help="override the model's RoPE base")
    a("--seq-algo", "--parallel-mode", dest="seq_algo", default="zigzag_ring_attn", choices=SEQ_ALGOS, metavar="ALGO",
      help=f"{' | '.join(SEQ_ALGOS)} (the seed's name: --parallel_mode)")
    a("--output-dir", default=None,
      help="default: output/needle_<model name>. A re-run into it skips finished cells, and is refused when the "
           f"model or a setting that changes results differs from its {SETTINGS_FILE}")
    a("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), bfloat16, float32...")
    a("--seed", type=int, default=24242424, help="needle values, distractor depths and the synthetic haystack")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def main(argv=None) -> dict:
    from easy_context.eval.common import init_distributed, load_model
    from easy_context.eval.needle import NeedleConfig
    from easy_context.eval.needle_grid import evaluate_needle, rank0_decides, run_settings, settings_problem

    args = parse_args(argv)
    lengths = tuple(int(n) for n in args.context_lengths.split(",")) if args.context_lengths else ()
    config = NeedleConfig(min_context_length=min(lengths, default=args.min_context_length),
                          max_context_length=max(lengths, default=args.max_context_length),
                          context_interval=args.context_interval, depth_interval=args.depth_interval,
                          num_samples=args.num_samples, rnd_number_digits=args.rnd_number_digits,
                          num_distractor=args.num_distractor, seed=args.seed, task=args.task,
                          key_length=args.key_length, lengths=lengths)
    rank, world, device = init_distributed()
    if world == 1 and args.seq_algo != "data_parallel":  # one process: the model's own attention is the same
        print(f"single process: running {args.seq_algo} as data_parallel (launch with torchrun/accelerate)")
        args.seq_algo = "data_parallel"
    model_name = os.path.basename(args.model.rstrip("/"))
    output_dir = args.output_dir or os.path.join("output", f"needle_{model_name}")
    dtype = args.dtype if args.dtype != "auto" else "bfloat16" if device.type == "cuda" else "float32"
    settings = run_settings(config, model=args.model, haystack_dir=args.haystack_dir, rope_theta=args.rope_theta,
                            dtype=dtype)
    problem = rank0_decides(settings_problem(output_dir, settings) if rank == 0 else None)
    if problem:  # before the model is loaded
        raise ValueError(problem)
    model, tokenizer = load_model(args.model, args.seq_algo, device, dtype=dtype, rope_theta=args.rope_theta)
    result = evaluate_needle(model, tokenizer, config, seq_algo=args.seq_algo, output_dir=output_dir,
                             device=device, haystack_dir=args.haystack_dir, model_name=model_name, settings=settings)
    if rank == 0:
        print(f"Average Accuracy: {result['average_accuracy']:.4f} ({len(result['cells'])} cells) -> {output_dir}")
    return result


if __name__ == "__main__":
    import sys

    from easy_context.eval.common import close_distributed
    from easy_context.utils import rank_world

    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # a bad flag or output folder: one line (rank 0), exit status 2
        if rank_world()[0] == 0:
            print(f"eval_needle.py: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        close_distributed()
