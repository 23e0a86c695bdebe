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
import functools

from easy_context.attention import SEQ_ALGOS
from easy_context.utils import HelpFormatter, add_flag


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval_ppl.py", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    a = functools.partial(add_flag, p)  # --dash-flags; the seed's -m/-d/-s/-f and --under_score spellings work too
    a("--model", "-m", action="append", required=True, help="model directory (or hub id); repeat for several")
    a("--dataset", "-d", default=None,
      help="a save_to_disk folder, data files or a hub id (an input_ids column is used as is)")
    a("--subset", "-s", default=None, help="the hub dataset's configuration name")
    a("--feature", "-f", default="text", help="the text column to tokenize (without an input_ids column)")
    a("--split", default="test", help="the dataset split")
    a("--synthetic", action="store_true", help="score synthetic essays of --max-tokens tokens")
    a("--min-tokens", type=int, default=256, help="shortest context, in tokens")
    a("--max-tokens", type=int, default=8192, help="longest context, in tokens")
    a("--tokens-step", type=int, default=None, help="step between contexts; default: double from --min-tokens")
    a("--dataset-min-tokens", type=int, default=None, help="keep only documents of at least this many tokens")
    a("--samples", type=int, default=None, help="score the first N documents (default: all; 1 with --synthetic)")
    a("--truncate", action="store_true", help="one window per document (its first tokens)")
    a("--sliding-window", type=int, default=256, help="stride between a document's windows, in tokens")
    a("--seq-algo", "--parallel-mode", dest="seq_algo", default="zigzag_ring_attn", choices=SEQ_ALGOS, metavar="ALGO",
      help=f"{' | '.join(SEQ_ALGOS)} (the seed's name: --parallel_mode)")
    a("--output-file", default="output/ppl.csv", help="the CSV plot.py reads (one row per --model)")
    a("--rope-theta", type=float, default=None, help="override the RoPE base of the model's config")
    a("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), bfloat16, float32...")
    a("--hide-progress", action="store_true", help="no progress bar")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def main(argv=None) -> list[tuple[str, list[float]]]:
    from easy_context.eval.common import init_distributed, load_model
    from easy_context.eval.ppl import context_lengths, evaluate_perplexity, load_documents, write_csv

    args = parse_args(argv)
    lengths = context_lengths(args.min_tokens, args.max_tokens, args.tokens_step)
    rank, world, device = init_distributed()
    if world == 1 and args.seq_algo != "data_parallel":  # one process: the model's own attention is the same
        print(f"single process: running {args.seq_algo} as data_parallel (launch with torchrun/accelerate)")
        args.seq_algo = "data_parallel"
    rows = []
    for path in args.model:
        model, tokenizer = load_model(path, args.seq_algo, device, dtype=args.dtype, rope_theta=args.rope_theta)
        documents = load_documents(tokenizer, dataset=args.dataset, subset=args.subset, split=args.split,
                                   feature=args.feature, samples=args.samples, min_tokens=args.dataset_min_tokens,
                                   synthetic_tokens=args.max_tokens if args.synthetic else None)
        ppls = evaluate_perplexity(model, documents, lengths, sliding_window=args.sliding_window,
                                   truncate=args.truncate, seq_algo=args.seq_algo, device=device,
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
    from easy_context.eval.common import close_distributed

    try:
        main()
    finally:
        close_distributed()
