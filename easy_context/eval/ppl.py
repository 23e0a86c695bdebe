"""Perplexity at increasing context lengths with a sequence-parallel forward (the logic behind ``eval_ppl.py``).

For each context length ``max_length`` every document is scored in windows, as in the seed (after YaRN's
evaluation): a window holds ``max_length`` tokens (BOS included when the tokenizer has one) and scores only the
tokens no earlier window scored; windows start every ``sliding_window`` tokens. With ``truncate`` each document is
cut to one window. The model never materialises full-vocabulary logits: the final hidden states go through
:func:`easy_context.loss.sharded_cross_entropy`, chunked, and the NLL is token-weighted over everything (all
ranks, windows and documents): ``ppl = exp(sum NLL / number of scored tokens)``. The seed averaged per-window means
instead, which weights the short tail windows like full ones.
"""
from __future__ import annotations

import math
import os
import warnings

import torch

CSV_FIRST_COLUMN = "model"


def context_lengths(min_tokens: int, max_tokens: int, tokens_step: int | None = None) -> list[int]:
    """``min, min+step, ... <= max``; without a step, doubling from ``min`` (the seed's rule)."""
    if not 0 < min_tokens <= max_tokens:
        raise ValueError(f"need 0 < --min-tokens ({min_tokens}) <= --max-tokens ({max_tokens})")
    if tokens_step:
        return list(range(min_tokens, max_tokens + 1, tokens_step))
    out = [min_tokens]
    while out[-1] * 2 <= max_tokens:
        out.append(out[-1] * 2)
    return out


def windows(num_tokens: int, max_length: int, sliding_window: int) -> list[tuple[int, int, int]]:
    """``(begin, end, scored)`` token windows of a document: ``doc[begin:end]``, of which the last ``scored``
    tokens are scored (exactly once over all windows)."""
    if max_length < 1 or sliding_window < 1:
        raise ValueError(f"window length {max_length} and --sliding-window {sliding_window} must be >= 1")
    out, prev_end = [], 0
    for begin in range(0, num_tokens, sliding_window):
        end = min(begin + max_length, num_tokens)
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == num_tokens:
            break
    return out


def _window_nll(model, ids: list[int], scored: int, *, seq_algo: str, device, bos_id: int | None,
                local: bool) -> tuple[float, int]:
    """(NLL sum, scored tokens) of one window; ``local=False``: over the SP group (collective, same on all ranks)."""
    from ..api import prepare_seq_parallel_inputs
    from ..loss import linear_cross_entropy_sum, sharded_cross_entropy
    from ..utils import rank_world
    from .common import gathered

    if bos_id is not None:
        ids = [bos_id] + ids
    length = len(ids)
    # target of position t is token t+1; only the last `scored` tokens are targets
    targets = [ids[t + 1] if t + 1 >= length - scored else -100 for t in range(length - 1)] + [-100]
    rank, world = rank_world()
    p = prepare_seq_parallel_inputs(seq_algo, torch.tensor([ids]), None, torch.tensor([targets]), rank, world, device)
    head = model.get_output_embeddings()
    with torch.inference_mode(), gathered(head):
        hidden = model.get_decoder()(input_ids=p["local_input_ids"], position_ids=p["local_position_ids"],
                                     use_cache=False).last_hidden_state  # (1, local_seq, hidden)
        if local:
            nll = linear_cross_entropy_sum(hidden, head.weight, p["local_target_ids"], bias=head.bias)
            return float(nll), int((p["local_target_ids"] != -100).sum())
        out = sharded_cross_entropy(hidden, head.weight, p["local_target_ids"], bias=head.bias)
    return float(out.global_loss.double() * out.num_tokens), int(out.num_tokens)


def document_nll(model, documents: list[list[int]], *, max_length: int, sliding_window: int, truncate: bool,
                 seq_algo: str, device="cpu", bos_id: int | None = None, progress=None) -> tuple[float, int]:
    """``(sum of token NLLs, number of scored tokens)`` over ``documents`` at context ``max_length``.

    Collective: every rank calls it with the same documents. Sequence-parallel modes run every window on all
    ranks together; ``data_parallel`` gives document ``i`` to rank ``i % world`` and sums at the end.
    """
    from ..utils import rank_world
    from .common import all_reduce_

    rank, world = rank_world()
    local = seq_algo == "data_parallel"
    span = max_length - (bos_id is not None)  # the seed's "leave room for <BOS>"
    total = torch.zeros(2, dtype=torch.float64)
    for i, doc in enumerate(documents):
        if local and i % world != rank:
            continue
        if truncate:
            doc = doc[:span]
        for begin, end, scored in windows(len(doc), span, span if truncate else sliding_window):
            nll, n = _window_nll(model, doc[begin:end], scored, seq_algo=seq_algo, device=device, bos_id=bos_id,
                                 local=local)
            total += torch.tensor([nll, n], dtype=torch.float64)
        if progress is not None:
            progress.update(1)
    if local:
        all_reduce_(total)
    return float(total[0]), int(total[1])


