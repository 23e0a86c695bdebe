"""The sequence-parallel settings as one object: algorithm, group size, ring degree, kernel backend.

:class:`SPAttentionConfig` is built once, validated in ``__post_init__``, and handed to every function of the API
(``apply_seq_parallel_monkey_patch``, ``prepare_seq_parallel_inputs``, ``gather_seq_parallel_outputs``,
``prepare_dataloader``) and to the transformers integration, which registers one attention per distinct config.
The seed's string form (``"usp_attn", sp_size=4, ring_degree=2``) is parsed into the same object by
:func:`sp_config`, so a model patched and inputs sharded with the same config cannot disagree.
"""
from __future__ import annotations

from dataclasses import dataclass

from .attention.registry import SP_ALGOS, algorithm_options, check_seq_algo, get_attn_func

# transformers runs extra checks (and kernel loading) on implementation names containing these substrings.
_RESERVED_SUBSTRINGS = {"flash": "fa", "sdpa": "sdp", "flex": "flx"}


def safe_attn_name(name: str) -> str:
    """``name`` with the substrings transformers treats specially (flash, sdpa, flex) spelled otherwise, so a name
    registered with AttentionInterface is taken as a plain custom implementation."""
    for bad, good in _RESERVED_SUBSTRINGS.items():
        name = name.replace(bad, good)
    return name


@dataclass(frozen=True)
class SPAttentionConfig:
    """The sequence-parallel settings of a run; one registered attention name per distinct configuration.

    Args:
        seq_algo: an algorithm of the registry (``easy_context.attention.SEQ_ALGOS``; ``"data_parallel"``: the
            model's own attention, nothing sharded).
        sp_size: ranks per sequence-parallel group (consecutive ranks); None = the whole world. Checked against the
            world size where it is used.
        ring_degree: ``usp_attn`` only: ranks in the ring dimension.
        backend: local kernel backend passed to the algorithm (None = the core's default / env choice).
    Raises:
        ValueError: an unknown algorithm, a non-positive ``sp_size``, an option the algorithm does not take.
    """

    seq_algo: str
    sp_size: int | None = None
    ring_degree: int | None = None
    backend: str | None = None

    def __post_init__(self):
        check_seq_algo(self.seq_algo)
        if self.sp_size is not None and (not isinstance(self.sp_size, int) or isinstance(self.sp_size, bool)
                                         or self.sp_size < 1):
            raise ValueError(f"sp_size={self.sp_size!r} must be a positive int (a divisor of the world size) or None")
        algorithm_options(self.seq_algo, ring_degree=self.ring_degree)

    @property
    def sequence_parallel(self) -> bool:
        """Whether the algorithm shards the sequence (False for ``data_parallel``)."""
        return get_attn_func(self.seq_algo) is not None

    def require_sequence_parallel(self) -> None:
        """Raise ValueError for ``data_parallel``: there is no attention of ours to register for it."""
        if not self.sequence_parallel:
            raise ValueError(f"{self.seq_algo} uses the model's own attention; there is nothing to register "
                             f"(sequence-parallel algorithms: {', '.join(SP_ALGOS)})")

    @property
    def name(self) -> str:
        """The ``attn_implementation`` name, e.g. ``easy_context_usp_attn_sp4_ring2``."""
        parts = [f"easy_context_{self.seq_algo}"]
        if self.sp_size is not None:
            parts.append(f"sp{self.sp_size}")
        if self.ring_degree is not None:
            parts.append(f"ring{self.ring_degree}")
        if self.backend is not None:
            parts.append(str(self.backend))
        return safe_attn_name("_".join(parts))

    @property
    def options(self) -> dict:
        """Keyword options the algorithm's attention and sharding both take."""
        return {} if self.ring_degree is None else {"ring_degree": self.ring_degree}


def sp_config(spec: str | SPAttentionConfig, **settings) -> SPAttentionConfig:
    """The :class:`SPAttentionConfig` of an API call: ``spec`` itself, or one built from an algorithm name and the
    keyword ``settings`` (``sp_size``, ``ring_degree``, ``backend``; None = not given).

    Raises:
        ValueError: a config together with settings given as keywords (pass them once), or a bad setting.
        TypeError: ``spec`` neither a config nor a string.
    """
    given = {k: v for k, v in settings.items() if v is not None}
    if isinstance(spec, SPAttentionConfig):
        if given:
            raise ValueError(f"{', '.join(sorted(given))} given both in the SPAttentionConfig and as keywords: pass "
                             "the settings once (in the config, or as keywords with the algorithm name)")
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"seq_algo must be an algorithm name or an SPAttentionConfig, got {type(spec).__name__}")
    return SPAttentionConfig(spec, **given)


__all__ = ["SPAttentionConfig", "sp_config", "safe_attn_name"]
