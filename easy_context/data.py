"""Training data: the format ``train.py`` consumes, loading it from anywhere, packing a corpus, a synthetic set.

The format (the seed's): a ``datasets.Dataset`` with a column ``input_ids`` whose rows are token-id lists at least
``seq_length`` long, normally exactly ``seq_length`` (packed chunks). ``train.py`` takes the first ``seq_length``
tokens of a row as the input, the same tokens shifted left by one as targets (the last target is -100: it has no
next token in the row) and ``position_ids = 0..seq_length-1``. An optional ``labels`` column (Hugging Face's
convention: one per input token, -100 where no loss is taken, e.g. prompt tokens) replaces ``input_ids`` as the
source of the targets. Other columns are ignored.

Packing (``python -m easy_context.data`` / ``prepare_data.py``): each document is tokenised without special tokens
and framed as ``[BOS] + tokens + [EOS]`` (either can be switched off); the framed documents are concatenated into
one stream that is cut into consecutive ``seq_length`` chunks, so a chunk can start or end inside a document and
documents share a chunk (their tokens attend to each other, as in pretraining-style packing: sequence
parallelism needs one continuous causal sequence per row). The tail shorter than ``seq_length`` is dropped.
"""
from __future__ import annotations

import argparse
import os
import shutil

import torch

from .utils import check_source

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


def load_any(spec: str, *, split: str = "train"):
    """A ``datasets.Dataset`` from a ``save_to_disk`` folder, a local file or folder, or a hub id.

    ``spec``: a folder written by ``save_to_disk`` (``load_from_disk``; of a ``DatasetDict`` the ``split`` is
    taken); a file ending in .json/.jsonl/.parquet/.arrow/.csv/.txt; a folder of such files; otherwise a hub
    dataset id (``load_dataset(spec, split=split)``).
    """
    from datasets import DatasetDict, load_dataset, load_from_disk

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


def load_train_dataset(spec: str, *, seq_length: int, vocab_size: int | None = None, num_samples: int = 0,
                       seed: int = 0, split: str = "train"):
    """The training set of ``train.py``: ``"synthetic"`` or anything :func:`load_any` reads, reduced to ``input_ids``.

    Args:
        spec: ``"synthetic"`` (:func:`synthetic_dataset` of ``num_samples`` rows over ``vocab_size`` ids), or a
            dataset in the module's format.
        seq_length: tokens per training sequence; rows must have at least this many.
    Raises:
        ValueError: no ``input_ids`` column, or a first row shorter than ``seq_length`` (the message names the fix).
    """
    if spec == SYNTHETIC:
        if not vocab_size:
            raise ValueError("the synthetic dataset needs the model's vocab_size")
        return synthetic_dataset(max(num_samples, 1), seq_length, vocab_size, seed=seed)
    data = load_any(spec, split=split)
    if "input_ids" not in data.column_names:
        raise ValueError(f"dataset {spec!r} has no 'input_ids' column (columns: {data.column_names}); tokenise "
                         "and pack a text corpus with `python prepare_data.py --input ... --tokenizer ... "
                         "--seq-length ...`")
    data = data.select_columns([c for c in ("input_ids", "labels") if c in data.column_names])
    if not len(data):
        raise ValueError(f"dataset {spec!r} has no rows")
    if len(data[0]["input_ids"]) < seq_length:
        raise ValueError(f"dataset {spec!r} rows have {len(data[0]['input_ids'])} tokens but --seq-length is "
                         f"{seq_length}; pass a smaller --seq-length or re-pack with prepare_data.py --seq-length")
    if "labels" in data.column_names and len(data[0]["labels"]) != len(data[0]["input_ids"]):
        raise ValueError(f"dataset {spec!r}: a row's labels ({len(data[0]['labels'])}) and input_ids "
                         f"({len(data[0]['input_ids'])}) differ in length; labels are per input token (-100: no loss)")
    return data


class FixedLengthCollator:
    """``rows -> {"input_ids": (batch, seq_length) int64[, "labels": same]}``: each row cut to its first
    ``seq_length`` tokens; a ``labels`` column (the Hugging Face convention: per input token, -100 where no loss,
    the model shifts) comes along.

    Raises:
        ValueError: a row shorter than ``seq_length``, or a token id outside ``[0, vocab_size)``.
    """

    def __init__(self, seq_length: int, vocab_size: int | None = None):
        self.seq_length, self.vocab_size = seq_length, vocab_size

    def __call__(self, rows):
        ids = [row["input_ids"][:self.seq_length] for row in rows]
        short = [len(x) for x in ids if len(x) < self.seq_length]
        if short:
            raise ValueError(f"a row has {short[0]} tokens, fewer than --seq-length {self.seq_length}; re-pack the "
                             "dataset with prepare_data.py --seq-length or pass a smaller --seq-length")
        batch = {"input_ids": torch.tensor(ids, dtype=torch.long)}
        if self.vocab_size is not None:
            low, high = int(batch["input_ids"].min()), int(batch["input_ids"].max())
            if low < 0 or high >= self.vocab_size:
                raise ValueError(f"token id {high if high >= self.vocab_size else low} is outside the model's "
                                 f"vocabulary (vocab_size={self.vocab_size}): the data was tokenised for another "
                                 "model; re-tokenise it with this model's tokenizer (prepare_data.py --tokenizer)")
        if "labels" in rows[0]:
            batch["labels"] = torch.tensor([row["labels"][:self.seq_length] for row in rows], dtype=torch.long)
        return batch


