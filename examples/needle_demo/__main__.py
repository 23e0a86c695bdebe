"""``python -m examples.needle_demo {prepare,record,summary,publish,report} ...``: the demo's flags (see the package
docstring); ``train_scripts/needle_demo.sh`` calls them around train.py and the evaluations."""
from __future__ import annotations

import argparse
import sys

from . import __doc__ as package_doc
from . import report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m examples.needle_demo", description=package_doc.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("prepare", help="tokenizer, untrained model, corpora, leak check")
    a.add_argument("--output-dir", required=True)
    for flag, default in (("hidden-size", 512), ("intermediate-size", 1408), ("num-layers", 8), ("num-heads", 8),
                          ("num-kv-heads", 4), ("short-length", 2048), ("short-rows", 1024), ("short-facts", 8),
                          ("short-questions", 8), ("long-length", 65536), ("long-rows", 64), ("long-facts", 32),
                          ("long-questions", 32), ("key-length", 3), ("value-digits", 4), ("ppl-length", 65536),
                          ("ppl-docs", 4), ("eval-samples", 4), ("eval-distractors", 4), ("eval-seed", 24242424),
                          ("seed", 0), ("num-proc", 1), ("mid-length", 2048), ("mid-rows", 0), ("mid-facts", 16)):
        a.add_argument(f"--{flag}", type=int, default=default)
    a.add_argument("--rope-theta", type=float, default=10000.0)
    a.add_argument("--other-labels", type=float, default=0.0,
                   help="share of filler tokens with a loss (answers always; facts and questions never)")
    a.add_argument("--near-keys", type=float, default=0.0,
                   help="share of the keys of the extension's rows (mid and long) drawn one letter away from another "
                   "key of the row (hard negatives: facts.draw_facts); the short rows have none")
    a.add_argument("--long-packed", type=float, default=0.0,
                   help="share of the long rows made of whole --mid-length documents (--mid-facts facts each, "
                   "attending only to themselves), spread evenly among the others; 0: every long row is one document")
    c = sub.add_parser("record", help="run.json: started by stage 0, added to by every later invocation")
    c.add_argument("--output-dir", required=True)
    c.add_argument("--stages", required=True, help="the stages this invocation runs, e.g. \"3 4 5\"")
    c.add_argument("--settings", nargs="*", default=[],
                   help="names of environment variables to record (the script's settings)")
    s = sub.add_parser("summary", help="accuracies, perplexities and goals from the run's output files")
    s.add_argument("--output-dir", required=True)
    s.add_argument("--short-length", type=int, required=True)
    s.add_argument("--long-length", type=int, required=True)
    s.add_argument("--ppl-tolerance", type=float, default=1.05,
                   help="'flat or falling': the extended model's largest perplexity over its shortest context's")
    u = sub.add_parser("publish", help="the run's images and numbers, and a report of them, into one folder")
    u.add_argument("--output-dir", required=True)
    u.add_argument("--to", required=True, help="e.g. docs/needle_demo, or the run's publish/ folder")
    r = sub.add_parser("report", help="rewrite a published folder's README.md from its own files")
    r.add_argument("folder")
    args = p.parse_args(argv)
    if args.command == "publish":
        report.publish(args)
    elif args.command == "report":
        print(f"wrote {report.write_report(args.folder)}")
    elif args.command == "record":
        report.record(args.output_dir, args.stages, args.settings)
    elif args.command == "prepare":
        from .prepare import prepare  # the one step that needs torch, transformers and datasets

        leaks = prepare(args)
        if leaks["leak"]:
            print(f"prepare: eval keys found in the training data, see {args.output_dir}/data/leak_check.json",
                  file=sys.stderr)
            sys.exit(1)
    else:
        report.summary(args)


if __name__ == "__main__":
    main()
