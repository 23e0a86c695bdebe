"""The documents of a packed global row, read once per forward from every rank's local position ids (layer 0 of
the attention registered by hf.py)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..sp_config import SPAttentionConfig



def global_documents(position_ids, local_len: int, config: SPAttentionConfig, group):
    """The document boundaries of the global rows (None: one document per row), from every rank's local
    ``position_ids``: packed rows restart their positions at 0 at each document start (transformers' convention).

    One small shape check and one all-gather of the positions over ``group``; every rank gets the same answer, so
    an error is raised on every rank together.

    Raises:
        ValueError: the model got local positions ``0..local_len-1`` on every rank (it was called without the global
            positions: transformers then numbers each shard from 0 and RoPE and the documents would be wrong), or
            positions that neither continue nor restart at 0; packed rows under an algorithm without document support.
    """
    import torch
    import torch.distributed as dist

    from ..attention.comm import check_same_across_group
    from ..attention.documents import boundaries_from_positions
    from ..attention.layouts import assemble
    from ..attention.registry import get_algorithm, layout

    if position_ids is None:
        return None
    world = dist.get_world_size(group)
    if world > 1:
        check_same_across_group(dict(position_rows=position_ids.shape[0], local_len=position_ids.shape[-1]), group,
                                position_ids.device, config.name)
        n, chunks = layout(config.seq_algo, world, **config.options)
        device = position_ids.device if dist.get_backend(group) == "nccl" else "cpu"
        local = position_ids.to(device)
        arange = torch.arange(local_len, device=device)
        # every rank at 0..local_len-1: the model numbered its shard itself (checked before reading documents,
        # whose positions would then be wrong)
        flags = torch.tensor([float(bool((local == arange).all()))], device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=group)
        if flags.item():
            raise ValueError(f"{config.name}: every rank got positions 0..{local_len - 1}: the model was called "
                             "without the global positions of its shard. Pass "
                             "position_ids=prepared['local_position_ids'] from prepare_seq_parallel_inputs (if the "
                             "row really is documents of exactly "
                             f"{local_len} tokens aligned with the shards, use zigzag_ring_attn)")
        position_ids = assemble(local, n, chunks, group, dim=-1)
    docs = boundaries_from_positions(position_ids.reshape(-1, position_ids.shape[-1]))
    if docs is not None and not get_algorithm(config.seq_algo).documents:
        from ..attention.dist_flash import DOCUMENTS_UNSUPPORTED
        raise ValueError(f"{config.name}: {DOCUMENTS_UNSUPPORTED}")
    return docs


__all__ = ["global_documents"]
