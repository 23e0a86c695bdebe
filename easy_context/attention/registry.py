"""The algorithm registry: one entry per ``seq_algo`` holds its attention function, its sequence layout and the
options it accepts. Everything else derives from it: ``SEQ_ALGOS``, the CLI choices, option validation, sharding
and gathering of sequences, the demo and the tests. Adding an algorithm is one module and one entry here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import layouts
from .comm import group_rank_size, usp_degrees
from .dist_flash import dist_flash_attn_func
from .head_parallel import ulysses_kv_replication
from .ulysses import ulysses_attn_func
from .usp import usp_attn_func
from .zigzag_ring import zigzag_ring_attn_func


@dataclass(frozen=True)
class Algorithm:
    """One sequence-parallel algorithm.

    Attributes:
        name: the ``seq_algo`` string.
        attn_func: ``f(q, k, v, causal=True, softmax_scale=None, group=None, *, backend=None, check=True,
            **options)`` over this rank's shard in the flash-attn layout; None: plain data parallelism (the
            model's own attention over the whole sequence).
        layout: ``layout(world_size, **options) -> (n_chunks, chunks_of_rank)`` (layouts.py).
        options: keyword options the algorithm and its layout take beyond the common ones (each None = default).
        check_heads: ``check_heads(heads, kv_heads, world_size, **options)`` raises ValueError when the algorithm
            cannot split a model's attention heads over the group (None: any head count works); run before any
            weights are loaded.
        summary: one line for listings.
        documents: the attention function takes ``cu_seqlens`` (packed documents, documents.py).
        ring: ``ring(world_size, **options)``: positions of the zigzag ring the causal work is spread over (1: every
            rank attends the whole sequence for its heads); used to balance packed documents over the ranks.
    """

    name: str
    attn_func: Optional[Callable]
    layout: Callable[..., layouts.Chunks]
    options: tuple[str, ...] = ()
    check_heads: Optional[Callable] = None
    summary: str = ""
    documents: bool = True
    ring: Callable[..., int] = lambda world_size, **options: 1


def _ulysses_heads(heads: int, kv_heads: int, world_size: int) -> None:
    ulysses_kv_replication(heads, kv_heads, world_size)


def _usp_heads(heads: int, kv_heads: int, world_size: int, *, ring_degree: int | None = None) -> None:
    ulysses_kv_replication(heads, kv_heads, usp_degrees(world_size, ring_degree)[1])


ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("zigzag_ring_attn", zigzag_ring_attn_func, layouts.zigzag, ring=lambda world_size: world_size,
              summary="K/V ring over zigzag chunks (r, 2W-1-r): every step the same causal work"),
    Algorithm("dist_flash_attn", dist_flash_attn_func, layouts.contiguous,
              summary="LightSeq: contiguous chunks, idle ranks compute for busy ones", documents=False),
    Algorithm("ulysses_attn", ulysses_attn_func, layouts.contiguous, check_heads=_ulysses_heads,
              summary="DeepSpeed-Ulysses: all-to-all from sequence to head shards and back"),
    Algorithm("usp_attn", usp_attn_func, layouts.usp, options=("ring_degree",), check_heads=_usp_heads,
              ring=lambda world_size, ring_degree=None: usp_degrees(world_size, ring_degree)[0],
              summary="Ulysses inside groups of W/ring_degree ranks, zigzag ring across them"),
    Algorithm("data_parallel", None, layouts.whole, summary="no sequence parallelism: the model's own attention"),
)}
SEQ_ALGOS: tuple[str, ...] = tuple(ALGORITHMS)
SP_ALGOS: tuple[str, ...] = tuple(name for name, a in ALGORITHMS.items() if a.attn_func is not None)


def check_seq_algo(seq_algo: str) -> None:
    if seq_algo not in ALGORITHMS:
        raise ValueError(f"unknown seq_algo {seq_algo!r}; supported: {', '.join(SEQ_ALGOS)}")


def get_algorithm(seq_algo: str) -> Algorithm:
    check_seq_algo(seq_algo)
    return ALGORITHMS[seq_algo]


def get_attn_func(seq_algo: str):
    """The sequence-parallel attention function of ``seq_algo`` (None for ``data_parallel``)."""
    return get_algorithm(seq_algo).attn_func


def algorithm_options(seq_algo: str, **options) -> dict:
    """``options`` reduced to those given (not None), after checking that ``seq_algo`` takes each.

    Raises:
        ValueError: an option the algorithm does not take (e.g. ``ring_degree`` for anything but ``usp_attn``).
    """
    algo = get_algorithm(seq_algo)
    given = {k: v for k, v in options.items() if v is not None}
    for key in given:
        if key not in algo.options:
            takers = [a.name for a in ALGORITHMS.values() if key in a.options]
            raise ValueError(f"{key} is a {'/'.join(takers) or 'unknown'} option; {seq_algo} does not take it")
    return given


def check_heads(seq_algo: str, heads: int, kv_heads: int, world_size: int, **options) -> None:
    """Raise ValueError (naming the fix) when ``seq_algo`` cannot split ``heads`` / ``kv_heads`` over
    ``world_size`` ranks; nothing for algorithms that take any head count."""
    algo = get_algorithm(seq_algo)
    if algo.check_heads is not None and world_size > 1:
        algo.check_heads(heads, kv_heads, world_size, **algorithm_options(seq_algo, **options))


def layout(seq_algo: str, world_size: int, **options) -> layouts.Chunks:
    """``(n_chunks, chunks_of_rank)`` for ``seq_algo`` over ``world_size`` ranks (one rank: the whole sequence)."""
    opts = algorithm_options(seq_algo, **options)
    if world_size == 1:
        return layouts.whole(1)
    return ALGORITHMS[seq_algo].layout(world_size, **opts)


def sequence_granularity(seq_algo: str, world_size: int, **options) -> int:
    """The global sequence length must be a multiple of this (pad to it otherwise)."""
    return layout(seq_algo, world_size, **options)[0]


def shard_sequence(seq_algo: str, x: torch.Tensor, rank: int, world_size: int, dim: int = 1,
                   **options) -> torch.Tensor:
    """This rank's slice of ``x`` along ``dim`` for ``seq_algo`` (see layouts.py).

    Args:
        x: the full sequence on every rank (e.g. ``(batch, seq)`` ids or ``(batch, seq, ...)`` activations).
        rank, world_size: position within the sequence-parallel group.
        options: the algorithm's options (``ring_degree`` for usp); must match the attention call.
    Returns:
        A contiguous tensor with ``x.shape[dim] * len(chunks) / n`` elements along ``dim``.
    Raises:
        ValueError: unknown algorithm or option, bad rank, or a length not divisible by the granularity.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    n, chunks = layout(seq_algo, world_size, **options)
    if x.shape[dim] % n:
        raise ValueError(f"{seq_algo}: sequence length {x.shape[dim]} is not divisible by {n} (= the layout's chunk "
                         f"count for world_size={world_size}); pad it to a multiple of {n} "
                         f"(prepare_seq_parallel_inputs pads automatically)")
    return layouts.take(x, n, chunks[rank], dim)


def gather_sequence(seq_algo: str, x_local: torch.Tensor, group=None, dim: int = 1, **options) -> torch.Tensor:
    """All-gather the local slices of ``group`` and return the full sequence in original order on every rank.

    Not differentiable (for evaluation: predictions, logits at selected positions, ...). ``data_parallel``
    returns ``x_local`` unchanged. Every rank must pass the same shape.
    """
    _, world = group_rank_size(group)
    n, chunks = layout(seq_algo, world, **options)
    if world == 1 or seq_algo == "data_parallel":
        return x_local
    return layouts.assemble(x_local, n, chunks, group, dim)


__all__ = ["Algorithm", "ALGORITHMS", "SEQ_ALGOS", "SP_ALGOS", "check_seq_algo", "get_algorithm", "get_attn_func",
           "algorithm_options", "check_heads", "layout", "sequence_granularity", "shard_sequence", "gather_sequence"]