def shift_targets(input_ids: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Targets for next-token prediction: ``input_ids`` shifted left by one, the last position ``ignore_index``."""
    targets = input_ids.roll(-1, dims=-1)
    targets[..., -1] = ignore_index
    return targets


def pack_documents(token_lists, seq_length: int, *, bos_id: int | None, eos_id: int | None):
    """Yield ``{"input_ids": chunk}`` of exactly ``seq_length`` from ``[BOS] + doc + [EOS]`` concatenated.

    ``bos_id`` / ``eos_id`` None leaves that token out. The final partial chunk is dropped.
    """
    buffer: list[int] = []
    for tokens in token_lists:
        buffer.extend(([bos_id] if bos_id is not None else []) + list(tokens) + ([eos_id] if eos_id is not None
                                                                             else []))
        while len(buffer) >= seq_length:
            yield {"input_ids": buffer[:seq_length]}
            del buffer[:seq_length]


def prepare_corpus(input_path: str, tokenizer_path: str, seq_length: int, output_dir: str, *,
                   text_column: str = "text", add_bos: bool = True, add_eos: bool = True, num_proc: int = 1,
                   sample_by: str = "document"):
    """Tokenise a local corpus with a tokenizer, pack it into ``seq_length`` chunks, ``save_to_disk`` it.

    Args:
        input_path: a .txt/.jsonl/.json/.parquet/.arrow/.csv file, a folder of them, or a ``save_to_disk`` folder.
        tokenizer_path: anything ``AutoTokenizer.from_pretrained`` takes (a local folder with ``tokenizer.json``).
        text_column: the column holding the text (``.txt`` files give ``text``).
        add_bos, add_eos: frame every document with the tokenizer's BOS / EOS token (see the module docstring).
        sample_by: for .txt input: ``document`` (a file is one document), ``paragraph`` or ``line``.
    Returns:
        The packed ``Dataset`` (also written to ``output_dir``).
    Raises:
        ValueError: missing text column; BOS/EOS asked for but the tokenizer has none; nothing left to pack.
    """
    from datasets import Dataset, load_dataset, load_from_disk
    from transformers import AutoTokenizer

    if seq_length < 2:
        raise ValueError(f"--seq-length {seq_length}: a training sample needs at least 2 tokens")
    if not os.path.exists(input_path):
        raise FileNotFoundError(f"--input {input_path}: no such file or folder")
    check_source(tokenizer_path, "--tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    bos = tokenizer.bos_token_id if add_bos else None
    eos = tokenizer.eos_token_id if add_eos else None
    for flag, wanted, token in (("--no-bos", add_bos, bos), ("--no-eos", add_eos, eos)):
        if wanted and token is None:
            raise ValueError(f"tokenizer {tokenizer_path} has no {flag[5:].upper()} token; pass {flag}")
    if os.path.splitext(input_path)[1].lower() == ".txt" or (
            os.path.isdir(input_path) and all(f.endswith(".txt") for f in os.listdir(input_path))):
        files = input_path if os.path.isfile(input_path) else sorted(
            os.path.join(input_path, f) for f in os.listdir(input_path))
        raw = load_dataset("text", data_files=files, split="train", sample_by=sample_by)
    else:
        raw = load_any(input_path)
    if text_column not in raw.column_names:
        raise ValueError(f"{input_path} has no {text_column!r} column (columns: {raw.column_names}); pass "
                         "--text-column")

    def tokenize(batch):
        return {"tokens": tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]}

    tokens = raw.map(tokenize, batched=True, remove_columns=raw.column_names, num_proc=num_proc or None)

    frame = (bos is not None) + (eos is not None)
    total = 0
    for batch in tokens.iter(batch_size=1000):  # stops as soon as one chunk is certain
        total += sum(len(t) + frame for t in batch["tokens"])
        if total >= seq_length:
            break
    if total < seq_length:
        raise ValueError(f"the corpus has {total} tokens, fewer than seq_length={seq_length}: nothing to pack")

    def chunks():
        yield from pack_documents((row["tokens"] for row in tokens), seq_length, bos_id=bos, eos_id=eos)

    # Written under <output_dir>.tmp (from_generator's arrow cache inside it, not in ~/.cache) and renamed when
    # complete: a killed run leaves only the .tmp folder, which the next run removes first.
    tmp = output_dir.rstrip(os.sep) + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        Dataset.from_generator(chunks, cache_dir=os.path.join(tmp, "cache")).save_to_disk(os.path.join(tmp, "data"))
        if os.path.exists(output_dir):
            shutil.rmtree(output_dir)
        os.replace(os.path.join(tmp, "data"), output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_from_disk(output_dir)


def main(argv=None):
    p = argparse.ArgumentParser(description="Tokenise and pack a local corpus into fixed-length input_ids samples "
                                "(save_to_disk) for train.py --dataset.")
    p.add_argument("--input", required=True, help=".txt/.jsonl/.json/.parquet/.arrow/.csv file or folder")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder or hub id (AutoTokenizer)")
    p.add_argument("--seq-length", type=int, required=True, help="tokens per packed sample")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--text-column", default="text")
    p.add_argument("--no-bos", dest="add_bos", action="store_false", help="do not start documents with BOS")
    p.add_argument("--no-eos", dest="add_eos", action="store_false", help="do not end documents with EOS")
    p.add_argument("--sample-by", choices=("document", "paragraph", "line"), default="document",
                   help=".txt input: what one document is")
    p.add_argument("--num-proc", type=int, default=1, help="tokenisation processes")
    a = p.parse_args(argv)
    packed = prepare_corpus(a.input, a.tokenizer, a.seq_length, a.output_dir, text_column=a.text_column,
                            add_bos=a.add_bos, add_eos=a.add_eos, num_proc=a.num_proc, sample_by=a.sample_by)
    print(f"wrote {len(packed)} samples x {a.seq_length} tokens to {a.output_dir}")


if __name__ == "__main__":
    main()
