"""Offline packing: tokenised documents into rows of exactly ``seq_length`` tokens (prepare_data.py ``--packing``).

Two modes:

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
"""
from __future__ import annotations

from .loading import IGNORE_INDEX

PACKING_MODES = ("stream", "documents")  # prepare_data.py --packing


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
