"""Perplexity-vs-context plot from one or more CSVs written by eval_ppl.py (or the seed's).

    python plot.py output/ppl.csv [more.csv ...] --xmax 1048576 --ymin 2 --ymax 10 [--output docs/ppl] [--log]

Writes ``<output>.png`` and ``<output>.pdf`` (default output: the first CSV's path). Logic:
easy_context/eval/ppl.py:plot_perplexity.
"""
from __future__ import annotations

import argparse


def main(argv=None) -> list[str]:
    from easy_context.eval.ppl import plot_perplexity

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("csv", nargs="+")
    p.add_argument("--output", default=None, help="path prefix for .png/.pdf (default: the first CSV path)")
    p.add_argument("--xmin", type=float, default=0)
    p.add_argument("--xmax", type=float, default=None)
    p.add_argument("--ymin", type=float, default=None)
    p.add_argument("--ymax", type=float, default=None)
    p.add_argument("--log", action="store_true", help="both axes logarithmic (rows orders of magnitude apart)")
    args = p.parse_args(argv)
    written = plot_perplexity(args.csv, args.output or args.csv[0], xlim=(args.xmin, args.xmax),
                              ylim=(args.ymin, args.ymax), log=args.log)
    print("wrote " + " ".join(written))
    return written


if __name__ == "__main__":
    main()
