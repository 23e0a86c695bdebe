"""Key -> value facts in essay text: the retrieval task of the needle demo (``train_scripts/needle_demo.sh``), shared
by its training rows (:func:`fact_rows`) and by ``eval_needle.py --task kv``.

The format is made for a byte-level tokenizer (a fact costs a dozen tokens). The haystack is
:func:`~easy_context.eval.haystack.synthetic_essays` (no digits, never two capitals in a row); a fact
``" KQX: 4821."`` is spliced in after a sentence; a prompt ends with the question ``"\\n? KQX:"``, whose answer is
``" 4821"``, the value of the fact with that key. Distractors are facts with other keys. A training row is the same
prompt and its answer followed by more questions about the row's other facts, each with its answer, exactly
``seq_length`` tokens in all; the loss is taken on the answers (and on a chosen share of the filler).

No leak, by construction and checked: keys are ``key_length`` capitals, and :func:`key_split` puts every key in one
of two disjoint spaces ("eval" for a quarter of them by a CRC-32 of the key, "train" for the rest). Training rows
draw their keys from "train" only; eval needles, distractors and perplexity documents from "eval" only; each split's
filler comes from its own seeds. :func:`find_key_leaks` checks written data: it finds every run of two or more
capitals in the text (the essays have none, so these are exactly the keys) and reports those in a given set (the
eval keys). A needle string contains its key, so no eval key in the training text means no eval needle either.
"""
from __future__ import annotations

import random
import re
import string
import zlib
from collections.abc import Iterable, Iterator

PREFIX = "Facts:\n"
FACT_FORMAT = " {key}: {value}."
QUESTION_FORMAT = "\n? {key}:"
SPLITS = ("train", "eval")
EVAL_SHARE = 4  # one key in EVAL_SHARE is an eval key
_KEY_RUN = re.compile(r"[A-Z]{2,}")


def key_split(key: str) -> str:
    """``"eval"`` for the keys whose CRC-32 is divisible by :data:`EVAL_SHARE`, else ``"train"``."""
    return "eval" if zlib.crc32(key.encode()) % EVAL_SHARE == 0 else "train"


