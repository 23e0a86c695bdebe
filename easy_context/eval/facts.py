"""Key -> value facts in essay text: the ``kv`` task of ``eval_needle.py --task kv`` (:mod:`.needle` builds its
prompts), its format and its two disjoint key spaces. Imports nothing of the package: :mod:`.needle` imports it, and
the needle demo (``examples/needle_demo``: its training rows, ``rows.fact_rows``) imports both.

The format is made for a byte-level tokenizer (a fact costs a dozen tokens). The haystack is
:func:`~easy_context.eval.haystack.synthetic_essays` (no digits, never two capitals in a row); a fact
``" KQX: 4821."`` is spliced in after a sentence; a prompt ends with the question ``"\\n? KQX:"``, whose answer is
``" 4821"``, the value of the fact with that key. Distractors are facts with other keys.

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
from collections.abc import Iterable

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


__all__ = ["PREFIX", "FACT_FORMAT", "QUESTION_FORMAT", "SPLITS", "EVAL_SHARE", "key_split", "draw_facts",
           "find_key_leaks"]
