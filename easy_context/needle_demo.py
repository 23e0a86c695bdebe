"""The needle demo's own steps (``train_scripts/needle_demo.sh`` runs them around train.py, eval_needle.py,
eval_ppl.py and plot.py): ``prepare`` writes the tokenizer, the untrained model, the corpora and the leak check;
``summary`` reads the evaluations' output files and states the demo's goals against them.

    python -m easy_context.needle_demo prepare --output-dir runs/needle_demo [sizes ...]
    python -m easy_context.needle_demo summary --output-dir runs/needle_demo --short-length 2048 --long-length 65536

``prepare`` writes under ``--output-dir``:

* ``init/``: a random Llama of the given shape with the byte tokenizer (``make_tokenizer("bytes")``: token id = byte
  value, ``<s>`` = 256, ``</s>`` = 257), a ``--model`` folder for train.py and the evaluations;
* ``data/train_warm`` (with ``--warm-rows``), ``data/train_short``, ``data/train_long``: ``save_to_disk`` rows of
  :func:`easy_context.eval.facts.fact_rows`
  (``input_ids`` and ``labels``) from the *train* key space; ``data/ppl``: documents for eval_ppl.py from the *eval*
  key space (``input_ids`` without BOS: eval_ppl adds it per window);
* ``data/leak_check.json``: every run of capitals in the decoded training rows against every key eval_needle.py
  will ask (the needles and distractors of ``--eval-samples``/``--eval-distractors``/``--eval-seed``) and every key
  of the perplexity documents; any overlap stops the demo (exit status 1).

Nothing here reads a number written by hand: ``summary`` computes everything from ``results.json`` / the CSVs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys


def _generate(shards: list[int], tokenizer, num_rows: int, num_shards: int, with_labels: bool, kw: dict):
    """Rows of :func:`fact_rows` for ``shards`` (shard ``i`` of ``num_shards``: its share of ``num_rows``, seed
    ``1000 * kw["seed"] + i``), with their keys; ``with_labels=False``: no labels and no BOS (eval_ppl.py documents:
    it prepends the BOS per window)."""
    from .eval.facts import fact_rows

    for shard in shards:
        rows = num_rows * (shard + 1) // num_shards - num_rows * shard // num_shards
        for row in fact_rows(tokenizer, num_rows=rows, **{**kw, "seed": 1000 * kw["seed"] + shard}):
            if not with_labels:
                row = {"input_ids": row["input_ids"][1:], "keys": row["keys"]}
            yield row


def _write_rows(tokenizer, path: str, *, num_rows: int, num_proc: int, with_labels: bool = True, **kw):
    """Write :func:`fact_rows` (columns ``input_ids``, ``labels``, ``keys``) to a ``save_to_disk`` folder, generated in
    ``num_proc`` processes, under ``path.tmp`` and renamed when complete."""
    from datasets import Dataset, Features, Sequence, Value

    ids = Sequence(Value("int32"))
    columns = {"input_ids": ids} | ({"labels": ids} if with_labels else {}) | {"keys": Sequence(Value("string"))}
    shards = max(1, min(num_proc, num_rows))
    cache = path + ".cache"
    data = Dataset.from_generator(_generate, features=Features(columns), cache_dir=cache,
                                  num_proc=shards if shards > 1 else None,
                                  gen_kwargs={"shards": list(range(shards)), "tokenizer": tokenizer,
                                              "num_rows": num_rows, "num_shards": shards,
                                              "with_labels": with_labels, "kw": kw})
    shutil.rmtree(path + ".tmp", ignore_errors=True)
    data.save_to_disk(path + ".tmp")
    del data
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(path + ".tmp", path)


def _texts(tokenizer, path: str, num_proc: int):
    """The decoded text of every row of a saved dataset (read back from disk, decoded in ``num_proc`` processes)."""
    from datasets import load_from_disk

    data = load_from_disk(path)
    parallel = num_proc if num_proc > 1 and len(data) >= 4 * num_proc else None
    texts = data.map(lambda b: {"text": tokenizer.batch_decode(b["input_ids"], skip_special_tokens=True)},
                     batched=True, batch_size=64, remove_columns=data.column_names, num_proc=parallel,
                     keep_in_memory=True)
    return texts["text"]


def prepare(args) -> dict:
    """Tokenizer, untrained model, corpora and leak check (see the module docstring); returns the leak report."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from .eval.facts import find_key_leaks
    from .eval.needle import NeedleConfig
    from .eval.tiny import make_tokenizer

    out = args.output_dir
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    tokenizer = make_tokenizer("bytes")
    config = LlamaConfig(hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                         num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
                         num_key_value_heads=args.num_kv_heads, vocab_size=len(tokenizer),
                         max_position_embeddings=args.short_length, rope_theta=args.rope_theta,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(os.path.join(out, "init"))
    tokenizer.save_pretrained(os.path.join(out, "init"))
    params = sum(p.numel() for p in model.parameters())
    task = dict(key_length=args.key_length, value_digits=args.value_digits, num_proc=args.num_proc)
    # each corpus its own seed; the eval needles (and their haystack) use eval_needle.py's --seed
    corpora = [
        ("train_short", args.short_length, args.short_rows, args.short_facts, args.short_questions, args.seed + 1),
        ("train_long", args.long_length, args.long_rows, args.long_facts, args.long_questions, args.seed + 2)]
    if args.warm_rows:  # the curriculum's first step: shorter rows, where attention finds the facts sooner
        corpora.insert(0, ("train_warm", args.warm_length, args.warm_rows, args.warm_facts, args.warm_facts,
                           args.seed + 4))
    for name, length, rows, facts, questions, seed in corpora:
        _write_rows(tokenizer, os.path.join(out, "data", name), num_rows=rows, seq_length=length, split="train",
                    num_facts=facts, num_questions=questions, other_labels=args.other_labels, seed=seed, **task)
    _write_rows(tokenizer, os.path.join(out, "data", "ppl"), num_rows=args.ppl_docs, with_labels=False,
                seq_length=args.ppl_length + 1, split="eval", num_facts=args.eval_distractors + 1, num_questions=1,
                seed=args.seed + 3, **task)
    # the leak check: every key eval_needle.py will ask or show (needles and distractors) and every key of the
    # perplexity documents, against every run of capitals in the training text as written to disk
    needle = NeedleConfig(num_samples=args.eval_samples, num_distractor=args.eval_distractors, task="kv",
                          key_length=args.key_length, rnd_number_digits=args.value_digits, seed=args.eval_seed)
    eval_keys = set()
    for sample in range(args.eval_samples):
        key, _, distractors = needle.needles(sample)
        eval_keys |= {key} | {k for k, _ in distractors}
    from datasets import load_from_disk

    eval_keys |= {k for keys in load_from_disk(os.path.join(out, "data", "ppl"))["keys"] for k in keys}
    report = {"eval_keys": len(eval_keys), "model_parameters": params}
    trained = [name for name, *_ in corpora]
    for name in trained:
        found = find_key_leaks(_texts(tokenizer, os.path.join(out, "data", name), args.num_proc), eval_keys)
        report[name] = {"rows": found["texts"], "distinct_keys_in_text": found["keys_seen"],
                        "eval_keys_found": found["leaks"]}
    report["leak"] = any(report[n]["eval_keys_found"] for n in trained)
    with open(os.path.join(out, "data", "leak_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"prepare: {params / 1e6:.2f}M parameters; leak check over {report['eval_keys']} eval keys: "
          f"{'LEAK' if report['leak'] else 'none found'} ("
          f"{' + '.join(str(report[n]['distinct_keys_in_text']) for n in trained)} distinct training keys) -> {out}")
    return report


def _cells(path: str) -> list[dict]:
    with open(os.path.join(path, "results.json")) as f:
        return json.load(f)["cells"]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _ppl(path: str) -> list[dict]:
    """``{context length: perplexity}`` of each row of an eval_ppl.py CSV, in order."""
    import csv

    with open(path, newline="") as f:
        header, *rows = list(csv.reader(f))
    return [{int(n): float(v) for n, v in zip(header[1:], row[1:])} for row in rows]


def summary(args) -> dict:
    """Accuracies per model and grid part, perplexities, and the demo's goals, from the run's files; writes
    ``summary.json`` and prints it."""
    out, short, long_ = args.output_dir, args.short_length, args.long_length
    acc = {}
    for name in ("init", "short", "long"):
        cells = _cells(os.path.join(out, f"needle_{name}"))
        acc[name] = {"all": _mean(float(c["score"]) for c in cells),
                     "within_short": _mean(float(c["score"]) for c in cells if c["context_length"] <= short),
                     "beyond_short": _mean(float(c["score"]) for c in cells if c["context_length"] > short),
                     "within_long": _mean(float(c["score"]) for c in cells if c["context_length"] <= long_),
                     "by_length": {str(n): _mean(float(c["score"]) for c in cells if c["context_length"] == n)
                                   for n in sorted({c["context_length"] for c in cells})}}
    ppl = dict(zip(("short", "long"), _ppl(os.path.join(out, "ppl.csv"))))  # eval_ppl.py --model short --model long
    long_ppl = [v for n, v in sorted(ppl["long"].items()) if n <= long_ and math.isfinite(v)]
    rise = max(long_ppl) / long_ppl[0] if long_ppl else float("nan")
    goals = {
        "extended_accuracy_within_long >= 0.95": acc["long"]["within_long"] >= 0.95,
        "short_model_accuracy_beyond_short <= 0.2": acc["short"]["beyond_short"] <= 0.2,
        f"extended_ppl_max / ppl_at_shortest <= {args.ppl_tolerance}": rise <= args.ppl_tolerance,
    }
    result = {"short_length": short, "long_length": long_, "accuracy": acc, "perplexity": ppl,
              "extended_ppl_max_over_shortest": rise, "goals": goals}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(result, f, indent=1)
    for name in ("init", "short", "long"):
        a = acc[name]
        print(f"needle accuracy {name:5s}: all {a['all']:.3f}  <= {short}: {a['within_short']:.3f}  > {short}: "
              f"{a['beyond_short']:.3f}  <= {long_}: {a['within_long']:.3f}")
    for name in ("short", "long"):
        print(f"perplexity {name:5s}: " + ", ".join(f"{n}={v:.3f}" for n, v in sorted(ppl[name].items())))
    for goal, met in goals.items():
        print(f"goal {'MET' if met else 'NOT MET'}: {goal}")
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("prepare", help="tokenizer, untrained model, corpora, leak check")
    a.add_argument("--output-dir", required=True)
    for flag, default in (("hidden-size", 512), ("intermediate-size", 1408), ("num-layers", 8), ("num-heads", 8),
                          ("num-kv-heads", 4), ("short-length", 2048), ("short-rows", 1024), ("short-facts", 8),
                          ("short-questions", 8), ("long-length", 65536), ("long-rows", 64), ("long-facts", 32),
                          ("long-questions", 32), ("key-length", 3), ("value-digits", 4), ("ppl-length", 65536),
                          ("ppl-docs", 4), ("eval-samples", 4), ("eval-distractors", 4), ("eval-seed", 24242424),
                          ("seed", 0), ("num-proc", 1), ("warm-length", 512), ("warm-rows", 0), ("warm-facts", 4)):
        a.add_argument(f"--{flag}", type=int, default=default)
    a.add_argument("--rope-theta", type=float, default=10000.0)
    a.add_argument("--other-labels", type=float, default=0.0,
                   help="share of filler tokens with a loss (answers always; facts and questions never)")
    s = sub.add_parser("summary", help="accuracies, perplexities and goals from the run's output files")
    s.add_argument("--output-dir", required=True)
    s.add_argument("--short-length", type=int, required=True)
    s.add_argument("--long-length", type=int, required=True)
    s.add_argument("--ppl-tolerance", type=float, default=1.05,
                   help="'flat or falling': the extended model's largest perplexity over its shortest context's")
    args = p.parse_args(argv)
    if args.command == "prepare":
        report = prepare(args)
        if report["leak"]:
            print(f"prepare: eval keys found in the training data, see {args.output_dir}/data/leak_check.json",
                  file=sys.stderr)
            sys.exit(1)
    else:
        summary(args)


if __name__ == "__main__":
    main()
