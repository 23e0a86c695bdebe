"""The needle grid (the logic behind ``eval_needle.py``): every (context length, depth) cell of a
:class:`~easy_context.eval.needle.NeedleConfig` evaluated with :mod:`needle`'s prompts, results appended per cell and
resumed only under the same recorded settings, and the seed's heatmap.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import asdict

import torch

from .needle import NEEDLE_TASKS, RESULT_COLUMNS, NeedleConfig, SentenceBoundaries, answer_predictions, build_prompt

# A cell's result depends on its (length, depth) and on everything recorded here: the model (path and its files'
# sizes and times: retrained in place is another model), the needles (task, seed, digits, distractors, ...), the
# haystack, the RoPE base and the dtype. They are written to settings.json next to the results, and a re-run into the
# folder with other values is refused instead of reusing cells of another run. The grid itself (lengths, depths)
# may change: cells are keyed by it, so a larger grid runs only the new cells. The parallel mode and the number of
# processes may change too (the same forward, exactly).
SETTINGS_FILE = "settings.json"
GRID_FIELDS = ("min_context_length", "max_context_length", "context_interval", "depth_interval", "lengths")
_MODEL_FILES = (".safetensors", ".bin", ".json", ".model", ".jinja")


def _files(folder: str, suffixes) -> dict:
    """``{name: [size, mtime_ns]}`` of the files in ``folder`` (not below) ending in one of ``suffixes``."""
    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and name.endswith(tuple(suffixes)):
            st = os.stat(path)
            out[name] = [st.st_size, st.st_mtime_ns]
    return out


def _source(path: str, suffixes) -> dict:
    """What identifies a model or haystack: a local folder by its absolute path and its files, a hub id by name."""
    if os.path.isdir(path):
        return {"path": os.path.abspath(path), "files": _files(path, suffixes)}
    return {"path": path}


def run_settings(config: NeedleConfig, *, model: str, haystack_dir: str | None = None,
                 rope_theta: float | None = None, dtype: str | None = None) -> dict:
    """The settings a cell's result depends on besides its (length, depth) (see :data:`SETTINGS_FILE`), as JSON.

    Args:
        model: the model's folder or hub id (``--model``). haystack_dir: ``--haystack-dir`` (None: synthetic).
        rope_theta, dtype: the overrides the model was loaded with (dtype resolved, e.g. ``"float32"``).
    """
    settings = {k: v for k, v in asdict(config).items() if k not in GRID_FIELDS}
    settings.update(model=_source(model, _MODEL_FILES), rope_theta=rope_theta, dtype=dtype,
                    haystack="synthetic" if haystack_dir is None else _source(haystack_dir, (".txt",)))
    return json.loads(json.dumps(settings))


def settings_problem(output_dir: str, settings: dict) -> str | None:
    """Why ``output_dir``'s finished cells must not be reused with ``settings`` (None: they may, or there are none).

    Refused: results without a recorded ``settings.json`` (an older eval_needle.py's: nothing says which model made
    them) and results recorded with other settings; the message names what differs and the fix.
    """
    if not os.path.exists(os.path.join(output_dir, "results.csv")):
        return None
    fix = (f"pass another --output-dir, or delete results.csv, samples.jsonl and {SETTINGS_FILE} in {output_dir} "
           "to evaluate afresh")
    try:
        with open(os.path.join(output_dir, SETTINGS_FILE), encoding="utf-8") as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        return (f"{output_dir} holds needle results without a readable {SETTINGS_FILE} (an older eval_needle.py, or "
                f"damaged), so nothing says which model and settings made them; {fix}")
    diffs = []
    for key in sorted(set(recorded) | set(settings)):
        old, new = recorded.get(key), settings.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict) and old.get("path") == new.get("path"):
            diffs.append(f"{key}: {new.get('path')} has changed files since")
        else:
            show = lambda v: v.get("path") if isinstance(v, dict) else v  # noqa: E731
            diffs.append(f"{key}: {show(old)!r} then, {show(new)!r} now")
    if diffs:
        return (f"{output_dir} holds needle results of other settings ({'; '.join(diffs)}): its cells would be "
                f"reused for this run; {fix}")
    return None


def rank0_decides(value):
    """``value`` of rank 0 on every rank (one broadcast; single-process: ``value``), so that ranks never disagree
    on what a file says."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def _read_results(path: str) -> list[dict]:
    import pandas as pd

    if not os.path.exists(path):
        return []
    return pd.read_csv(path).to_dict("records")


