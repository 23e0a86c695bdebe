"""Training data: the format ``train.py`` consumes, loading it from anywhere, packing a corpus (plain text or SFT
examples), a synthetic set.

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

Other columns are ignored.

Packing (``python -m easy_context.data`` / ``prepare_data.py``), two modes:

* ``--packing stream`` (the default, the seed's): each document is tokenised without special tokens and framed as
  ``[BOS] + tokens + [EOS]`` (either can be switched off); the framed documents are concatenated into one stream
  that is cut into consecutive ``seq_length`` chunks, so a chunk can start or end inside a document and documents
  share a chunk; their tokens attend to each other, as in pretraining-style packing. Rows have ``input_ids`` only.
* ``--packing documents``: the same framed documents fill the rows in the same order (no token is wasted on
  padding), but every row also gets ``position_ids`` that restart at 0 at each document start. A document that
  does not fit in the rest of a row is split: its remainder continues at the start of the next row(s), again from
  position 0 (a document longer than a row spans several rows). Each row is therefore a list of whole or partial
  documents, each of which sees only itself.

In both modes the tail shorter than ``seq_length`` is dropped.

SFT (``--sft``, implies ``--packing documents``; one example = one document). Examples come either from two text
columns (``--prompt-column`` / ``--response-column``, default ``prompt`` / ``response``: the document is
``[BOS] + tokens(prompt + response) + [EOS]``) or from a conversation column (``--messages-column``, default
``messages``: a list of ``{"role", "content"}`` rendered with the tokenizer's chat template, which then owns all
framing: no BOS/EOS is added). Rows also carry ``labels``: a token's own id where it belongs to a response (every
assistant message of a conversation; the EOS after a prompt/response pair, so the model learns to stop), -100
elsewhere (BOS, prompt, system and user turns, the template's generation prompts). The text is tokenised once as a
whole, and a token is a response token when its characters overlap a response's (the rule of transformers'
``return_assistant_tokens_mask``); a conversation's response spans come from rendering its prefixes (the
conversation up to each assistant message with the generation prompt, and through it), which must render as
prefixes of the whole conversation.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys

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


PACKING_MODES = ("stream", "documents")       # prepare_data.py --packing
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


def pack_documents(token_lists, seq_length: int, *, bos_id: int | None, eos_id: int | None):
    """Yield ``{"input_ids": chunk}`` of exactly ``seq_length`` from ``[BOS] + doc + [EOS]`` concatenated
    (``--packing stream``).

    ``bos_id`` / ``eos_id`` None leaves that token out. The final partial chunk is dropped.
    """
    buffer: list[int] = []
    for tokens in token_lists:
        buffer.extend(([bos_id] if bos_id is not None else []) + list(tokens) + ([eos_id] if eos_id is not None
                                                                             else []))
        while len(buffer) >= seq_length:
            yield {"input_ids": buffer[:seq_length]}
            del buffer[:seq_length]


def pack_documents_with_positions(documents, seq_length: int, *, bos_id: int | None = None,
                                  eos_id: int | None = None):
    """Yield rows of exactly ``seq_length`` tokens that keep document boundaries (``--packing documents``).

    Args:
        documents: an iterable of ``{"tokens": [...]}`` (plain documents) or ``{"tokens": [...], "labels": [...]}``
            (SFT examples: one label per token, -100 where no loss); all with labels or all without.
        bos_id, eos_id: frame every document as ``[BOS] + tokens + [EOS]`` (None leaves that token out). In labels
            the BOS is -100 and the EOS its own id (the model learns to end a response).
    Yields:
        ``{"input_ids", "position_ids"[, "labels"]}``: the framed documents in order, filling each row completely;
        ``position_ids`` is 0 at every document start and at every row start, +1 within a document. A document
        that does not fit in the rest of a row continues in the next row(s) from position 0. The final partial row
        is dropped.
    Raises:
        ValueError: labels on some documents only, or labels of another length than the tokens.
    """
    ids: list[int] = []
    pos: list[int] = []
    lab: list[int] = []
    with_labels = None
    for n, doc in enumerate(documents):
        tokens, labels = list(doc["tokens"]), doc.get("labels")
        if with_labels is None:
            with_labels = labels is not None
        if with_labels != (labels is not None):
            raise ValueError(f"document {n}: labels on some documents only; give every document labels or none")
        if labels is not None:
            labels = list(labels)
            if len(labels) != len(tokens):
                raise ValueError(f"document {n}: {len(labels)} labels for {len(tokens)} tokens (one label per token)")
        if bos_id is not None:
            tokens = [bos_id] + tokens
            labels = None if labels is None else [IGNORE_INDEX] + labels
        if eos_id is not None:
            tokens = tokens + [eos_id]
            labels = None if labels is None else labels + [eos_id]
        start = 0
        while start < len(tokens):
            take = min(seq_length - len(ids), len(tokens) - start)
            ids.extend(tokens[start:start + take])
            pos.extend(range(take))  # a document (or its remainder in a new row) starts at position 0
            if labels is not None:
                lab.extend(labels[start:start + take])
            start += take
            if len(ids) == seq_length:
                yield {"input_ids": ids, "position_ids": pos, **({"labels": lab} if with_labels else {})}
                ids, pos, lab = [], [], []


def _labels_from_spans(tokenizer, text: str, spans) -> dict:
    """``{"tokens", "labels"}`` of ``text`` tokenised as a whole (no special tokens added): a token's label is its id
    when its characters overlap one of ``spans`` (``[start, end)`` character ranges, ascending), else -100."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise ValueError(f"SFT labels need a tokenizer with character offsets (a fast tokenizer: a folder with "
                         f"tokenizer.json); {type(tokenizer).__name__} has none: convert it with "
                         "AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained(...)") from None
    labels = []
    span = 0
    for token, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        inside = span < len(spans) and end > spans[span][0] and start < spans[span][1]
        labels.append(token if inside else IGNORE_INDEX)
    return {"tokens": list(enc["input_ids"]), "labels": labels}


