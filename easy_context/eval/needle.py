"""Needle-in-a-haystack evaluation with a sequence-parallel forward (the logic behind ``eval_needle.py``).

A prompt is ``prefix + haystack (with needle and distractors spliced in at sentence boundaries) + question``,
exactly ``context_length`` tokens, followed by the answer tokens. Accuracy is teacher-forced, as in the seed: one
forward of prompt + answer, and a sample is correct when the argmax predictions at the positions before each
answer token equal the answer tokens. Each rank computes logits only at the answer positions it holds
(``logits_to_keep``) and the predictions are combined with one all-reduce of ``len(answer)`` ids: no full logits
are ever materialised or gathered.

Any tokenizer works: sentence boundaries are found from decoded text, and the answer tokens are whatever the
tokenizer produces for the number when it follows the question (so a tokenizer that makes the space before a
number its own token, as llama-3's does, gets that token in the answer instead of a mis-tokenized prompt).

Two tasks (:data:`NEEDLE_TASKS`, ``--task``): ``magic_number``, the seed's ("The special magic Singapore number
is: 1234567.", distractors in other cities), and ``kv``, the needle demo's key -> value facts (``" KQX: 4821."``,
question ``"\n? KQX:"``; keys drawn per sample from the eval key space of :mod:`easy_context.eval.facts`, so a
model trained on that module's training rows never saw them).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from . import facts

NEEDLE_FORMAT = "\nThe special magic {city} number is: {number}.\n"
PREFIX = "This is a very long story book: <book>"
QUESTION_FORMAT = ("</book>.\n Based on the content of the book, Question: What is the special magic {city} number? "
                   "Answer: The special magic {city} number is:")
DISTRACTOR_CITIES = ("New York", "London", "Paris", "Tokyo", "Beijing", "Berlin")
_TERMINATORS = ".!?"
_CLOSERS = "\"')]’”»"
RESULT_COLUMNS = ["context_length", "depth_percent", "score", "correct", "num_samples"]


@dataclass(frozen=True)
class NeedleTask:
    """The text of a task: ``prefix``, then the haystack with needles ``needle_format``, then ``question_format``;
    the answer is the needle's value. Formats name the key ``{key}`` or ``{city}``, the value ``{value}`` or
    ``{number}``."""

    prefix: str
    needle_format: str
    question_format: str

    def needle(self, key: str, value) -> str:
        return self.needle_format.format(key=key, city=key, value=value, number=value)

    def question(self, key: str) -> str:
        return self.question_format.format(key=key, city=key)


NEEDLE_TASKS = {"magic_number": NeedleTask(PREFIX, NEEDLE_FORMAT, QUESTION_FORMAT),
                "kv": NeedleTask(facts.PREFIX, facts.FACT_FORMAT, facts.QUESTION_FORMAT)}


@dataclass(frozen=True, kw_only=True)
class NeedleConfig:
    """The grid and the needles (the seed's flags). Context length = prompt tokens, prefix and question included."""

    min_context_length: int = 1000
    max_context_length: int = 100000
    context_interval: int = 1000
    depth_interval: float = 0.1
    num_samples: int = 10
    rnd_number_digits: int = 7
    num_distractor: int = 0
    city: str = "Singapore"
    seed: int = 24242424
    task: str = "magic_number"        # a key of NEEDLE_TASKS
    key_length: int = 3               # kv: capitals per key
    lengths: tuple[int, ...] = ()     # the context lengths, instead of min..max by interval (e.g. doubling)

    def __post_init__(self):
        if not 0 < self.min_context_length <= self.max_context_length or self.context_interval < 1:
            raise ValueError("need 0 < --min_context_length <= --max_context_length and --context_interval >= 1")
        if any(n < 1 for n in self.lengths):
            raise ValueError(f"--context-lengths must be positive, got {list(self.lengths)}")
        if self.task not in NEEDLE_TASKS:
            raise ValueError(f"--task {self.task!r}: choose one of {', '.join(NEEDLE_TASKS)}")
        if self.task == "kv" and self.key_length < 2:
            raise ValueError(f"--key-length must be >= 2 (a lone capital starts sentences), got {self.key_length}")
        if not 0 < self.depth_interval <= 1:
            raise ValueError(f"--depth_interval must be in (0, 1], got {self.depth_interval}")
        if self.num_samples < 1 or self.rnd_number_digits < 1 or self.num_distractor < 0:
            raise ValueError("need --num_samples >= 1, --rnd_number_digits >= 1, --num_distractor >= 0")

    @property
    def context_lengths(self) -> list[int]:
        if self.lengths:
            return sorted(set(self.lengths))
        return list(range(self.min_context_length, self.max_context_length + 1, self.context_interval))

    @property
    def depths(self) -> list[float]:
        steps = int(1 / self.depth_interval + 1e-9)
        return [round(k * self.depth_interval, 6) for k in range(steps + 1)]

    def needles(self, sample: int) -> tuple[str, int | str, list[tuple[str, int | str]]]:
        """``(key, value, [(distractor key, value), ...])`` of sample ``sample``: the same in every cell. The
        magic-number task's key is ``city``; the kv task draws ``1 + num_distractor`` eval keys per sample."""
        rng = random.Random(f"{self.seed}-needle-{sample}")
        if self.task == "kv":
            (key, value), *others = facts.draw_facts(rng, 1 + self.num_distractor, split="eval",
                                                     key_length=self.key_length, value_digits=self.rnd_number_digits)
            return key, value, others
        low, high = 10 ** (self.rnd_number_digits - 1), 10 ** self.rnd_number_digits - 1
        cities = [c for c in DISTRACTOR_CITIES if c != self.city]
        return self.city, rng.randint(low, high), [(cities[i % len(cities)], rng.randint(low, high))
                                                   for i in range(self.num_distractor)]


class SentenceBoundaries:
    """Where text can be spliced into a token sequence: after a sentence, found from decoded text.

    Position ``i`` (insert before ``ids[i]``) is a boundary when ``ids[i-1]`` decodes to text ending in ``.``, ``!``
    or ``?`` (optionally followed by closing quotes) and whitespace follows it, either inside that token (``".\\n"``)
    or at the start of ``ids[i]`` (``" The"``, or SentencePiece's ``"▁The"``, which only shows its space when
    decoded after another token: hence the pair decode). No token id is hard-coded.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._pieces: dict[int, str] = {}

    def _piece(self, token_id: int) -> str:
        if token_id not in self._pieces:
            self._pieces[token_id] = self.tokenizer.decode([token_id])
        return self._pieces[token_id]

    def is_boundary(self, ids: list[int], i: int) -> bool:
        """Whether text can go before ``ids[i]`` (``i == len(ids)``: after a final complete sentence)."""
        if not 0 <= i <= len(ids):
            return False
        if i == 0:
            return True
        piece = self._piece(ids[i - 1])
        stripped = piece.rstrip()
        if not stripped.rstrip(_CLOSERS).endswith(tuple(_TERMINATORS)):
            return False
        if len(stripped) < len(piece) or i == len(ids):
            return True
        return self._space_leads(ids, i)

    def _space_leads(self, ids: list[int], i: int) -> bool:
        """Whether ``ids[i]``'s text starts with whitespace after ``ids[i - 1]`` (decoded as a pair: SentencePiece
        shows a token's leading space only after another token)."""
        piece = self._piece(ids[i - 1])
        pair = self.tokenizer.decode([ids[i - 1], ids[i]])
        return pair.startswith(piece) and pair[len(piece):len(piece) + 1].isspace()

    def separated(self, ids: list[int], i: int) -> bool:
        """Whether whitespace ends ``ids[i - 1]``'s text or starts ``ids[i]``'s (``0 < i < len(ids)``)."""
        return self._piece(ids[i - 1])[-1:].isspace() or self._space_leads(ids, i)

    def nearest_boundary(self, ids: list[int], start: int) -> int:
        """The first boundary at or after ``start``; if there is none (the haystack ends mid-sentence), the last
        one before it."""
        start = min(max(start, 0), len(ids))
        for i in range(start, len(ids) + 1):
            if self.is_boundary(ids, i):
                return i
        return next((i for i in range(start - 1, 0, -1) if self.is_boundary(ids, i)), 0)


def split_answer(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    """``(question ids, answer ids)`` whose concatenation is the tokenizer's encoding of ``question + " " + answer``.

    Encoding the answer on its own would tokenize it as the start of a text (SentencePiece adds a ``▁``; byte-level
    BPE drops the space that in context may be its own token). The split point is where the encoding of the
    question alone stops agreeing with the joint encoding.
    """
    q = tokenizer(question, add_special_tokens=False)["input_ids"]
    full = tokenizer(question + " " + answer, add_special_tokens=False)["input_ids"]
    k = 0
    while k < min(len(q), len(full)) and q[k] == full[k]:
        k += 1
    return full[:k], full[k:]


def _prefix_ids(tokenizer, prefix: str = PREFIX) -> list[int]:
    """The prefix with the tokenizer's leading special tokens (BOS), without trailing ones (EOS)."""
    bare = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    full = tokenizer(prefix)["input_ids"]
    for k in range(len(full) - len(bare) + 1):
        if full[k:k + len(bare)] == bare:
            return full[:k + len(bare)]
    return bare


@dataclass
class NeedlePrompt:
    """One sample's tokens. ``input_ids`` = prompt (``context_length`` tokens) + answer."""

    input_ids: list[int]
    answer_start: int                      # index of the first answer token in input_ids
    answer_ids: list[int]
    number: int | str
    needle_span: tuple[int, int]           # [start, end) of the needle in input_ids
    distractor_spans: list[tuple[int, int]] = field(default_factory=list)
    needle_depth: float = 0.0              # where the needle landed, as a fraction of the haystack


def build_prompt(tokenizer, haystack_ids: list[int], *, context_length: int, depth: float, number: int | str,
                 distractors: list[tuple[str, int | str]] = (), distractor_depths: list[float] = (),
                 city: str = "Singapore", boundaries: SentenceBoundaries | None = None,
                 task: NeedleTask = NEEDLE_TASKS["magic_number"]) -> NeedlePrompt:
    """Splice the needle (at ``depth``) and distractors (at ``distractor_depths``) into the haystack.

    ``city`` is the needle's key and ``number`` its value, written in ``task``'s formats.

    The haystack is cut so that the whole prompt has exactly ``context_length`` tokens; each insertion point is
    the first sentence boundary at or after ``depth * len(haystack)`` (depth 0 = the start; 1 = the end, or the last
    sentence end when the cut haystack ends mid-sentence). Inserts at the start are followed by a space when the
    haystack's first token has none (and the haystack is one space shorter): every insert is a sentence of its own.
    Raises:
        ValueError: ``context_length`` leaves no room for haystack, the haystack is too short, or a depth is
            outside [0, 1].
    """
    boundaries = boundaries or SentenceBoundaries(tokenizer)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prefix = _prefix_ids(tokenizer, task.prefix)
    question, answer = split_answer(tokenizer, task.question(city), str(number))
    if len(distractors) != len(distractor_depths) or not all(0 <= d <= 1 for d in (depth, *distractor_depths)):
        raise ValueError("need one depth in [0, 1] per distractor, and a needle depth in [0, 1]")
    # (depth, tokens): the needle first, then the distractors
    inserts = [(depth, encode(task.needle(city, number)))]
    inserts += [(d, encode(task.needle(c, n))) for (c, n), d in zip(distractors, distractor_depths)]
    room = context_length - len(prefix) - len(question) - sum(len(ids) for _, ids in inserts)
    if room < 1:
        raise ValueError(f"context length {context_length} leaves no room for haystack (prefix, question, needle and "
                         f"distractors take {context_length - room} tokens); raise --min_context_length")
    if len(haystack_ids) < room:
        raise ValueError(f"haystack has {len(haystack_ids)} tokens, {room} needed")
    def insertion_points(hay):  # in the original haystack, spliced in order (ties: needle first)
        return sorted((boundaries.nearest_boundary(hay, int(len(hay) * d)), k) for k, (d, _) in enumerate(inserts))

    hay = haystack_ids[:room]
    points = insertion_points(hay)
    # Inside the haystack an insert goes after a sentence end and before the whitespace that follows it. At the
    # haystack's start no whitespace need follow ("Facts:\n FIK: 884.On Ideas..."): then a space goes after the
    # inserts there, and the haystack gives up as many tokens at its end, so the length stays exact.
    sep = []
    at_start = [k for pos, k in points if pos == 0]
    if at_start and hay:
        last = inserts[at_start[-1]][1]
        if not boundaries.separated(last + hay[:1], len(last)):
            sep = encode(" ")
            hay = haystack_ids[:room - len(sep)]
            points = insertion_points(hay)
    ids, spans, prev = list(prefix), {}, 0
    for j, (pos, k) in enumerate(points):
        ids += hay[prev:pos]
        spans[k] = (len(ids), len(ids) + len(inserts[k][1]))
        ids += inserts[k][1]
        prev = pos
        if pos == 0 and (j + 1 == len(points) or points[j + 1][0] > 0):
            ids += sep
    ids += hay[prev:]
    answer_start = len(ids) + len(question)
    needle_pos = next(pos for pos, k in points if k == 0)
    return NeedlePrompt(input_ids=ids + question + answer, answer_start=answer_start, answer_ids=answer,
                        number=number, needle_span=spans[0],
                        distractor_spans=[spans[k] for k in range(1, len(inserts))],
                        needle_depth=needle_pos / len(hay))


def answer_predictions(model, input_ids: torch.Tensor, answer_start: int, num_answer: int, *, seq_algo: str,
                       device) -> torch.Tensor:
    """Argmax predictions for the ``num_answer`` answer tokens (at positions ``answer_start - 1 ...``).

    Collective over the world for the sequence-parallel modes (every rank passes the same ``input_ids``
    ``(1, seq)``); ``data_parallel`` runs the whole sequence locally.
    Returns:
        ``(num_answer,)`` int64 on ``device``, the same on every rank.
    """
    import torch.distributed as dist

    from ..api import prepare_seq_parallel_inputs
    from ..utils import rank_world
    from .common import all_reduce_

    rank, world = rank_world()
    p = prepare_seq_parallel_inputs(seq_algo, input_ids, None, None, rank, world, device)
    pos = p["local_position_ids"][0]  # global positions of this rank's tokens (padding continues past the end)
    first = answer_start - 1
    keep = ((pos >= first) & (pos < first + num_answer)).nonzero().squeeze(1)
    with torch.inference_mode():
        logits = model(p["local_input_ids"], position_ids=p["local_position_ids"], use_cache=False,
                       logits_to_keep=keep).logits  # (1, len(keep), vocab): only the answer positions held here
    preds = torch.full((num_answer,), -1, dtype=torch.long, device=device)
    preds[pos[keep] - first] = logits[0].argmax(-1)
    if seq_algo != "data_parallel":
        all_reduce_(preds, dist.ReduceOp.MAX)  # each answer position is held by exactly one rank; others say -1
    return preds


__all__ = ["NeedleConfig", "NeedlePrompt", "NeedleTask", "NEEDLE_TASKS", "SentenceBoundaries", "build_prompt",
           "split_answer", "answer_predictions", "NEEDLE_FORMAT", "QUESTION_FORMAT", "PREFIX", "RESULT_COLUMNS"]
