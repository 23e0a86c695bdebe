"""Communication helpers: p2p exchanges for rings, the Ulysses all-to-all, process groups, and the
cross-rank consistency check that runs before any collective so a mismatch is an error, never a hang.

All p2p / collective helpers take an explicit process group (``None`` = the default world group). When
``torch.distributed`` is not initialised, a group of one rank is assumed so every algorithm also runs
single-process (W=1).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..utils import check_sp_size

# ---------------------------------------------------------------- group helpers


class _SelfGroup:
    """A group of just this rank (a degenerate USP dimension); never reaches torch.distributed."""

    def __repr__(self):
        return "SELF_GROUP"


SELF_GROUP = _SelfGroup()


def group_rank_size(group=None) -> tuple[int, int]:
    """``(rank within group, group size)``; ``(0, 1)`` when torch.distributed is not initialised."""
    if group is SELF_GROUP or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def global_rank(group, group_rank: int) -> int:
    """Global rank of ``group_rank`` in ``group`` (p2p ops address peers by global rank)."""
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


# Groups are created once per configuration and kept for the life of the process: creating a group
# is a collective and must not run again per call. Keyed by the configuration, not sized by any call.
_SP_GROUPS: dict[tuple, object] = {}
_USP_GROUPS: dict[tuple, tuple] = {}


def get_sp_group(sp_size: int | None = None):
    """Process group of this rank's sequence-parallel group: consecutive ranks ``[k*sp, (k+1)*sp)``.

    ``None`` (the default world group) when ``sp_size`` is None or equals the world size. Every rank of
    the world must call this (group creation is collective); the groups are created once and cached.

    Raises:
        ValueError: ``sp_size`` does not divide the world size.
    """
    rank, world = group_rank_size(None)
    if check_sp_size(sp_size, world) == world:
        return None
    key = (world, sp_size)
    if key not in _SP_GROUPS:
        mine = None
        for start in range(0, world, sp_size):
            g = dist.new_group(list(range(start, start + sp_size)))
            if start <= rank < start + sp_size:
                mine = g
        _SP_GROUPS[key] = mine
    return _SP_GROUPS[key]


def usp_degrees(world_size: int, ring_degree: int | None) -> tuple[int, int]:
    """``(ring_degree, ulysses_degree)`` for USP over ``world_size`` ranks.

    Default ``ring_degree``: 2 when the world size is even (Ulysses inside pairs of halves, a ring of 2
    across them), else the world size (pure ring). Pass it explicitly to choose another mesh.
    """
    if ring_degree is None:
        ring_degree = 2 if world_size % 2 == 0 else world_size
    if ring_degree < 1 or world_size % ring_degree:
        raise ValueError(f"ring_degree={ring_degree} must divide the sequence-parallel size {world_size}")
    return ring_degree, world_size // ring_degree


def get_usp_groups(group, ring_degree: int | None):
    """``(ulysses_group, ring_group)`` inside ``group`` for USP, created once per (group, ring_degree).

    Group rank ``g * U + u`` is Ulysses rank ``u`` of ring position ``g`` (U = ulysses degree): Ulysses
    groups are consecutive ranks (put them on one node), ring groups are strided.
    Only the members of ``group`` need to call this.
    """
    rank, world = group_rank_size(group)
    ring, uly = usp_degrees(world, ring_degree)
    key = (id(group), world, ring)
    if key not in _USP_GROUPS:
        if world == 1:
            _USP_GROUPS[key] = (SELF_GROUP, SELF_GROUP, group)
        else:
            members = [global_rank(group, r) for r in range(world)]
            g, u = divmod(rank, uly)
            uly_group = dist.new_group([members[g * uly + i] for i in range(uly)], use_local_synchronization=True) \
                if uly > 1 else SELF_GROUP
            ring_group = dist.new_group([members[j * uly + u] for j in range(ring)], use_local_synchronization=True) \
                if ring > 1 else SELF_GROUP
            # keep `group` alive with its derived groups so id() is never reused for another group
            _USP_GROUPS[key] = (uly_group, ring_group, group)
    uly_group, ring_group, _ = _USP_GROUPS[key]
    return uly_group, ring_group, ring, uly


# ---------------------------------------------------------------- consistency check


def _meta_device(group, device: torch.device) -> torch.device:
    return device if dist.get_backend(group) == "nccl" else torch.device("cpu")


def gather_ints(values: list[int], group, device: torch.device) -> list[list[int]]:
    """Every rank's ``values`` (the same count on each), in group-rank order: one small all-gather."""
    rank, world = group_rank_size(group)
    mine = torch.tensor([int(v) for v in values], dtype=torch.int64, device=_meta_device(group, device))
    if world == 1:
        return [mine.tolist()]
    allv = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(allv, mine, group=group)
    return torch.stack(allv).cpu().tolist()


def check_same_across_group(values: dict[str, int], group, device: torch.device, what: str, *,
                            fix: str | None = None) -> None:
    """All ranks of ``group`` must pass the same ``values``; otherwise every rank raises ValueError.

    One small all-gather; runs before any data collective so that ranks which would otherwise post
    mismatched sends/receives (a hang under NCCL) fail together with a message naming the difference and
    ``fix`` (default: shard with prepare_seq_parallel_inputs).
    """
    rank, world = group_rank_size(group)
    if world == 1:
        return
    names = list(values)
    table = gather_ints([values[n] for n in names], group, device)
    bad = [n for i, n in enumerate(names) if any(row[i] != table[0][i] for row in table)]
    if bad:
        per_rank = {n: [row[names.index(n)] for row in table] for n in bad}
        fix = fix or ("every rank must pass tensors of the same shape/dtype and the same options. Shard the batch "
                      "with prepare_seq_parallel_inputs / shard_sequence so each rank holds an equal slice.")
        raise ValueError(f"{what}: ranks of the group disagree on {bad} (per rank: {per_rank}); {fix}")


