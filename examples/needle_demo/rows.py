"""The needle demo's training rows: prompts of the ``kv`` task (:mod:`easy_context.eval.facts`, whose key spaces
and format ``eval_needle.py --task kv`` asks) with their answers, drawn from the *train* key space.

A training row is eval_needle.py's prompt (:func:`~easy_context.eval.needle.build_prompt`) and its answer followed by
more questions about the row's other facts, each with its answer, exactly ``seq_length`` tokens in all; the loss is
taken on the answers (and on a chosen share of the filler). The filler is essays from a seed of its own (not
eval_needle.py's).
"""
from __future__ import annotations

import random
from collections.abc import Iterator

from easy_context.eval.facts import draw_facts
from easy_context.eval.haystack import load_haystack
from easy_context.eval.needle import NEEDLE_TASKS, SentenceBoundaries, build_prompt, split_answer


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
