"""The needle demo's own steps (``train_scripts/needle_demo.sh`` runs them around train.py, eval_needle.py,
eval_ppl.py and plot.py): ``prepare`` writes the tokenizer, the untrained model, the corpora and the leak check;
``summary`` reads the evaluations' output files and states the demo's goals against them; ``publish`` copies the
images and numbers into one folder with a report of them (README.md), for ``docs/``.

    python -m easy_context.needle_demo record --output-dir runs/needle_demo --stages "0 1 2" --settings SHORT ...
    python -m easy_context.needle_demo prepare --output-dir runs/needle_demo [sizes ...]
    python -m easy_context.needle_demo summary --output-dir runs/needle_demo --short-length 256 --long-length 65536
    python -m easy_context.needle_demo publish --output-dir runs/needle_demo --to docs/needle_demo

``prepare`` writes under ``--output-dir``:

* ``init/``: a random Llama of the given shape with the byte tokenizer (``make_tokenizer("bytes")``: token id = byte
  value, ``<s>`` = 256, ``</s>`` = 257), a ``--model`` folder for train.py and the evaluations;
* ``data/train_short``, ``data/train_mid`` (with ``--mid-rows``), ``data/train_long``: ``save_to_disk`` rows of
  :func:`easy_context.eval.facts.fact_rows` (``input_ids`` and ``labels``; the long rows also ``position_ids``
  with ``--long-packed``) from the *train* key space; ``data/ppl``: documents for eval_ppl.py from the *eval* key
  space (``input_ids`` without BOS: eval_ppl adds it per window);
* ``data/leak_check.json``: every run of capitals in the decoded training rows against every key eval_needle.py
  will ask (the needles and distractors of ``--eval-samples``/``--eval-distractors``/``--eval-seed``) and every key
  of the perplexity documents; any overlap stops the demo (exit status 1).

``record`` writes ``run.json``: the date, the device, the commit and the script's settings (``--settings``: the
names of the environment variables it exported), and each later invocation's stages and changed settings.

Nothing here reads a number written by hand: ``summary`` computes everything from ``results.json`` / the CSVs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys


def _generate(shards: list[int], tokenizer, num_rows: int, num_shards: int, with_labels: bool, kw: dict,
              packed: dict | None = None):
    """Rows of :func:`fact_rows` for ``shards`` (shard ``i`` of ``num_shards``: its share of ``num_rows``, seed
    ``1000 * kw["seed"] + i``), with their keys; ``with_labels=False``: no labels and no BOS (eval_ppl.py documents:
    it prepends the BOS per window).

    ``packed`` (``{"share", "doc_length", "doc_facts"}``): that share of the rows, spread evenly, is made of whole
    documents of ``doc_length`` tokens (fact rows of their own, ``doc_facts`` facts and questions each), with
    ``position_ids`` restarting at 0 at each (train.py then lets each attend only to itself); every row gets
    ``position_ids``."""
    from .eval.facts import fact_rows

    for shard in shards:
        first, end = num_rows * shard // num_shards, num_rows * (shard + 1) // num_shards
        seed = 1000 * kw["seed"] + shard
        is_packed = [bool(packed) and int((i + 1) * packed["share"]) > int(i * packed["share"])
                     for i in range(first, end)]  # row i of the whole set; the packed rows spread evenly
        rows = fact_rows(tokenizer, num_rows=is_packed.count(False), **{**kw, "seed": seed})
        if any(is_packed):
            per_row = kw["seq_length"] // packed["doc_length"]
            docs = fact_rows(tokenizer, num_rows=is_packed.count(True) * per_row,
                             **{**kw, "seq_length": packed["doc_length"], "num_facts": packed["doc_facts"],
                                "num_questions": packed["doc_facts"], "seed": seed + 500})
        for row_is_packed in is_packed:
            if row_is_packed:
                parts = [next(docs) for _ in range(per_row)]
                row = {k: [x for part in parts for x in part[k]] for k in ("input_ids", "labels", "keys")}
                row["position_ids"] = list(range(packed["doc_length"])) * per_row
            else:
                row = next(rows)
                if packed:
                    row["position_ids"] = list(range(len(row["input_ids"])))
            if not with_labels:
                row = {"input_ids": row["input_ids"][1:], "keys": row["keys"]}
            yield row


def _write_rows(tokenizer, path: str, *, num_rows: int, num_proc: int, with_labels: bool = True,
                packed: dict | None = None, **kw):
    """Write :func:`fact_rows` (columns ``input_ids``, ``labels``, ``keys``; ``position_ids`` with ``packed``, see
    :func:`_generate`) to a ``save_to_disk`` folder, generated in ``num_proc`` processes, under ``path.tmp`` and
    renamed when complete."""
    from datasets import Dataset, Features, Sequence, Value

    ids = Sequence(Value("int32"))
    columns = {"input_ids": ids} | ({"labels": ids} if with_labels else {}) | {"keys": Sequence(Value("string"))}
    columns |= {"position_ids": ids} if packed else {}
    shards = max(1, min(num_proc, num_rows))
    cache = path + ".cache"
    data = Dataset.from_generator(_generate, features=Features(columns), cache_dir=cache,
                                  num_proc=shards if shards > 1 else None,
                                  gen_kwargs={"shards": list(range(shards)), "tokenizer": tokenizer,
                                              "num_rows": num_rows, "num_shards": shards,
                                              "with_labels": with_labels, "kw": kw, "packed": packed})
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
    # (name, length, rows, facts, questions, seed, near keys, packed): the short stage's rows have no near misses
    # (they stall a model still looking for the lookup); the extension's (mid, long) have --near-keys; a share of the
    # long rows (--long-packed) can be made of mid-length documents, as the mid rows are
    if args.long_packed and (not 0 < args.long_packed <= 1 or args.long_length % args.mid_length):
        raise ValueError(f"--long-packed {args.long_packed} needs a share in (0, 1] and a --long-length "
                         f"({args.long_length}) that is a multiple of --mid-length ({args.mid_length})")
    packed = {"share": args.long_packed, "doc_length": args.mid_length, "doc_facts": args.mid_facts} \
        if args.long_packed else None
    corpora = [
        ("train_short", args.short_length, args.short_rows, args.short_facts, args.short_questions, args.seed + 1,
         0.0, None),
        ("train_mid", args.mid_length, args.mid_rows, args.mid_facts, args.mid_facts, args.seed + 4, args.near_keys,
         None),
        ("train_long", args.long_length, args.long_rows, args.long_facts, args.long_questions, args.seed + 2,
         args.near_keys, packed)]
    corpora = [c for c in corpora if c[2]]  # no mid stage: no mid rows
    for name, length, rows, facts, questions, seed, near, pack in corpora:
        _write_rows(tokenizer, os.path.join(out, "data", name), num_rows=rows, seq_length=length, split="train",
                    num_facts=facts, num_questions=questions, other_labels=args.other_labels, near_keys=near,
                    seed=seed, packed=pack, **task)
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
    for name, length, *_ in corpora:
        found = find_key_leaks(_texts(tokenizer, os.path.join(out, "data", name), args.num_proc), eval_keys)
        report[name] = {"rows": found["texts"], "seq_length": length, "distinct_keys_in_text": found["keys_seen"],
                        "eval_keys_found": found["leaks"]}
    report["leak"] = any(report[n]["eval_keys_found"] for n in trained)
    with open(os.path.join(out, "data", "leak_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"prepare: {params / 1e6:.2f}M parameters; leak check over {report['eval_keys']} eval keys: "
          f"{'LEAK' if report['leak'] else 'none found'} ("
          f"{' + '.join(str(report[n]['distinct_keys_in_text']) for n in trained)} distinct training keys) -> {out}")
    return report


def record(out: str, stages: str, names: list[str]) -> dict:
    """``run.json``, written at the start of every invocation of the script: an invocation with stage 0 starts it
    (the date, the device, the commit and the script's settings: ``names``, environment variables it exported); a
    later one (``STAGES="3 4 5"``, say) adds its own date, device, commit, stages and the settings it changed, so a
    stage re-run with other settings is on record. Returns the record."""
    import datetime
    import subprocess

    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    commit = os.environ.get("EASY_CONTEXT_COMMIT")  # given where the tree is a copy without .git (a lent GPU)
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    now = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "device": f"{n} x {torch.cuda.get_device_name(0)}" if n else "CPU", "commit": commit}
    settings = {k: os.environ.get(k) for k in names}
    path = os.path.join(out, "run.json")
    if "0" in stages.split():
        run = {**now, "settings": settings, "invocations": [{**now, "stages": stages}]}
    elif not os.path.exists(path):
        raise SystemExit(f"{path} is missing: stages {stages} continue a run, whose stage 0 starts it "
                         f"(STAGES=\"0 ...\")")
    else:
        with open(path) as f:
            run = json.load(f)
        changed = {k: v for k, v in settings.items() if run["settings"].get(k) != v}
        run.setdefault("invocations", []).append({**now, "stages": stages, "changed": changed})
    os.makedirs(out, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(run, f, indent=1)
    os.replace(path + ".tmp", path)
    return run


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
    with open(os.path.join(out, "data", "leak_check.json")) as f:
        leak = json.load(f)
    tokens = {name: r["rows"] * r["seq_length"] for name, r in leak.items()
              if isinstance(r, dict) and "seq_length" in r}  # each row is trained on once
    result = {"short_length": short, "long_length": long_, "model_parameters": leak["model_parameters"],
              "tokens_trained": tokens, "accuracy": acc, "perplexity": ppl,
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


PUBLISHED = {"needle_init/heatmap.png": "heatmap_init.png", "needle_short/heatmap.png": "heatmap_short.png",
             "needle_long/heatmap.png": "heatmap_long.png", "ppl.png": "ppl.png", "ppl.csv": "ppl.csv",
             "summary.json": "summary.json", "run.json": "run.json", "stage_times.tsv": "stage_times.tsv",
             "data/leak_check.json": "leak_check.json", "needle_short/samples.jsonl": "samples_short.jsonl",
             "needle_long/samples.jsonl": "samples_long.jsonl"}
STAGE_NAMES = {"prepare": "0 prepare (data, leak check, untrained grid)", "short": "1 train at the short length",
               "eval_short": "2 grid of the short model",
               "long": "3 extension (raised RoPE base): the mid length, then sequence parallel at the long length",
               "eval_long": "4 grid, perplexity and plot of the extended model"}


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def _size(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def by_distance(samples_path: str, short: int) -> dict[str, tuple[float, int]]:
    """Accuracy by how far before the question the needle sits, about ``(1 - depth) x context length`` tokens
    (the needle goes to the first sentence boundary at or after its depth): up to the short length, up to twice it,
    and beyond. ``{bucket: (accuracy, samples)}`` from an eval_needle.py ``samples.jsonl``; a grid cell of a long
    context whose needle sits near the question tests a short distance."""
    edges = [(f"≤ {_size(short)}", short), (f"{_size(short)}-{_size(2 * short)}", 2 * short),
             (f"> {_size(2 * short)}", math.inf)]
    def bucket(s: dict) -> str:
        distance = (1 - s["depth_percent"] / 100) * s["context_length"]
        return next(name for name, edge in edges if distance <= edge)

    return _accuracy_by(samples_path, bucket, [name for name, _ in edges])


def by_depth(samples_path: str) -> dict[str, tuple[float, int]]:
    """Accuracy by the needle's depth over all context lengths, ``{"0%": (accuracy, samples), ...}``, from an
    eval_needle.py ``samples.jsonl``: a model that loses one position of the context (its first sentence, say) shows
    it here, where every length's average hides it."""
    by_percent = _accuracy_by(samples_path, lambda s: s["depth_percent"])
    return {f"{d:g}%": by_percent[d] for d in sorted(by_percent)}


def _accuracy_by(samples_path: str, group, groups: list | None = None) -> dict:
    """``{group(sample): (accuracy, samples)}`` over an eval_needle.py ``samples.jsonl``; ``groups``: the groups to
    report, in order, also those without samples."""
    hits = {g: [] for g in groups or ()}
    with open(samples_path) as f:
        for line in f:
            s = json.loads(line)
            hits.setdefault(group(s), []).append(bool(s["correct"]))
    return {g: (_mean(v), len(v)) for g, v in hits.items()}


def _table(intro: str, rows: dict[str, dict[str, tuple[float, int]]], cell) -> list[str]:
    """Markdown lines: ``intro``, then a table of one row per model of ``rows`` (its groups as columns, each
    ``cell(accuracy, samples)``)."""
    columns = list(next(iter(rows.values())))
    return (["", intro, "", "| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
            + [f"| {name} | " + " | ".join(cell(*row[c]) for c in columns) + " |" for name, row in rows.items()])


def report_markdown(summary_: dict, run: dict, stage_times: list[tuple[str, float]],
                    distances: dict[str, dict[str, tuple[float, int]]] | None = None,
                    depths: dict[str, dict[str, tuple[float, int]]] | None = None) -> str:
    """The run's report (``publish``'s README.md): every figure read from the run's files; ``distances`` and
    ``depths``: :func:`by_distance` and :func:`by_depth` of each model's samples."""
    acc, ppl = summary_["accuracy"], summary_["perplexity"]
    short, long_ = summary_["short_length"], summary_["long_length"]
    settings = run.get("settings", {})
    gpus = int(settings.get("GPUS") or 1)
    wall = sum(t for _, t in stage_times)
    lengths = list(acc["short"]["by_length"])
    lines = [f"# Needle demo run, {run['date']}, {run['device']} (commit {run['commit']})", "",
             "Written by `python -m easy_context.needle_demo publish` from this run's output files "
             "(`train_scripts/needle_demo.sh`, settings below); nothing here is typed by hand.", "",
             "| heatmap, untrained | after training at " + _size(short) + " | after extension to " + _size(long_)
             + " |", "|---|---|---|",
             "| ![](heatmap_init.png) | ![](heatmap_short.png) | ![](heatmap_long.png) |", "",
             "![perplexity vs context](ppl.png)", "",
             f"Model: {summary_['model_parameters'] / 1e6:.2f}M parameters (Llama, byte tokenizer). Tokens trained: "
             + ", ".join(f"{name} {_count(n)}" for name, n in summary_["tokens_trained"].items())
             + f" ({_count(sum(summary_['tokens_trained'].values()))} in all). Wall time {wall:.0f} s, "
             + (f"{gpus} processes on CPU." if run["device"] == "CPU" else
                f"{gpus} GPU(s) held throughout: {wall * gpus / 3600:.2f} GPU-hours."), "",
             "| stage | seconds |", "|---|---|"]
    lines += [f"| {STAGE_NAMES.get(name, name)} | {t:.0f} |" for name, t in stage_times]
    lines += ["", "Retrieval accuracy by context length (eval keys never in the training text: `leak_check.json`; "
              "every sample's expected and predicted answer: `samples_short.jsonl`, `samples_long.jsonl`):", "",
              "| model | " + " | ".join(_size(int(n)) for n in lengths) + f" | ≤ {_size(short)} | > {_size(short)} "
              f"| ≤ {_size(long_)} |", "|---" * (len(lengths) + 4) + "|"]
    for name in ("init", "short", "long"):
        a = acc[name]
        lines.append(f"| {name} | " + " | ".join(f"{a['by_length'][n]:.2f}" for n in lengths)
                     + f" | {a['within_short']:.2f} | {a['beyond_short']:.2f} | {a['within_long']:.2f} |")
    if distances:
        lines += _table("The same samples by the needle's distance before the question, about (1 − depth) × "
                        "context length (samples in brackets):", distances, lambda acc_, n: f"{acc_:.2f} ({n})")
    if depths:
        lines += _table("By the needle's depth, all context lengths together:", depths, lambda acc_, n: f"{acc_:.2f}")
    contexts = sorted({n for row in ppl.values() for n in row}, key=int)  # JSON keys: "1024", ...
    lines += ["", "Perplexity by context length:", "",
              "| model | " + " | ".join(_size(int(n)) for n in contexts) + " |", "|---" * (len(contexts) + 1) + "|"]
    for name, row in ppl.items():
        lines.append(f"| {name} | " + " | ".join(f"{row.get(n, float('nan')):.3f}" for n in contexts) + " |")
    lines += ["", "Goals:", ""] + [f"- {'MET' if met else 'NOT MET'}: `{goal}`"
                                   for goal, met in summary_["goals"].items()]
    lines += ["", "Settings:", "", "```"] + [f"{k}={v}" for k, v in settings.items()] + ["```"]
    invocations = run.get("invocations", [])
    done = set(invocations[0]["stages"].split()) if invocations else set()
    for later in invocations[1:]:  # the stages of each later invocation, and the settings it changed
        changed = ", ".join(f"{k}={v}" for k, v in later.get("changed", {}).items()) or "no setting changed"
        note = f" ({later['note']})" if later.get("note") else ""
        stages = later["stages"].split()
        verb = "ran again" if done & set(stages) else "ran in a later call"  # a re-run, or the run's second half
        done |= set(stages)
        lines += ["", f"Stages {later['stages']} {verb} on {later['date']} ({later['device']}, commit "
                  f"{later['commit']}): {changed}.{note}"]
    lines += [""]
    return "\n".join(lines)


def publish(args) -> str:
    """Copy the run's images and numbers (:data:`PUBLISHED`) under flat names into ``--to`` and write its report,
    README.md; returns the folder."""
    out, to = args.output_dir, args.to
    os.makedirs(to, exist_ok=True)
    for src, dst in PUBLISHED.items():
        shutil.copyfile(os.path.join(out, src), os.path.join(to, dst))
    write_report(to)
    print(f"published to {to}")
    return to


def write_report(folder: str) -> str:
    """(Re)write a published folder's README.md from the files in it; returns its path."""
    with open(os.path.join(folder, "summary.json")) as f:
        summary_ = json.load(f)
    with open(os.path.join(folder, "run.json")) as f:
        run = json.load(f)
    with open(os.path.join(folder, "stage_times.tsv")) as f:
        stage_times = [(cols[1], float(cols[2])) for cols in (line.split("\t") for line in f) if len(cols) == 3]
    samples = {name: os.path.join(folder, f"samples_{name}.jsonl") for name in ("short", "long")}
    distances = {name: by_distance(path, summary_["short_length"]) for name, path in samples.items()}
    depths = {name: by_depth(path) for name, path in samples.items()}
    path = os.path.join(folder, "README.md")
    with open(path, "w") as f:
        f.write(report_markdown(summary_, run, stage_times, distances, depths))
    return path


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
        publish(args)
    elif args.command == "report":
        print(f"wrote {write_report(args.folder)}")
    elif args.command == "record":
        record(args.output_dir, args.stages, args.settings)
    elif args.command == "prepare":
        report = prepare(args)
        if report["leak"]:
            print(f"prepare: eval keys found in the training data, see {args.output_dir}/data/leak_check.json",
                  file=sys.stderr)
            sys.exit(1)
    else:
        summary(args)


if __name__ == "__main__":
    main()