def draw_facts(rng: random.Random, count: int, *, split: str, key_length: int = 3,
               value_digits: int = 4, near_keys: float = 0.0) -> list[tuple[str, str]]:
    """``count`` facts ``(key, value)`` with distinct keys of ``split``'s key space and random digit values.

    ``near_keys``: the share of keys (after the first) drawn as a near miss of an earlier key of the same draw: one
    letter changed. A row with near misses cannot be answered by matching part of the key (a model that matched
    only the letter before the colon fails every prompt where two keys end alike). 0 draws exactly as before.

    Raises:
        ValueError: an unknown split, ``key_length < 2`` (a single capital starts sentences in the filler), or more
            facts than half the split's keys.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if key_length < 2 or value_digits < 1:
        raise ValueError(f"need key_length >= 2 and value_digits >= 1, got {key_length} and {value_digits}")
    space = len(string.ascii_uppercase) ** key_length * (1 if split == "eval" else EVAL_SHARE - 1) // EVAL_SHARE
    if count > space // 2:  # rejection sampling of distinct keys: keep it far from exhausting the space
        raise ValueError(f"{count} facts with {key_length}-letter keys: the {split} space has ~{space} keys, at most "
                         f"half of them per draw; raise the key length")
    if not 0 <= near_keys <= 1:
        raise ValueError(f"near_keys is a share, 0..1; got {near_keys}")
    keys: list[str] = []
    while len(keys) < count:
        key = "".join(rng.choice(string.ascii_uppercase) for _ in range(key_length))
        if keys and near_keys and rng.random() < near_keys:
            base, at = rng.choice(keys), rng.randrange(key_length)
            key = base[:at] + rng.choice(string.ascii_uppercase.replace(base[at], "")) + base[at + 1:]
        if key_split(key) == split and key not in keys:
            keys.append(key)
    return [(k, "".join(rng.choice(string.digits) for _ in range(value_digits))) for k in keys]


def find_key_leaks(texts: Iterable[str], keys: Iterable[str]) -> dict:
    """Which of ``keys`` occur in ``texts`` as a run of capitals (the only runs of two or more capitals in this task's
    text are fact and question keys).

    Returns:
        ``{"texts": n scanned, "keys_seen": distinct runs found, "leaks": sorted keys of ``keys`` found}``.
    """
    wanted, seen, n = set(keys), set(), 0
    for text in texts:
        seen.update(_KEY_RUN.findall(text))
        n += 1
    return {"texts": n, "keys_seen": len(seen), "leaks": sorted(seen & wanted)}


def fact_rows(tokenizer, *, num_rows: int, seq_length: int, split: str, num_facts: int, num_questions: int = 1,
              key_length: int = 3, value_digits: int = 4, other_labels: float = 0.0, near_keys: float = 0.0,
              seed: int = 0) -> Iterator[dict]:
    """Rows of exactly ``seq_length`` tokens: ``{"input_ids", "labels", "keys"}``.

    Each row is :func:`~easy_context.eval.needle.build_prompt`'s prompt of the ``kv`` task (prefix, a random window of
    this split's essays with ``num_facts`` facts at random depths, the question about the first fact) and its answer,
    then ``num_questions - 1`` more questions about other facts of the row (each asked once, in random order), with
    their answers.

    Args:
        split: the key space (``"train"`` or ``"eval"``); ``seed`` seeds the filler and the draws (give each split
            and use its own).
        other_labels: share of the filler and prefix tokens that carry a label (the answers always do; facts and
            questions never: their keys and values are random). 0 = answers only; 1 = language modelling of the
            essays as well.
        near_keys: share of a row's keys drawn as near misses of its other keys (:func:`draw_facts`).
    Returns:
        An iterator of dicts; ``labels`` holds the token id where a loss is taken, -100 elsewhere (per input token,
        as train.py reads it); ``keys`` the row's fact keys.
    """
    import numpy as np

    from .haystack import load_haystack
    from .needle import NEEDLE_TASKS, SentenceBoundaries, build_prompt, split_answer

    task = NEEDLE_TASKS["kv"]
    if not 1 <= num_questions <= num_facts or not 0 <= other_labels <= 1:
        raise ValueError(f"need 1 <= num_questions ({num_questions}) <= num_facts ({num_facts}) and 0 <= other_labels "
                         f"({other_labels}) <= 1")
    rng = random.Random(f"{seed}-{split}-rows")
    noise = np.random.default_rng(seed)
    # the filler: windows of a pool of essays from a seed of its own (a draw from 2**40, not eval_needle.py's)
    pool = load_haystack(tokenizer, max(4 * seq_length, min(num_rows * seq_length, 1 << 20)),
                         seed=random.Random(f"{seed}-{split}-filler").randrange(1 << 40))
    boundaries = SentenceBoundaries(tokenizer)
    for _ in range(num_rows):
        facts = draw_facts(rng, num_facts, split=split, key_length=key_length, value_digits=value_digits,
                           near_keys=near_keys)
        tail, tail_answers = [], []
        for i in rng.sample(range(1, num_facts), num_questions - 1):
            question, answer = split_answer(tokenizer, task.question(facts[i][0]), facts[i][1])
            tail += question
            tail_answers.append((len(tail), len(answer)))
            tail += answer
        first_question, first_answer = split_answer(tokenizer, task.question(facts[0][0]), facts[0][1])
        start = boundaries.nearest_boundary(pool, rng.randrange(len(pool) - 2 * seq_length))  # room for a full window
        prompt = build_prompt(tokenizer, pool[start:start + seq_length],
                              context_length=seq_length - len(first_answer) - len(tail), depth=rng.random(),
                              number=facts[0][1], distractors=facts[1:],
                              distractor_depths=[rng.random() for _ in facts[1:]], city=facts[0][0],
                              boundaries=boundaries, task=task)
        ids = np.array(prompt.input_ids + tail, dtype=np.int64)
        # 0: filler or prefix, 1: fact or question (no label), 2: answer (always a label)
        kind = np.zeros(len(ids), dtype=np.int8)
        for s, e in (prompt.needle_span, *prompt.distractor_spans):
            kind[s:e] = 1
        kind[prompt.answer_start - len(first_question):] = 1  # the questions and answers that end the row
        kind[prompt.answer_start:prompt.answer_start + len(first_answer)] = 2
        offset = len(prompt.input_ids)
        for s, n in tail_answers:
            kind[offset + s:offset + s + n] = 2
        keep = (kind == 2) | ((kind == 0) & (noise.random(len(ids)) < other_labels))
        keep[0] = False  # BOS: no token predicts it
        yield {"input_ids": ids.tolist(), "labels": np.where(keep, ids, -100).tolist(),
               "keys": [k for k, _ in facts]}


__all__ = ["PREFIX", "FACT_FORMAT", "QUESTION_FORMAT", "SPLITS", "EVAL_SHARE", "key_split", "draw_facts",
           "find_key_leaks", "fact_rows"]
