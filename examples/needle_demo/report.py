"""The needle demo's record and report: ``run.json`` (:func:`record`), the goals against the evaluations' files
(:func:`summary`), and the published folder with its README.md (:func:`publish`, :func:`write_report`)."""
from __future__ import annotations

import json
import math
import os
import shutil


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
             "Written by `python -m examples.needle_demo publish` from this run's output files "
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
