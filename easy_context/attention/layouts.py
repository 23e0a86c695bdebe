"""Sequence layouts: which slice of the global sequence each rank holds.

A layout cuts the sequence into ``n`` equal chunks and gives rank ``r`` an ordered list of them; each is a function
``(world_size, **options) -> (n, chunks_of_rank)`` that an algorithm names in the registry (registry.py):

* :func:`whole` (``data_parallel``): every rank holds the whole sequence;
* :func:`contiguous` (``dist_flash_attn``, ``ulysses_attn``): ``n = W``, rank r holds ``[r]``;
* :func:`zigzag` (``zigzag_ring_attn``): ``n = 2W``, rank r holds ``[r, 2W-1-r]``;
* :func:`usp` (``usp_attn``, R ring x U Ulysses): ``n = 2W`` fine chunks; ring position g owns zigzag chunks
  ``g`` and ``2R-1-g`` (each U fine chunks), and Ulysses rank u holds fine chunks ``2u, 2u+1`` of that list of
  2U; group rank ``g*U + u``.

Positions travel with the tokens: shard ``position_ids`` with the same layout so RoPE sees global positions.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .comm import usp_degrees

Chunks = tuple[int, list[list[int]]]


def whole(world_size: int) -> Chunks:
    return 1, [[0] for _ in range(world_size)]


def contiguous(world_size: int) -> Chunks:
    return world_size, [[r] for r in range(world_size)]


def zigzag(world_size: int) -> Chunks:
    w = world_size
    return 2 * w, [[r, 2 * w - 1 - r] for r in range(w)]


def usp(world_size: int, *, ring_degree: int | None = None) -> Chunks:
    ring, uly = usp_degrees(world_size, ring_degree)
    chunks = []
    for g in range(ring):
        own = list(range(g * uly, (g + 1) * uly)) + list(range((2 * ring - 1 - g) * uly, (2 * ring - g) * uly))
        chunks += [own[2 * u: 2 * u + 2] for u in range(uly)]
    return 2 * world_size, chunks


def take(x: torch.Tensor, n: int, chunks: list[int], dim: int = 1) -> torch.Tensor:
    """The ``chunks`` (indices among ``n`` equal ones along ``dim``) of ``x``, concatenated, contiguous."""
    pieces = x.chunk(n, dim=dim)
    return torch.cat([pieces[i] for i in chunks], dim=dim).contiguous()


def assemble(x_local: torch.Tensor, n: int, chunks_of_rank: list[list[int]], group=None, dim: int = 1) -> torch.Tensor:
    """All-gather every rank's chunks over ``group`` and put the ``n`` chunks back in sequence order."""
    x_local = x_local.contiguous()
    parts = [torch.empty_like(x_local) for _ in chunks_of_rank]
    dist.all_gather(parts, x_local, group=group)
    ordered = [None] * n
    for r, part in enumerate(parts):
        for i, piece in zip(chunks_of_rank[r], part.chunk(len(chunks_of_rank[r]), dim=dim)):
            ordered[i] = piece
    return torch.cat(ordered, dim=dim)


__all__ = ["Chunks", "whole", "contiguous", "zigzag", "usp", "take", "assemble"]
