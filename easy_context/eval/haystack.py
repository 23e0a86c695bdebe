"""Haystack text for needle-in-a-haystack evaluation, independent of any data directory.

:func:`synthetic_essays` writes essay-like English (titles, paragraphs, sentences about startups, writing and
work, in the spirit of the Paul Graham essays the seed used) from a seeded generator: no download, no files, the
same text for the same seed. :func:`load_haystack` tokenizes either that text or the ``*.txt`` files of a
directory (real essays) until it has enough tokens.
"""
from __future__ import annotations

import glob
import os
import random

_SUBJECTS = ["the founder", "a good programmer", "the essay", "every startup", "the investor", "a small team",
             "the best idea", "a new language", "the user", "an ambitious student", "the market", "a hacker",
             "the company", "the writer", "a painter", "the reader", "nearly everyone", "the old rule",
             "the next project", "a great school"]
_VERBS = ["builds", "questions", "changes", "ignores", "discovers", "explains", "rewards", "imitates", "admires",
          "underestimates", "shapes", "tests", "follows", "forgets", "improves", "measures", "seeks", "avoids"]
_OBJECTS = ["the problem", "a better tool", "the question", "an unusual habit", "the default path",
            "a simple prototype", "the hard part", "the right people", "a surprising answer", "the obvious plan",
            "its own taste", "the whole field", "a quiet ambition", "the early users", "an unpopular opinion",
            "the last draft", "a strange pattern", "the real work"]
_ADVERBS = ["slowly", "quietly", "deliberately", "almost by accident", "again and again", "without noticing",
            "at first", "in the end", "more than expected", "with surprising ease"]
_CLAUSES = ["because nobody else was looking", "when the deadline was far away", "if the idea is good enough",
            "although it seemed wasteful", "while everyone argued about money", "before the details were clear",
            "since curiosity compounds", "unless the work is boring", "as long as the users care",
            "even when the numbers disagree"]
_TOPICS = ["Startups", "Writing", "Taste", "Ambition", "Curiosity", "Work", "Schools", "Ideas", "Cities", "Tools",
           "Users", "Wealth", "Design", "Procrastination", "Persistence"]
_TEMPLATES = [
    "{S} {V} {O} {A}.",
    "{S} {V} {O} {C}.",
    "In practice, {s} {V} {O}.",
    "It is strange how often {s} {V} {O}.",
    "{S} rarely {v} {O}, and that is the point.",
    "Why does {s} {v} {O}?",
    "The lesson is that {s} {V} {O} {C}.",
    "Most of the time {s} {V} {O} {A}.",
    "What matters is whether {s} {V} {O}.",
    "{S} {V} {O}; {s2} {V2} {O2}.",
]


def _sentence(rng: random.Random) -> str:
    subject, subject2 = rng.choice(_SUBJECTS), rng.choice(_SUBJECTS)
    verb = rng.choice(_VERBS)
    return rng.choice(_TEMPLATES).format(
        S=subject[0].upper() + subject[1:], s=subject, V=verb, v=verb[:-1] if verb.endswith("s") else verb,
        O=rng.choice(_OBJECTS), A=rng.choice(_ADVERBS), C=rng.choice(_CLAUSES), s2=subject2,
        V2=rng.choice(_VERBS), O2=rng.choice(_OBJECTS))


def synthetic_essays(num_chars: int, *, seed: int = 0) -> str:
    """Essay-like English text of at least ``num_chars`` characters, deterministic in ``seed``.

    Essays have a title line and paragraphs of 4-8 sentences separated by blank lines; every sentence ends with
    ``.`` or ``?`` followed by a space or newline, so sentence boundaries are easy to find. No digits appear (the
    needle's number is the only number in a prompt).
    """
    if num_chars < 0:
        raise ValueError(f"num_chars must be >= 0, got {num_chars}")
    rng = random.Random(seed)
    parts: list[str] = []
    size = 0
    while size < num_chars:
        essay = [f"On {rng.choice(_TOPICS)} and {rng.choice(_TOPICS)}\n"]
        for _ in range(rng.randint(3, 6)):
            essay.append(" ".join(_sentence(rng) for _ in range(rng.randint(4, 8))) + "\n")
        text = "\n".join(essay) + "\n"
        parts.append(text)
        size += len(text)
    return "".join(parts)


def load_haystack(tokenizer, num_tokens: int, *, haystack_dir: str | None = None, seed: int = 0) -> list[int]:
    """At least ``num_tokens`` token ids of haystack text (no special tokens).

    Args:
        tokenizer: a transformers tokenizer.
        num_tokens: how many tokens are needed (the longest context evaluated).
        haystack_dir: a directory of ``*.txt`` files (e.g. Paul Graham essays), read in sorted order and repeated
            as needed; None = :func:`synthetic_essays`.
        seed: seed of the synthetic text.
    Returns:
        Token ids. Documents are tokenized one at a time and concatenated (linear time; the seed re-tokenized the
        growing text on every file), so only the ids at document joins can differ from tokenizing the whole.
    Raises:
        FileNotFoundError: ``haystack_dir`` holds no ``*.txt`` file.
    """
    if haystack_dir is not None:
        files = sorted(glob.glob(os.path.join(haystack_dir, "*.txt")))
        if not files:
            raise FileNotFoundError(f"no *.txt files in --haystack_dir {haystack_dir!r}; omit the flag to use the "
                                    "built-in synthetic essays")
        docs = []
        for path in files:
            with open(path, encoding="utf-8") as f:
                docs.append(f.read())
    ids: list[int] = []
    i = 0
    while len(ids) < num_tokens:
        if haystack_dir is not None:
            text = docs[i % len(docs)]
        else:  # ~4 characters per token is typical; over-asking is cheap
            text = synthetic_essays(min(max(4 * (num_tokens - len(ids)), 2000), 400_000), seed=seed + i)
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        i += 1
    return ids


__all__ = ["synthetic_essays", "load_haystack"]
