"""Sequence layouts: which slice of the global sequence each rank holds, for every algorithm.

A layout cuts the sequence into ``n`` equal chunks and gives rank ``r`` an ordered list of them:

* contiguous (``dist_flash_attn``, ``ulysses_attn``): ``n = W``, rank r holds ``[r]``;
* zigzag (``zigzag_ring_attn``): ``n = 2W``, rank r holds ``[r, 2W-1-r]``;
* usp (``usp_attn``, R ring x U Ulysses): ``n = 2W`` fine chunks; ring position g owns zigzag chunks
  ``g`` and ``2R-1-g`` (each U fine chunks), and Ulysses rank u holds fine chunks ``2u, 2u+1`` of that
  list of 2U; group rank ``g*U + u``;
* ``data_parallel``: every rank holds the whole sequence.

Positions travel with the tokens: shard ``position_ids`` with the same call so RoPE sees global positions.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .comm import group_rank_size, usp_degrees

SEQ_ALGOS = ("zigzag_ring_attn", "dist_flash_attn", "ulysses_attn", "usp_attn", "data_parallel")


def check_seq_algo(seq_algo: str) -> None:
    if seq_algo not in SEQ_ALGOS:
        raise ValueError(f"unknown seq_algo {seq_algo!r}; supported: {', '.join(SEQ_ALGOS)}")


def layout(seq_algo: str, world_size: int, *, ring_degree: int | None = None) -> tuple[int, list[list[int]]]:
    """``(n_chunks, chunks_of_rank)`` for ``seq_algo`` over ``world_size`` ranks."""
    check_seq_algo(seq_algo)
    w = world_size
    if seq_algo == "data_parallel" or w == 1:
        return 1, [[0] for _ in range(w)]
    if seq_algo in ("dist_flash_attn", "ulysses_attn"):
        return w, [[r] for r in range(w)]
    if seq_algo == "zigzag_ring_attn":
        return 2 * w, [[r, 2 * w - 1 - r] for r in range(w)]
    ring, uly = usp_degrees(w, ring_degree)
    chunks = []
    for g in range(ring):
        own = list(range(g * uly, (g + 1) * uly)) + list(range((2 * ring - 1 - g) * uly, (2 * ring - g) * uly))
        chunks += [own[2 * u: 2 * u + 2] for u in range(uly)]
    return 2 * w, chunks


def sequence_granularity(seq_algo: str, world_size: int, *, ring_degree: int | None = None) -> int:
    """The global sequence length must be a multiple of this (pad to it otherwise)."""
    return layout(seq_algo, world_size, ring_degree=ring_degree)[0]


def _check_len(seq_algo, length, n, world_size):
    if length % n:
        raise ValueError(f"{seq_algo}: sequence length {length} is not divisible by {n} (= the layout's chunk "
                         f"count for world_size={world_size}); pad it to a multiple of {n} "
                         f"(prepare_seq_parallel_inputs pads automatically)")


def shard_sequence(seq_algo: str, x: torch.Tensor, rank: int, world_size: int, dim: int = 1, *,
                   ring_degree: int | None = None) -> torch.Tensor:
    """This rank's slice of ``x`` along ``dim`` for ``seq_algo`` (see module docstring).

    Args:
        x: the full sequence on every rank (e.g. ``(batch, seq)`` ids or ``(batch, seq, ...)`` activations).
        rank, world_size: position within the sequence-parallel group.
        ring_degree: usp only; must match the attention call.
    Returns:
        A contiguous tensor with ``x.shape[dim] * len(chunks) / n`` elements along ``dim``.
    Raises:
        ValueError: unknown algo, bad rank, or a length not divisible by the granularity.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    n, chunks = layout(seq_algo, world_size, ring_degree=ring_degree)
    _check_len(seq_algo, x.shape[dim], n, world_size)
    pieces = x.chunk(n, dim=dim)
    return torch.cat([pieces[i] for i in chunks[rank]], dim=dim).contiguous()


def gather_sequence(seq_algo: str, x_local: torch.Tensor, group=None, dim: int = 1, *,
                    ring_degree: int | None = None) -> torch.Tensor:
    """All-gather the local slices of ``group`` and return the full sequence in original order on every rank.

    Not differentiable (for evaluation: predictions, logits at selected positions, ...). ``data_parallel``
    returns ``x_local`` unchanged. Every rank must pass the same shape.
    """
    rank, world = group_rank_size(group)
    n, chunks = layout(seq_algo, world, ring_degree=ring_degree)
    if world == 1 or seq_algo == "data_parallel":
        return x_local
    x_local = x_local.contiguous()
    parts = [torch.empty_like(x_local) for _ in range(world)]
    dist.all_gather(parts, x_local, group=group)
    ordered = [None] * n
    for r, part in enumerate(parts):
        for i, piece in zip(chunks[r], part.chunk(len(chunks[r]), dim=dim)):
            ordered[i] = piece
    return torch.cat(ordered, dim=dim)