def evaluate_needle(model, tokenizer, config: NeedleConfig, *, seq_algo: str, output_dir: str, device="cpu",
                    haystack_dir: str | None = None, model_name: str = "model", progress: bool = True,
                    settings: dict | None = None) -> dict:
    """Run the grid, appending one row per cell to ``output_dir/results.csv``; cells already there are skipped when
    they were computed with the same ``settings`` (:func:`run_settings`; None: from ``config``, the model's
    ``name_or_path`` and ``haystack_dir``), else the call is refused.

    Collective: every rank calls it. In the sequence-parallel modes all ranks run every sample together; in
    ``data_parallel`` sample ``s`` runs on rank ``s % world`` and the counts are summed.
    Writes (rank 0): ``results.csv`` (``context_length, depth_percent, score, correct, num_samples``),
    ``samples.jsonl`` (one line per sample and cell: key, expected and predicted answer, correct), ``results.json``
    (config, cells, average accuracy) and ``heatmap.png``.
    Returns:
        ``{"average_accuracy": float, "cells": [row, ...]}``.
    Raises:
        ValueError: ``output_dir`` holds results of other settings, or of unrecorded ones (:func:`settings_problem`).
    """
    import torch.distributed as dist
    from tqdm import tqdm

    from ..utils import rank_world
    from .common import all_reduce_
    from .haystack import load_haystack

    rank, world = rank_world()
    csv_path = os.path.join(output_dir, "results.csv")
    if settings is None:
        settings = run_settings(config, model=getattr(model, "name_or_path", None) or model_name,
                                haystack_dir=haystack_dir)
    # rank 0's view of the files decides, so ranks never disagree on which cells to run
    problem, done = rank0_decides((settings_problem(output_dir, settings), _read_results(csv_path))
                                  if rank == 0 else None)
    if problem:
        raise ValueError(problem)
    finished = {(int(r["context_length"]), int(r["depth_percent"])) for r in done}
    cells = [(n, d) for n in config.context_lengths for d in config.depths if (n, round(d * 100)) not in finished]

    haystack = load_haystack(tokenizer, max(config.context_lengths), haystack_dir=haystack_dir, seed=config.seed) \
        if cells else []
    boundaries = SentenceBoundaries(tokenizer)
    task = NEEDLE_TASKS[config.task]
    needles = [config.needles(s) for s in range(config.num_samples)]
    if rank == 0:
        os.makedirs(output_dir, exist_ok=True)
        if not os.path.exists(csv_path):  # the settings of the cells about to be written
            with open(os.path.join(output_dir, SETTINGS_FILE), "w", encoding="utf-8") as f:
                json.dump(settings, f, indent=1)
    for length, depth in tqdm(cells, desc="needle cells", disable=not progress or rank != 0):
        correct = torch.zeros((), dtype=torch.long, device=device)
        answers = []  # this rank's samples: what was asked, expected and predicted
        for s, (key, number, distractors) in enumerate(needles):
            if seq_algo == "data_parallel" and s % world != rank:
                continue
            rng = random.Random(f"{config.seed}-{length}-{depth}-{s}")
            prompt = build_prompt(tokenizer, haystack, context_length=length, depth=depth, number=number,
                                  distractors=distractors, distractor_depths=[rng.random() for _ in distractors],
                                  city=key, boundaries=boundaries, task=task)
            preds = answer_predictions(model, torch.tensor([prompt.input_ids]), prompt.answer_start,
                                       len(prompt.answer_ids), seq_algo=seq_algo, device=device)
            hit = bool((preds.cpu() == torch.tensor(prompt.answer_ids)).all())
            correct += int(hit)
            answers.append({"context_length": length, "depth_percent": round(depth * 100), "sample": s,
                            "key": str(key), "expected": tokenizer.decode(prompt.answer_ids),
                            "predicted": tokenizer.decode(preds.tolist()), "correct": hit})
        if seq_algo == "data_parallel":
            all_reduce_(correct)
            if world > 1:  # every sample's record on rank 0
                gathered = [None] * world
                dist.all_gather_object(gathered, answers)
                answers = sorted((a for part in gathered for a in part), key=lambda a: a["sample"])
        row = {"context_length": length, "depth_percent": round(depth * 100), "score": correct.item() /
               config.num_samples, "correct": correct.item(), "num_samples": config.num_samples}
        done.append(row)
        if rank == 0:  # append as we go: an interrupted run resumes after the last finished cell
            header = not os.path.exists(csv_path)
            with open(csv_path, "a", encoding="utf-8") as f:
                if header:
                    f.write(",".join(RESULT_COLUMNS) + "\n")
                f.write(",".join(str(row[c]) for c in RESULT_COLUMNS) + "\n")
            with open(os.path.join(output_dir, "samples.jsonl"), "a", encoding="utf-8") as f:
                f.writelines(json.dumps(a) + "\n" for a in answers)
    wanted = {(n, round(d * 100)) for n in config.context_lengths for d in config.depths}
    rows = [r for r in done if (int(r["context_length"]), int(r["depth_percent"])) in wanted]
    average = sum(float(r["score"]) for r in rows) / max(len(rows), 1)
    if rank == 0:
        with open(os.path.join(output_dir, "results.json"), "w", encoding="utf-8") as f:
            json.dump({"model": model_name, "parallel_mode": seq_algo, "config": asdict(config),
                       "average_accuracy": average, "cells": rows}, f, indent=1)
        plot_heatmap(rows, os.path.join(output_dir, "heatmap.png"), title=f"{model_name}: average accuracy "
                     f"{average:.3f}")
    return {"average_accuracy": average, "cells": rows}


def plot_heatmap(rows: list[dict], path: str, *, title: str | None = None) -> None:
    """The seed's heatmap: depth (rows) x context length (columns), red -> yellow -> green score scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns
    from matplotlib.colors import LinearSegmentedColormap

    table = pd.DataFrame(rows).pivot_table(index="depth_percent", columns="context_length", values="score",
                                           aggfunc="mean")
    cmap = LinearSegmentedColormap.from_list("needle", ["#F0496E", "#EBB839", "#0CD79F"])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * table.shape[1] + 3), max(3.5, 0.35 * table.shape[0] + 1.5)))
    sns.heatmap(table, vmin=0, vmax=1, cmap=cmap, cbar_kws={"label": "Score"}, ax=ax)
    ax.set_xlabel("Token Limit")
    ax.set_ylabel("Depth Percent")
    if title:
        ax.set_title(title)
    plt.setp(ax.get_xticklabels(), rotation=45)
    plt.setp(ax.get_yticklabels(), rotation=0)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


__all__ = ["SETTINGS_FILE", "run_settings", "settings_problem", "rank0_decides", "evaluate_needle", "plot_heatmap"]
