"""What training reads at run time: the dataset format ``train.py`` consumes, loading it from anywhere (or a
synthetic set), and turning rows into batches and next-token targets.

The format (the seed's): a ``datasets.Dataset`` with a column ``input_ids`` whose rows are token-id lists at least
``seq_length`` long, normally exactly ``seq_length`` (packed chunks). ``train.py`` takes the first ``seq_length``
tokens of a row as the input, the same tokens shifted left by one as targets (the last target is -100: it has no
next token in the row) and ``position_ids = 0..seq_length-1``. Two optional columns:

* ``labels`` (Hugging Face's convention: one per input token, -100 where no loss is taken, e.g. prompt tokens)
  replaces ``input_ids`` as the source of the targets (the target of token t is ``labels[t + 1]``).
* ``position_ids`` (written by ``--packing documents`` and ``--sft``): one per input token, 0 at the first token of
  every document (and of every row), +1 within a document. ``train.py --packing auto|documents`` passes them to the
  model, so each token attends only to its own document, and sets the target of every document's last token to
  -100 (:func:`shift_targets`): no token learns to predict the next document's first token.

Other columns are ignored. Such datasets are written offline by :mod:`easy_context.data.prepare`.
"""
from __future__ import annotations

import os
import re

import torch

SYNTHETIC = "synthetic"


def synthetic_dataset(num_samples: int, seq_length: int, vocab_size: int, *, seed: int = 0, noise: float = 0.25):
    """Learnable token sequences: a fixed random Markov chain, so a model's loss falls within a few steps.

    Every sequence starts at a random token; each next token is ``successor[previous]`` (one fixed random
    permutation of the vocabulary, the same for all sequences) with probability ``1 - noise``, else uniform.
    The best achievable loss is about ``H(noise) + noise * ln(vocab_size)`` nats (~1.9 for the defaults and
    vocab 256), far below the ``ln(vocab_size)`` of an untrained model.

    Returns:
        A ``datasets.Dataset`` with one column ``input_ids`` of ``num_samples`` rows of ``seq_length`` ids.
    """
    from datasets import Dataset

    gen = torch.Generator().manual_seed(seed)
    successor = torch.randperm(vocab_size, generator=gen)
    ids = torch.empty(num_samples, seq_length, dtype=torch.long)
    ids[:, 0] = torch.randint(0, vocab_size, (num_samples,), generator=gen)
    jump = torch.rand(num_samples, seq_length, generator=gen) < noise
    rand = torch.randint(0, vocab_size, (num_samples, seq_length), generator=gen)
    for t in range(1, seq_length):
        ids[:, t] = torch.where(jump[:, t], rand[:, t], successor[ids[:, t - 1]])
    return Dataset.from_dict({"input_ids": ids.tolist()})


_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv",
                  ".txt": "text"}


def looks_local(spec: str) -> bool:
    """Whether a dataset spec is meant as a local path rather than a hub id: it has a data file suffix
    (.jsonl/.json/.parquet/.arrow/.csv/.txt), starts with ``/``, ``./``, ``../`` or ``~``, has more than one
    ``/`` (hub ids are ``name`` or ``org/name``), or its first folder exists here."""
    if os.path.splitext(spec)[1].lower() in _FILE_BUILDERS or spec.startswith(("/", "./", "../", "~")):
        return True
    parts = spec.rstrip(os.sep).split(os.sep)
    if len(parts) == 2 and not all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", part) for part in parts):
        return True  # not a valid org/name
    return len(parts) > 2 or (len(parts) == 2 and os.path.isdir(parts[0]))


def check_dataset_source(spec: str, what: str = "--dataset") -> None:
    """A local-looking dataset path (:func:`looks_local`) must exist: otherwise "no such file" with the fix, at
    once, instead of a hub lookup of a path (retries, then a traceback). ``synthetic`` and hub ids pass.

    Raises:
        FileNotFoundError: naming ``what`` and the path.
    """
    if spec != SYNTHETIC and looks_local(spec) and not os.path.exists(os.path.expanduser(spec)):
        raise FileNotFoundError(f"{what} {spec}: no such file or folder; give an existing "
                                f"{'/'.join(_FILE_BUILDERS)} file, a folder written by prepare_data.py "
                                f"--output-dir, 'synthetic', or a hub dataset id (name or org/name)")


