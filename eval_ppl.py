"""Perplexity vs context length with a sequence-parallel forward (one process per GPU).

    accelerate launch --num_processes 8 eval_ppl.py --model PATH --parallel-mode zigzag_ring_attn \
        --dataset emozilla/pg19-test-tokenized --min-tokens 32768 --max-tokens 1048576 --tokens-step 32768 \
        --samples 5 --truncate --output-file output/ppl.csv
    python plot.py output/ppl.csv --xmax 1048576 --ymin 2 --ymax 10

CPU demo (gloo, synthetic documents): ``torchrun --nproc_per_node 2 eval_ppl.py --model PATH --synthetic
--max-tokens 2048 ...``. ``--dataset``: a ``save_to_disk`` folder, data files, or a hub id; an ``input_ids`` column
is used as is, else ``--feature`` is tokenized. Writes the CSV plot.py reads (one row per ``--model``).
Logic: easy_context/eval/ppl.py.
"""
from __future__ import annotations

import argparse

from easy_context.sharding import SEQ_ALGOS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-m", "--model", action="append", required=True, help="model directory (repeat for several)")
    p.add_argument("-d", "--dataset", default=None)
    p.add_argument("-s", "--subset", default=None)
    p.add_argument("-f", "--feature", default="text")
    p.add_argument("--split", default="test")
    p.add_argument("--synthetic", action="store_true", help="score synthetic essays of --max-tokens tokens")
    p.add_argument("--min-tokens", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--tokens-step", type=int, default=None, help="default: double from --min-tokens")
    p.add_argument("--dataset-min-tokens", type=int, default=None)
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--truncate", action="store_true", help="one window per document (its first tokens)")
    p.add_argument("--sliding-window", type=int, default=256)
    p.add_argument("--parallel-mode", "--parallel_mode", default="zigzag_ring_attn", choices=SEQ_ALGOS)
    p.add_argument("--output-file", default="output/ppl.csv")
    p.add_argument("--rope-theta", type=float, default=None)
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), bfloat16, float32...")
    p.add_argument("--hide-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> list[tuple[str, list[float]]]:
    from easy_context.eval.common import init_distributed, load_model
    from easy_context.eval.ppl import context_lengths, evaluate_perplexity, load_documents, write_csv

    args = parse_args(argv)
    lengths = context_lengths(args.min_tokens, args.max_tokens, args.tokens_step)
    rank, world, device = init_distributed()
    if world == 1 and args.parallel_mode != "data_parallel":  # one process: the model's own attention is the same
        print(f"single process: running {args.parallel_mode} as data_parallel (launch with torchrun/accelerate)")
        args.parallel_mode = "data_parallel"
    rows = []
    for path in args.model:
        model, tokenizer = load_model(path, args.parallel_mode, device, dtype=args.dtype, rope_theta=args.rope_theta)
        documents = load_documents(tokenizer, dataset=args.dataset, subset=args.subset, split=args.split,
                                   feature=args.feature, samples=args.samples, min_tokens=args.dataset_min_tokens,
                                   synthetic_tokens=args.max_tokens if args.synthetic else None)
        ppls = evaluate_perplexity(model, documents, lengths, sliding_window=args.sliding_window,
                                   truncate=args.truncate, seq_algo=args.parallel_mode, device=device,
                                   bos_id=tokenizer.bos_token_id, progress=not args.hide_progress, desc=path)
        if rank == 0:
            print(", ".join(f"{n}={p:.4f}" for n, p in zip(lengths, ppls)))
        rows.append((path, ppls))
        del model
    if rank == 0:
        write_csv(args.output_file, lengths, rows)
        print(f"wrote {args.output_file}")
    return rows


if __name__ == "__main__":
    main()