_FINGERPRINT_MOD = 2**31 - 1  # prime; every product below stays under 2**62


def fingerprint(x: torch.Tensor | None) -> int:
    """A 62-bit checksum of an integer tensor's values in their order (-1 for None): equal tensors give equal
    numbers on every rank and device, and a changed, moved or missing value a different one but with probability
    about 2**-62. Two position-weighted sums modulo a prime, computed where ``x`` is (one small sync).
    Not a cryptographic hash: it guards against programming errors, not adversaries."""
    if x is None:
        return -1
    p = _FINGERPRINT_MOD
    flat = torch.remainder(x.reshape(-1).to(torch.int64), p)  # (n,) in [0, p)
    index = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.int64)
    sums = []
    for mult in (48271, 69621):  # two weightings: w_i = (i * mult) mod p, never 0 for i < p
        w = torch.remainder(index * mult, p)
        sums.append(torch.remainder(flat * w, p).sum())  # n < 2**32 terms below 2**31 each: no overflow
    h1, h2 = torch.remainder(torch.stack(sums), p).tolist()
    return (h1 << 31) | h2


_DTYPE_CODES = {torch.float64: 1, torch.float32: 2, torch.bfloat16: 3, torch.float16: 4}


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPE_CODES.get(dtype, 0)


# ---------------------------------------------------------------- p2p


class Pending:
    """Outstanding p2p receives; ``wait()`` returns the received tensors."""

    def __init__(self, works, received):
        self._works, self._received = works, received

    def wait(self):
        for w in self._works:
            w.wait()
        self._works = []
        return self._received


def exchange(send: list[torch.Tensor], dst: int | None, recv_like: list[torch.Tensor], src: int | None,
             group) -> Pending:
    """Post async sends of ``send`` to group rank ``dst`` and receives shaped like ``recv_like`` from ``src``.

    Either side may be ``None`` (nothing to send / receive). Tensors are sent contiguous.
    """
    ops, received = [], []
    if dst is not None:
        for t in send:
            ops.append(dist.P2POp(dist.isend, t.contiguous(), global_rank(group, dst), group))
    if src is not None:
        for t in recv_like:
            buf = torch.empty(t.shape, dtype=t.dtype, device=t.device)
            received.append(buf)
            ops.append(dist.P2POp(dist.irecv, buf, global_rank(group, src), group))
    works = dist.batch_isend_irecv(ops) if ops else []
    return Pending(works, received)


class RingComm:
    """Rank position and size of one ring (a process group); posts exchanges with its members."""

    def __init__(self, group=None):
        self.group = group
        self.rank, self.world = group_rank_size(group)

    def exchange(self, send: list[torch.Tensor], dst: int | None, recv_like: list[torch.Tensor],
                 src: int | None) -> Pending:
        """Post sends of ``send`` to group rank ``dst`` and receives shaped like ``recv_like`` from ``src``."""
        return exchange(send, dst, recv_like, src, self.group)


# ---------------------------------------------------------------- Ulysses all-to-all

def _a2a(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous, unlike empty_like of a view
    dist.all_to_all_single(out, x, group=group)
    return out


def _all_to_all_4d(x: torch.Tensor, group, scatter: int, gather: int) -> torch.Tensor:
    """``(b, s, h, d)``: split dim ``scatter`` into W groups sent one to each rank, and concatenate what the ranks
    send along dim ``gather`` (in rank order)."""
    w = group_rank_size(group)[1]
    # (b, s, h, d) -> (W, ...): the W groups of the scattered dim first, the layout all_to_all_single splits
    front = x.unflatten(scatter, (w, x.shape[scatter] // w)).movedim(scatter, 0)
    y = _a2a(front, group)  # dim 0 now indexes the source rank = the position along the gathered dim
    # (W, ...) -> W next to the gathered dim, merged into it: rank order = sequence (or head) order
    return y.movedim(0, gather).flatten(gather, gather + 1)


def seq_to_head(x: torch.Tensor, group) -> torch.Tensor:
    """``(b, s/W, h, d)`` sequence shard -> ``(b, s, h/W, d)``: the whole sequence for this rank's heads."""
    return _all_to_all_4d(x, group, scatter=2, gather=1)


def head_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """``(b, s, h/W, d)`` -> ``(b, s/W, h, d)``: back to this rank's sequence shard with every head."""
    return _all_to_all_4d(x, group, scatter=1, gather=2)


class _AllToAll4D(torch.autograd.Function):
    """:func:`_all_to_all_4d` with its inverse (the dims swapped) as backward."""

    @staticmethod
    def forward(ctx, x, group, scatter, gather):
        ctx.args = (group, gather, scatter)
        return _all_to_all_4d(x, group, scatter, gather)

    @staticmethod
    def backward(ctx, g):
        return _all_to_all_4d(g, *ctx.args), None, None, None


def seq_to_head_autograd(x: torch.Tensor, group) -> torch.Tensor:
    """:func:`seq_to_head`, differentiable (backward: :func:`head_to_seq` of the gradient)."""
    return _AllToAll4D.apply(x, group, 2, 1)


def head_to_seq_autograd(x: torch.Tensor, group) -> torch.Tensor:
    """:func:`head_to_seq`, differentiable (backward: :func:`seq_to_head` of the gradient)."""
    return _AllToAll4D.apply(x, group, 1, 2)