def load_any(spec: str, *, split: str = "train"):
    """A ``datasets.Dataset`` from a ``save_to_disk`` folder, a local file or folder, or a hub id.

    ``spec``: a folder written by ``save_to_disk`` (``load_from_disk``; of a ``DatasetDict`` the ``split`` is
    taken); a file ending in .json/.jsonl/.parquet/.arrow/.csv/.txt; a folder of such files; otherwise a hub
    dataset id (``load_dataset(spec, split=split)``).

    Raises:
        FileNotFoundError: a local-looking path (:func:`looks_local`) that does not exist.
        ValueError: an empty file, or a file of unknown type.
    """
    from datasets import DatasetDict, load_dataset, load_from_disk

    check_dataset_source(spec, "dataset")
    spec = os.path.expanduser(spec)
    if os.path.isdir(spec) and any(os.path.exists(os.path.join(spec, f))
                                   for f in ("state.json", "dataset_dict.json", "dataset_info.json")):
        data = load_from_disk(spec)
        return data[split] if isinstance(data, DatasetDict) else data
    ext = os.path.splitext(spec)[1].lower()
    if os.path.isfile(spec):
        if os.path.getsize(spec) == 0:
            raise ValueError(f"dataset file {spec} is empty")
        if ext not in _FILE_BUILDERS:
            raise ValueError(f"{spec}: unknown file type {ext!r}; use one of {', '.join(_FILE_BUILDERS)}")
        return load_dataset(_FILE_BUILDERS[ext], data_files=spec, split="train")
    return load_dataset(spec, split=split)


TRAIN_PACKING = ("auto", "documents", "none")  # train.py --packing
IGNORE_INDEX = -100


def load_train_dataset(spec: str, *, seq_length: int, vocab_size: int | None = None, num_samples: int = 0,
                       seed: int = 0, split: str = "train", packing: str = "auto"):
    """The training set of ``train.py``: ``"synthetic"`` or anything :func:`load_any` reads, reduced to ``input_ids``
    (and ``labels``, ``position_ids`` where present and wanted).

    Args:
        spec: ``"synthetic"`` (:func:`synthetic_dataset` of ``num_samples`` rows over ``vocab_size`` ids), or a
            dataset in the module's format.
        seq_length: tokens per training sequence; rows must have at least this many.
        packing: ``train.py --packing``: ``"auto"`` keeps a ``position_ids`` column when the dataset has one
            (packed documents), ``"documents"`` requires it, ``"none"`` drops it (one causal sequence per row).
    Raises:
        FileNotFoundError: a local-looking ``spec`` that does not exist (:func:`looks_local`; never a hub lookup).
        ValueError: no ``input_ids`` column, a first row shorter than ``seq_length``, ``labels`` / ``position_ids``
            of another length than ``input_ids``, or ``packing="documents"`` without ``position_ids`` (the message
            names the fix).
    """
    if packing not in TRAIN_PACKING:
        raise ValueError(f"--packing {packing!r}: choose one of {', '.join(TRAIN_PACKING)}")
    no_positions = ("has no 'position_ids' column: re-pack it with `python prepare_data.py --packing documents ...` "
                    "(or --sft), which writes position_ids restarting at each document, or pass --packing auto/none")
    if spec == SYNTHETIC:
        if packing == "documents":
            raise ValueError(f"--packing documents: the synthetic dataset {no_positions}")
        if not vocab_size:
            raise ValueError("the synthetic dataset needs the model's vocab_size")
        return synthetic_dataset(max(num_samples, 1), seq_length, vocab_size, seed=seed)
    data = load_any(spec, split=split)
    if "input_ids" not in data.column_names:
        raise ValueError(f"dataset {spec!r} has no 'input_ids' column (columns: {data.column_names}); tokenise "
                         "and pack a text corpus with `python prepare_data.py --input ... --tokenizer ... "
                         "--seq-length ...`")
    if packing == "documents" and "position_ids" not in data.column_names:
        raise ValueError(f"--packing documents: dataset {spec!r} {no_positions}")
    wanted = ("input_ids", "labels") + (("position_ids",) if packing != "none" else ())
    data = data.select_columns([c for c in wanted if c in data.column_names])
    if not len(data):
        raise ValueError(f"dataset {spec!r} has no rows")
    first = data[0]
    if len(first["input_ids"]) < seq_length:
        raise ValueError(f"dataset {spec!r} rows have {len(first['input_ids'])} tokens but --seq-length is "
                         f"{seq_length}; pass a smaller --seq-length or re-pack with prepare_data.py --seq-length")
    if "labels" in first and len(first["labels"]) != len(first["input_ids"]):
        raise ValueError(f"dataset {spec!r}: a row's labels ({len(first['labels'])}) and input_ids "
                         f"({len(first['input_ids'])}) differ in length; labels are per input token (-100: no loss)")
    if "position_ids" in first and len(first["position_ids"]) != len(first["input_ids"]):
        raise ValueError(f"dataset {spec!r}: a row's position_ids ({len(first['position_ids'])}) and input_ids "
                         f"({len(first['input_ids'])}) differ in length; re-pack it with prepare_data.py --packing "
                         "documents")
    return data


