"""The algorithm table: one entry per ``seq_algo``; adding an algorithm is one entry and one module."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from .dist_flash import dist_flash_attn_func
from .sharding import SEQ_ALGOS, check_seq_algo
from .ulysses import ulysses_attn_func
from .usp import usp_attn_func
from .zigzag_ring import zigzag_ring_attn_func


@dataclass(frozen=True)
class Algorithm:
    """An algorithm's attention function; its sequence layout lives in sharding.layout()."""

    name: str
    attn_func: Optional[Callable]  # None: plain data parallelism, the model's own attention


ALGORITHMS = {
    "zigzag_ring_attn": Algorithm("zigzag_ring_attn", zigzag_ring_attn_func),
    "dist_flash_attn": Algorithm("dist_flash_attn", dist_flash_attn_func),
    "ulysses_attn": Algorithm("ulysses_attn", ulysses_attn_func),
    "usp_attn": Algorithm("usp_attn", usp_attn_func),
    "data_parallel": Algorithm("data_parallel", None),
}
assert tuple(ALGORITHMS) == SEQ_ALGOS


def get_algorithm(seq_algo: str) -> Algorithm:
    check_seq_algo(seq_algo)
    return ALGORITHMS[seq_algo]


def get_attn_func(seq_algo: str):
    """The sequence-parallel attention function of ``seq_algo`` (None for ``data_parallel``)."""
    return get_algorithm(seq_algo).attn_func