def sft_tokens(tokenizer, prompt: str, response: str) -> dict:
    """One prompt/response example as ``{"tokens", "labels"}`` (before BOS/EOS framing): ``prompt + response``
    tokenised as a whole; the tokens overlapping the response get their id as label, the others -100."""
    for name, value in (("prompt", prompt), ("response", response)):
        if not isinstance(value, str):
            raise ValueError(f"the {name} of an SFT example is {type(value).__name__}, not text: {value!r:.80}")
    return _labels_from_spans(tokenizer, prompt + response, [(len(prompt), len(prompt) + len(response))])


def _check_chat_template(tokenizer) -> None:
    """Raise ValueError naming the fix when ``tokenizer`` has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer ({type(tokenizer).__name__}, {getattr(tokenizer, 'name_or_path', '')!r}) has "
                         "no chat template, so a messages column cannot be rendered: use a tokenizer folder that has "
                         "one (chat_template.jinja, or 'chat_template' in tokenizer_config.json: set "
                         "tokenizer.chat_template = '...' and save_pretrained), or give the examples as text columns "
                         "(--prompt-column / --response-column)")


def chat_tokens(tokenizer, messages) -> dict:
    """One conversation as ``{"tokens", "labels"}``, rendered with the tokenizer's chat template (which owns the
    framing: BOS, turn markers, end-of-turn tokens).

    Every assistant message is a response: the characters from the end of the generation prompt that precedes it
    (``messages[:i]`` rendered with ``add_generation_prompt=True``) to the end of ``messages[:i + 1]`` rendered; the
    tokens overlapping them get their id as label (the end-of-turn marker included, so the model learns to stop),
    all others -100.

    Raises:
        ValueError: the tokenizer has no chat template; a message without role/content; no assistant message; a
            template that renders a prefix of the conversation differently from the whole (e.g. one that drops
            earlier turns' reasoning), where response spans cannot be found.
    """
    _check_chat_template(tokenizer)
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                          for m in messages):
        raise ValueError(f"a conversation must be a list of {{'role', 'content'}} messages, got {messages!r:.120}")

    def render(msgs, generation_prompt):
        return tokenizer.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=generation_prompt)

    text = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:i], True), render(messages[:i + 1], False)
        if not (through.startswith(before) and text.startswith(through)):
            raise ValueError(f"the chat template renders the conversation up to assistant message {i} differently "
                             "from the start of the whole conversation (it rewrites earlier turns, e.g. drops their "
                             "reasoning), so the response tokens cannot be located; give the examples as text columns "
                             "(--prompt-column / --response-column) or use a template that renders prefixes "
                             "consistently")
        spans.append((len(before), len(through)))
    if not spans:
        raise ValueError(f"a conversation has no assistant message (roles: {[m['role'] for m in messages]}): SFT "
                         "learns the assistant's turns, so it would add no loss; drop it from the data")
    return _labels_from_spans(tokenizer, text, spans)


def _sft_source(columns, prompt_column, response_column, messages_column, where="the input"):
    """``("messages", column)`` or ``("prompt_response", prompt, response)`` from the columns and the flags given."""
    if messages_column is not None and (prompt_column is not None or response_column is not None):
        raise ValueError("pass either --messages-column or --prompt-column/--response-column, not both")
    if messages_column is None and prompt_column is None and response_column is None and "messages" in columns:
        messages_column = "messages"
    if messages_column is not None:
        if messages_column not in columns:
            raise ValueError(f"--sft: {where} has no {messages_column!r} column (columns: {columns}); pass "
                             "--messages-column")
        return ("messages", messages_column)
    prompt, response = prompt_column or "prompt", response_column or "response"
    missing = [c for c in (prompt, response) if c not in columns]
    if missing:
        raise ValueError(f"--sft: {where} has no {' or '.join(map(repr, missing))} column (columns: {columns}); pass "
                         "--prompt-column/--response-column, or --messages-column for conversations")
    return ("prompt_response", prompt, response)


# ----------------------------------------------------------------------------- prepare_data's output folder
# prepare_data.py writes only into a new or empty folder or over its own earlier output, which it recognises by this
# file (what wrote it, from what, and how); it never deletes a folder that holds anything else.
MARKER_FILE = "prepare_data.json"
WRITTEN_BY = "easy_context prepare_data.py"
_TMP_MARKER = ".prepare_data_tmp"  # in <output-dir>.tmp: the folder is prepare_data's, a killed run's may be removed
# what save_to_disk writes for one Dataset (datasets' own cache files included) besides the marker
_DATASET_FILE = re.compile(r"state\.json|dataset_info\.json|data-\d{5}-of-\d{5}\.arrow|cache-[\w.-]+\.arrow")


def _is_marker(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("written_by") == WRITTEN_BY
    except (OSError, ValueError, AttributeError):
        return False


def output_dir_problem(output_dir: str, *, overwrite: bool = False, sources=()) -> str | None:
    """Why prepare_data.py may not write ``output_dir`` (None: it may), naming the fix.

    It may write a folder that does not exist, an empty one, or one that holds only its own earlier output (its
    :data:`MARKER_FILE` and the ``save_to_disk`` files); with ``overwrite`` also a ``save_to_disk`` folder of one
    dataset without the marker (an older prepare_data.py's). Never the working folder or one above it, a folder
    that holds any other file (even with ``overwrite``), one of ``sources`` (``[(flag, path)]``, e.g. the input)
    or a folder around or inside one, nor when ``<output_dir>.tmp`` exists and is not prepare_data's.
    """
    out = os.path.abspath(output_dir)
    if os.path.commonpath([out, os.getcwd()]) == out:
        return (f"--output-dir {output_dir} is the working folder or one above it: prepare_data.py replaces its "
                "output folder as a whole; pass a new folder, e.g. --output-dir data/packed")
    for flag, path in sources:
        src = os.path.abspath(path)
        if os.path.exists(src) and os.path.commonpath([out, src]) in (out, src):
            return (f"--output-dir {output_dir} and {flag} {path} are the same folder or one holds the other: "
                    "pass another --output-dir")
    tmp = out + ".tmp"
    if os.path.lexists(tmp) and not os.path.isfile(os.path.join(tmp, _TMP_MARKER)):
        return (f"{tmp} exists and was not made by prepare_data.py (which writes there first): move it away, or "
                "pass another --output-dir")
    if not os.path.lexists(out):
        return None
    if os.path.islink(out) or not os.path.isdir(out):
        return f"--output-dir {output_dir} is a file or a link, not a folder: pass another --output-dir"
    names = sorted(os.listdir(out))
    foreign = [n for n in names if not ((n == MARKER_FILE or _DATASET_FILE.fullmatch(n))
                                        and os.path.isfile(os.path.join(out, n)))]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        return (f"--output-dir {output_dir} holds files prepare_data.py did not write ({shown}); it replaces only "
                "its own earlier output (even with --overwrite-output-dir): pass a new or empty folder as --output-dir")
    if not names or _is_marker(os.path.join(out, MARKER_FILE)):
        return None
    if overwrite and {"state.json", "dataset_info.json"} <= set(names):
        return None
    return (f"--output-dir {output_dir} holds a dataset without prepare_data.py's {MARKER_FILE} (written by something "
            "else, or an older prepare_data.py): pass --overwrite-output-dir to replace it, or another --output-dir")


def _claim_tmp(out: str) -> str:
    """``<out>.tmp``, new and marked as prepare_data's. A killed run's is removed first; if it was killed between
    moving the earlier output aside and moving the new one in, the earlier output goes back in place."""
    tmp = out + ".tmp"
    if os.path.isfile(os.path.join(tmp, _TMP_MARKER)):
        _release_tmp(tmp, out)
    os.makedirs(tmp)
    open(os.path.join(tmp, _TMP_MARKER), "w").close()
    return tmp


def _release_tmp(tmp: str, out: str) -> None:
    old = os.path.join(tmp, "old")
    if os.path.isdir(old) and not os.path.lexists(out):
        os.rename(old, out)
    shutil.rmtree(tmp, ignore_errors=True)


def _replace_output(tmp: str, out: str) -> None:
    """Move ``tmp/data`` to ``out``: the earlier output (if any) is renamed aside into ``tmp`` first and removed only
    after the new one is in place, so ``out`` holds the old output or the new one, whole, but for the instant between
    the two renames (a run killed there gets the old one back on the next run: :func:`_claim_tmp`)."""
    old = os.path.join(tmp, "old")
    if os.path.lexists(out):
        os.rename(out, old)
    os.rename(os.path.join(tmp, "data"), out)


# ----------------------------------------------------------------------------- prepare_data's input
def _not_utf8(paths) -> str | None:
    """The first line of ``paths`` (text files) that is not UTF-8, as an error naming the file, line and fix."""
    for path in paths:
        if os.path.splitext(path)[1].lower() not in (".txt", ".json", ".jsonl", ".csv", ""):
            continue
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as e:
                    return (f"{path} line {n} is not UTF-8 text (byte 0x{line[e.start]:02x} at column {e.start + 1}): "
                            f"prepare_data.py reads UTF-8; convert the file, e.g. `iconv -f latin1 -t utf-8 {path}`")
    return None


@contextlib.contextmanager
def _reading(input_path: str):
    """Reading ``input_path`` with datasets: a failure caused by text that is not UTF-8 becomes a ValueError naming
    the file and line (datasets says neither); our own errors and any other failure pass unchanged."""
    try:
        yield
    except Exception as e:
        if isinstance(e, (ValueError, FileNotFoundError)) and not isinstance(e, UnicodeDecodeError):
            raise
        problem = _not_utf8(_input_files(input_path))
        if problem:
            raise ValueError(problem) from None
        raise


def _input_files(input_path: str) -> list[str]:
    if os.path.isfile(input_path):
        return [input_path]
    return sorted(os.path.join(root, n) for root, _, names in os.walk(input_path) for n in names)



def prepare_corpus(input_path: str, tokenizer_path: str, seq_length: int, output_dir: str, *,
                   text_column: str = "text", add_bos: bool = True, add_eos: bool = True, num_proc: int = 1,
                   sample_by: str = "document", packing: str | None = None, sft: bool = False,
                   prompt_column: str | None = None, response_column: str | None = None,
                   messages_column: str | None = None, overwrite_output_dir: bool = False):
    """Tokenise a local corpus with a tokenizer, pack it into ``seq_length`` rows, ``save_to_disk`` it.

    Args:
        input_path: a .txt/.jsonl/.json/.parquet/.arrow/.csv file, a folder of them, or a ``save_to_disk`` folder.
        tokenizer_path: anything ``AutoTokenizer.from_pretrained`` takes (a local folder with ``tokenizer.json``).
        text_column: the column holding the text (``.txt`` files give ``text``); not used with ``sft``.
        add_bos, add_eos: frame every document with the tokenizer's BOS / EOS token (see the module docstring); not
            used for conversations (the chat template frames them).
        sample_by: for .txt input: ``document`` (a file is one document), ``paragraph`` or ``line``.
        packing: ``"stream"`` (rows of ``input_ids``) or ``"documents"`` (rows also carry ``position_ids``
            restarting at each document); None = ``"documents"`` with ``sft``, else ``"stream"``.
        sft: examples with response-only labels (rows also carry ``labels``); implies ``"documents"``.
        prompt_column, response_column, messages_column: where SFT examples are: a messages column (default
            ``messages`` when present) or prompt/response text columns (default ``prompt`` / ``response``).
        output_dir: a new or empty folder, or one holding this function's earlier output (recognised by its
            :data:`MARKER_FILE`), which is replaced atomically; ``overwrite_output_dir`` also replaces a
            ``save_to_disk`` folder without the marker. Anything else is refused (:func:`output_dir_problem`).
    Returns:
        The packed ``Dataset`` (also written to ``output_dir``).
    Raises:
        ValueError: an output folder it may not write; an empty or non-UTF-8 input file, a text that is not a
            string (naming the file and row); missing columns; BOS/EOS asked for but the tokenizer has none; ``sft``
            with ``"stream"``; a conversation the tokenizer cannot render (no chat template, ...); nothing left to
            pack. FileNotFoundError: no such input or tokenizer.
    """
    from datasets import Dataset, load_dataset, load_from_disk
    from transformers import AutoTokenizer

    if packing is None:
        packing = "documents" if sft else "stream"
    if packing not in PACKING_MODES:
        raise ValueError(f"--packing {packing!r}: choose one of {', '.join(PACKING_MODES)}")
    if sft and packing != "documents":
        raise ValueError("--sft packs each example as its own document: drop --packing stream (--sft implies "
                         "--packing documents)")
    if not sft and any(c is not None for c in (prompt_column, response_column, messages_column)):
        raise ValueError("--prompt-column / --response-column / --messages-column describe SFT examples: add --sft")
    if seq_length < 2:
        raise ValueError(f"--seq-length {seq_length}: a training sample needs at least 2 tokens")
    if not os.path.exists(input_path):
        raise FileNotFoundError(f"--input {input_path}: no such file or folder")
    if os.path.isfile(input_path) and os.path.getsize(input_path) == 0:
        raise ValueError(f"--input {input_path} is empty: nothing to tokenise")
    if os.path.isdir(input_path) and not _input_files(input_path):
        raise ValueError(f"--input {input_path} is an empty folder: nothing to tokenise")
    check_source(tokenizer_path, "--tokenizer")
    problem = output_dir_problem(output_dir, overwrite=overwrite_output_dir,
                                 sources=(("--input", input_path), ("--tokenizer", tokenizer_path)))
    if problem:  # before any work
        raise ValueError(problem)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    with _reading(input_path):
        if os.path.splitext(input_path)[1].lower() == ".txt" or (
                os.path.isdir(input_path) and all(f.endswith(".txt") for f in os.listdir(input_path))):
            files = input_path if os.path.isfile(input_path) else sorted(
                os.path.join(input_path, f) for f in os.listdir(input_path))
            raw = load_dataset("text", data_files=files, split="train", sample_by=sample_by)
        else:
            raw = load_any(input_path)
    if not len(raw):
        raise ValueError(f"--input {input_path} has no rows: nothing to tokenise")
    source = _sft_source(raw.column_names, prompt_column, response_column, messages_column,
                         input_path) if sft else None
    if source is not None and source[0] == "messages":
        add_bos = add_eos = False  # the chat template frames each conversation
        _check_chat_template(tokenizer)
    bos = tokenizer.bos_token_id if add_bos else None
    eos = tokenizer.eos_token_id if add_eos else None
    for flag, wanted, token in (("--no-bos", add_bos, bos), ("--no-eos", add_eos, eos)):
        if wanted and token is None:
            raise ValueError(f"tokenizer {tokenizer_path} has no {flag[5:].upper()} token; pass {flag}")
    if source is None and text_column not in raw.column_names:
        raise ValueError(f"{input_path} has no {text_column!r} column (columns: {raw.column_names}); pass "
                         "--text-column")

    def row_error(index, message):  # rows count from 1, as the lines of a .jsonl file do
        return ValueError(f"{input_path} row {index + 1}: {message}")

    def tokenize(batch, indices):
        if source is None:
            texts = batch[text_column]
            for i, text in zip(indices, texts):
                if not isinstance(text, str):
                    what = "no value (null)" if text is None else f"{type(text).__name__} {text!r:.40}"
                    raise row_error(i, f"the {text_column!r} column holds {what}, not text: fix the row, or pass "
                                       "--text-column naming the column of the text")
            return {"tokens": tokenizer(texts, add_special_tokens=False)["input_ids"]}
        docs = []
        for n, i in enumerate(indices):
            try:
                if source[0] == "messages":
                    docs.append(chat_tokens(tokenizer, batch[source[1]][n]))
                else:
                    docs.append(sft_tokens(tokenizer, batch[source[1]][n], batch[source[2]][n]))
            except ValueError as e:
                raise row_error(i, str(e)) from None
        return {"tokens": [d["tokens"] for d in docs], "labels": [d["labels"] for d in docs]}

    with _reading(input_path):  # a .jsonl's strings are decoded here
        tokens = raw.map(tokenize, batched=True, with_indices=True, remove_columns=raw.column_names,
                         num_proc=num_proc or None)

    frame = (bos is not None) + (eos is not None)
    total = 0
    for batch in tokens.iter(batch_size=1000):  # stops as soon as one chunk is certain
        total += sum(len(t) + frame for t in batch["tokens"])
        if total >= seq_length:
            break
    if total < seq_length:
        raise ValueError(f"the corpus has {total} tokens, fewer than seq_length={seq_length}: nothing to pack")

    def chunks():
        if packing == "stream":
            yield from pack_documents((row["tokens"] for row in tokens), seq_length, bos_id=bos, eos_id=eos)
        else:
            yield from pack_documents_with_positions(iter(tokens), seq_length, bos_id=bos, eos_id=eos)

    # Written under <output_dir>.tmp (from_generator's arrow cache inside it, not in ~/.cache) and renamed when
    # complete: a killed run leaves only the .tmp folder (marked as prepare_data's), which the next run removes.
    out = os.path.abspath(output_dir)
    tmp = _claim_tmp(out)
    try:
        packed = Dataset.from_generator(chunks, cache_dir=os.path.join(tmp, "cache"))
        packed.save_to_disk(os.path.join(tmp, "data"))
        marker = {"written_by": WRITTEN_BY, "input": os.path.abspath(input_path), "tokenizer": tokenizer_path,
                  "seq_length": seq_length, "packing": packing, "sft": sft, "bos": bos is not None,
                  "eos": eos is not None, "rows": len(packed), "columns": packed.column_names}
        with open(os.path.join(tmp, "data", MARKER_FILE), "w", encoding="utf-8") as f:
            json.dump(marker, f, indent=1)
        problem = output_dir_problem(output_dir, overwrite=overwrite_output_dir)  # nothing new appeared meanwhile
        if problem:
            raise ValueError(problem)
        _replace_output(tmp, out)
    finally:
        _release_tmp(tmp, out)
    return load_from_disk(out)


def build_parser() -> argparse.ArgumentParser:
    """prepare_data.py's command line."""
    from .utils import HelpFormatter

    p = argparse.ArgumentParser(prog="prepare_data.py", formatter_class=HelpFormatter,
                                description="Tokenise and pack a local corpus (text, or SFT examples with --sft) into "
                                "fixed-length input_ids samples (save_to_disk) for train.py --dataset.")
    p.add_argument("--input", required=True, help=".txt/.jsonl/.json/.parquet/.arrow/.csv file or folder (UTF-8)")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder or hub id (AutoTokenizer)")
    p.add_argument("--seq-length", type=int, required=True, help="tokens per packed sample")
    p.add_argument("--output-dir", required=True,
                   help="a new or empty folder, or one holding an earlier output of prepare_data.py (replaced "
                        f"atomically; recognised by its {MARKER_FILE}); folders with other files are refused")
    p.add_argument("--overwrite-output-dir", action="store_true",
                   help=f"also replace a save_to_disk dataset folder without {MARKER_FILE} (never a folder with "
                        "other files)")
    p.add_argument("--text-column", default="text", help="the column of the text (not used with --sft)")
    p.add_argument("--no-bos", dest="add_bos", action="store_false", help="do not start documents with BOS")
    p.add_argument("--no-eos", dest="add_eos", action="store_false", help="do not end documents with EOS")
    p.add_argument("--sample-by", choices=("document", "paragraph", "line"), default="document",
                   help=".txt input: what one document is")
    p.add_argument("--packing", choices=PACKING_MODES, default=None,
                   help="stream (default without --sft): documents concatenated and cut, input_ids only; documents "
                        "(default with --sft): rows also carry position_ids restarting at each document, so each "
                        "document attends only to itself (train.py --packing auto)")
    p.add_argument("--sft", action="store_true",
                   help="supervised fine-tuning examples: labels -100 except on responses; implies --packing documents")
    p.add_argument("--prompt-column", default=None, help="--sft: prompt text column (default: prompt)")
    p.add_argument("--response-column", default=None, help="--sft: response text column (default: response)")
    p.add_argument("--messages-column", default=None,
                   help="--sft: conversation column rendered with the tokenizer's chat template (default: messages, "
                        "when the input has it)")
    p.add_argument("--num-proc", type=int, default=1, help="tokenisation processes")
    return p


def main(argv=None):
    """``prepare_data.py``: a bad input ends with one line on standard error and exit status 2 (no traceback)."""
    a = build_parser().parse_args(argv)
    try:
        packed = prepare_corpus(a.input, a.tokenizer, a.seq_length, a.output_dir, text_column=a.text_column,
                                add_bos=a.add_bos, add_eos=a.add_eos, num_proc=a.num_proc, sample_by=a.sample_by,
                                packing=a.packing, sft=a.sft, prompt_column=a.prompt_column,
                                response_column=a.response_column, messages_column=a.messages_column,
                                overwrite_output_dir=a.overwrite_output_dir)
    except (ValueError, FileNotFoundError) as e:
        print(f"prepare_data.py: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(f"wrote {len(packed)} samples x {a.seq_length} tokens ({', '.join(packed.column_names)}) to {a.output_dir}")


if __name__ == "__main__":
    main()