def check_position_ids(position_ids: torch.Tensor) -> None:
    """Check packed-document positions: every row starts at 0, and each next position is the previous + 1 (same
    document) or 0 (a new document).

    Args:
        position_ids: ``(batch, seq)`` integer positions.
    Raises:
        ValueError: naming the first offending row and token and the fix.
    """
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be (batch, seq), got shape {tuple(position_ids.shape)}")
    bad_start = (position_ids[:, 0] != 0).nonzero()
    if len(bad_start):
        r = int(bad_start[0, 0])
        raise ValueError(f"row {r}: position_ids start at {int(position_ids[r, 0])}, not 0: packed rows start a "
                         "document at their first token; re-pack the dataset with prepare_data.py --packing "
                         "documents, or pass --packing none to ignore position_ids")
    nxt, prev = position_ids[:, 1:], position_ids[:, :-1]
    bad = ((nxt != prev + 1) & (nxt != 0)).nonzero()
    if len(bad):
        r, t = int(bad[0, 0]), int(bad[0, 1]) + 1
        raise ValueError(f"row {r}: position_ids[{t}] = {int(position_ids[r, t])} after {int(position_ids[r, t - 1])}"
                         ": within a document positions count up by 1 and a new document restarts at 0; re-pack the "
                         "dataset with prepare_data.py --packing documents, or pass --packing none to ignore "
                         "position_ids")


class FixedLengthCollator:
    """``rows -> {"input_ids": (batch, seq_length) int64[, "labels": same][, "position_ids": same]}``: each row cut
    to its first ``seq_length`` tokens; a ``labels`` column (the Hugging Face convention: per input token, -100 where
    no loss, the model shifts) and a ``position_ids`` column (packed documents: restarting at 0 at each document,
    checked by :func:`check_position_ids`) come along, cut the same way.

    Raises:
        ValueError: a row (or its labels / position_ids) shorter than ``seq_length``, a token id outside
            ``[0, vocab_size)``, or invalid position_ids.
    """

    def __init__(self, seq_length: int, vocab_size: int | None = None):
        self.seq_length, self.vocab_size = seq_length, vocab_size

    def _column(self, rows, name):
        cut = [row[name][:self.seq_length] for row in rows]
        short = [len(x) for x in cut if len(x) < self.seq_length]
        if short:
            what = "a row" if name == "input_ids" else f"a row's {name}"
            raise ValueError(f"{what} has {short[0]} tokens, fewer than --seq-length {self.seq_length}; re-pack the "
                             "dataset with prepare_data.py --seq-length or pass a smaller --seq-length")
        return torch.tensor(cut, dtype=torch.long)

    def __call__(self, rows):
        batch = {"input_ids": self._column(rows, "input_ids")}
        if self.vocab_size is not None:
            low, high = int(batch["input_ids"].min()), int(batch["input_ids"].max())
            if low < 0 or high >= self.vocab_size:
                raise ValueError(f"token id {high if high >= self.vocab_size else low} is outside the model's "
                                 f"vocabulary (vocab_size={self.vocab_size}): the data was tokenised for another "
                                 "model; re-tokenise it with this model's tokenizer (prepare_data.py --tokenizer)")
        if "labels" in rows[0]:
            batch["labels"] = self._column(rows, "labels")
        if "position_ids" in rows[0]:
            batch["position_ids"] = self._column(rows, "position_ids")
            check_position_ids(batch["position_ids"])
        return batch


def shift_targets(input_ids: torch.Tensor, ignore_index: int = IGNORE_INDEX, *,
                  position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Targets for next-token prediction: ``input_ids`` (or per-token ``labels``) shifted left by one.

    Args:
        input_ids: ``(..., seq)`` token ids, or labels in the Hugging Face convention (per input token, -100 where
            no loss): the target of position t is ``input_ids[..., t + 1]``.
        position_ids: ``(..., seq)`` or broadcastable (e.g. ``(1, seq)``) positions of packed documents, or None
            (one sequence per row). A document ends where the next position is not this one + 1 (a restart at 0,
            in valid packed rows); the target there is ``ignore_index``, so no token learns to predict the next
            document's first token.
    Returns:
        A new tensor like ``input_ids``: the last position, and the last token of every document, ``ignore_index``.
    """
    targets = input_ids.roll(-1, dims=-1)
    targets[..., -1] = ignore_index
    if position_ids is not None:
        position_ids = position_ids.to(input_ids.device)
        ends = position_ids[..., 1:] != position_ids[..., :-1] + 1  # t ends its document: t + 1 starts another
        ends = ends.expand(*targets.shape[:-1], ends.shape[-1])
        targets[..., :-1] = targets[..., :-1].masked_fill(ends, ignore_index)
    return targets
