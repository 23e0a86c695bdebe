"""Exact sequence-parallel attention: local kernels, the float32 merge, communication, layouts, and one module per
algorithm, tied together by the registry (registry.py), from which everything else takes the algorithm list.

Imports go one way: registry -> algorithms (zigzag_ring, dist_flash, ulysses, usp; leaves: none imports another) ->
head_parallel (Ulysses/USP) -> ring (the shared ring engine) -> documents, kernels, merge, comm -> backends;
layouts -> comm. Nothing here imports transformers.

Switches for callers: ``lean_all_to_all()`` (a context manager; Ulysses/USP keep only sequence-sharded tensors for
backward), the one way to change an algorithm's behaviour from outside besides its keyword options.
"""
from .dist_flash import dist_flash_attn_func
from .head_parallel import lean_all_to_all
from .kernels import BACKENDS, KERNELS, Kernel, get_kernel, local_attn_func, resolve_backend
from .registry import (
                       ALGORITHMS,
                       SEQ_ALGOS,
                       SP_ALGOS,
                       Algorithm,
                       algorithm_options,
                       check_seq_algo,
                       gather_sequence,
                       get_algorithm,
                       get_attn_func,
                       layout,
                       sequence_granularity,
                       shard_sequence,
)
from .ulysses import ulysses_attn_func
from .usp import usp_attn_func
from .zigzag_ring import zigzag_ring_attn_func

__all__ = ["BACKENDS", "KERNELS", "Kernel", "get_kernel", "local_attn_func", "resolve_backend", "ALGORITHMS",
           "SEQ_ALGOS", "SP_ALGOS", "Algorithm", "algorithm_options", "check_seq_algo", "gather_sequence",
           "get_algorithm", "get_attn_func", "layout", "sequence_granularity", "shard_sequence", "dist_flash_attn_func",
           "lean_all_to_all", "ulysses_attn_func", "usp_attn_func", "zigzag_ring_attn_func"]