def evaluate_perplexity(model, documents: list[list[int]], lengths: list[int], *, sliding_window: int = 256,
                        truncate: bool = False, seq_algo: str = "data_parallel", device="cpu",
                        bos_id: int | None = None, progress: bool = True, desc: str = "ppl") -> list[float]:
    """Perplexity at each context length of ``lengths`` (see the module docstring), over the documents with at least
    that many tokens (NaN, with a warning, where there is none)."""
    from tqdm import tqdm

    from ..utils import rank_world

    out = []
    rank0 = rank_world()[0] == 0
    with tqdm(total=len(lengths) * len(documents), desc=desc, disable=not progress or not rank0) as bar:
        for max_length in lengths:
            # only documents that fill the context: a shorter one would be scored with less context (and the same
            # number would come back for every longer length)
            span = max_length - (bos_id is not None)
            long_enough = [d for d in documents if len(d) >= span]
            if len(long_enough) < len(documents) and rank0:
                skipped = len(documents) - len(long_enough)
                warnings.warn(f"context {max_length}: {skipped} of {len(documents)} documents "
                              f"have fewer than {span} tokens and are not scored at this length"
                              + ("; no document is long enough: perplexity NaN" if not long_enough else ""))
            bar.update(len(documents) - len(long_enough))
            if not long_enough:
                out.append(float("nan"))
                continue
            nll, count = document_nll(model, long_enough, max_length=max_length, sliding_window=sliding_window,
                                      truncate=truncate, seq_algo=seq_algo, device=device, bos_id=bos_id,
                                      progress=bar)
            out.append(math.exp(nll / max(count, 1)))
            bar.set_postfix(tokens=max_length, ppl=f"{out[-1]:.3f}")
    return out


def load_documents(tokenizer, *, dataset: str | None = None, subset: str | None = None, split: str = "test",
                   feature: str = "text", samples: int | None = None, min_tokens: int | None = None,
                   synthetic_tokens: int | None = None, seed: int = 0) -> list[list[int]]:
    """Token-id documents to score.

    Args:
        dataset: a directory saved with ``save_to_disk``; a data file (``.json``/``.jsonl``/``.txt``/``.csv``/
            ``.parquet``) or a directory of them; or a hub dataset id. A column ``input_ids`` is used as is
            (pre-tokenized, like the seed's ``--tokenized``); otherwise ``feature`` is tokenized without special
            tokens (the BOS is added per window).
        min_tokens: keep documents of at least this many tokens (``--dataset-min-tokens``); samples: keep the first.
        synthetic_tokens: instead of a dataset, ``samples`` (default 1) synthetic essays of this many tokens.
    """
    from .haystack import load_haystack

    if synthetic_tokens:
        return [load_haystack(tokenizer, synthetic_tokens, seed=seed + 1000 * i)[:synthetic_tokens]
                for i in range(samples or 1)]
    if dataset is None:
        raise ValueError("pass --dataset (a saved dataset, data files or a hub id) or --synthetic")
    import datasets

    saved = ("dataset_info.json", "dataset_dict.json", "state.json")
    if os.path.isdir(dataset) and any(os.path.exists(os.path.join(dataset, f)) for f in saved):
        data = datasets.load_from_disk(dataset)
        if isinstance(data, datasets.DatasetDict):
            data = data[split]
    elif os.path.isfile(dataset):
        ext = dataset.rsplit(".", 1)[-1]
        builder = {"jsonl": "json", "txt": "text"}.get(ext, ext)
        data = datasets.load_dataset(builder, data_files=dataset, split="train")
    else:
        data = datasets.load_dataset(dataset, name=subset, split=split)
    docs = []
    for row in data:
        ids = row["input_ids"] if "input_ids" in row else tokenizer(row[feature], add_special_tokens=False)["input_ids"]
        if min_tokens and len(ids) < min_tokens:
            continue
        docs.append(list(ids))
        if samples and len(docs) >= samples:
            break
    if not docs:
        raise ValueError(f"no document of {dataset!r} has >= {min_tokens} tokens")
    return docs


def write_csv(path: str, lengths: list[int], rows: list[tuple[str, list[float]]]) -> None:
    """The seed's table: header ``model,<len>,<len>...``, one row of perplexities per model."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(",".join([CSV_FIRST_COLUMN] + [str(n) for n in lengths]) + "\n")
        for name, ppls in rows:
            f.write(",".join([name.replace(",", "_")] + [repr(float(x)) for x in ppls]) + "\n")


def plot_perplexity(csv_paths: list[str], output: str, *, xlim=(None, None), ylim=(None, None),
                    log: bool = False) -> list[str]:
    """Perplexity vs context length of every row of every CSV; writes ``output + ".png"`` and ``".pdf"``.

    Reads the CSVs of :func:`write_csv` and the seed's (first column unnamed). ``log``: both axes logarithmic
    (context lengths in powers of two), for rows that differ by orders of magnitude. Returns the written paths.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for path in csv_paths:
        table = pd.read_csv(path)
        x = [float(c) for c in table.columns[1:]]
        for row in table.itertuples(index=False):
            label = os.path.basename(str(row[0]).rstrip("/")) or str(row[0])
            ax.plot(x, [float(v) for v in row[1:]], marker="o", markersize=3, label=label)
    ax.set_xlabel("Context Window")
    ax.set_ylabel("Perplexity (lower is better)")
    if log:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        xlim = (xlim[0] or None, xlim[1])  # a log axis has no 0
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    written = [output + ".png", output + ".pdf"]
    fig.savefig(written[0], dpi=80)
    fig.savefig(written[1], transparent=True)
    plt.close(fig)
    return written


__all__ = ["context_lengths", "windows", "document_nll", "evaluate_perplexity", "load_documents", "write_csv",
           "plot_perplexity"]
