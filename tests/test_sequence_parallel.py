"""Every sequence-parallel algorithm, on 1, 2 and 4 gloo ranks, against float64 full attention.

One process group per world size runs all cases (process start costs seconds on a 2-core box). Each rank
builds the full q/k/v from a shared seed, computes the float64 reference itself, shards, runs the
algorithm in float32, and asserts that its slice of the output and of dq/dk/dv matches.
"""
import inspect
import math
import zlib

import pytest
import torch
from _dist import run_distributed
from reference import attention_ref, rel_err

from easy_context import gather_sequence, sequence_granularity, shard_sequence, ulysses_attn_func, zigzag_ring_attn_func
from easy_context.attention.dist_flash import max_blocks_per_rank
from easy_context.attention.registry import ALGORITHMS, SEQ_ALGOS, algorithm_options, layout

# float32 algorithm vs float64 reference. Ring merges re-associate the softmax sums, which changes
# float32 rounding only at the ~1e-7 level; 1e-5 (the bound) keeps two orders of margin and
# any schedule bug (a missing or doubled block, a wrong mask) shows up as >1e-2.
TOL = 1e-5

# Every sequence-parallel algorithm of the registry: adding one there puts it under every test of this file.
FUNCS = {name: algo.attn_func for name, algo in ALGORITHMS.items() if algo.attn_func is not None}
# Values to try for each option an algorithm declares (besides its default), by world size. A new option needs an
# entry here (test_every_option_has_test_values fails until it has one).
OPTION_VALUES = {"ring_degree": lambda world: [world, 1] if world > 2 else [1]}


def _cases(world):
    # (algo, causal, batch, heads, kv_heads, head_dim, opts)
    shapes = [(1, 4, 4, 16), (2, 4, 2, 24), (1, 8, 2, 24), (1, 4, 1, 8)]
    cases = []
    for algo in FUNCS:
        opts_list = [{}] + [{key: value} for key in ALGORITHMS[algo].options for value in OPTION_VALUES[key](world)]
        for causal in (True, False):
            for b, h, hkv, d in shapes:
                for opts in opts_list:
                    cases.append((algo, causal, b, h, hkv, d, opts))
    return cases


def test_every_option_has_test_values():
    declared = {key for algo in ALGORITHMS.values() for key in algo.options}
    assert declared <= set(OPTION_VALUES), f"add test values for {declared - set(OPTION_VALUES)} to OPTION_VALUES"


def test_registry_entries_are_consistent():
    """Every entry: the attention function takes the common arguments and its options, the layout gives every
    rank the same number of chunks, and an option another algorithm owns is refused naming the owner."""
    for name, algo in ALGORITHMS.items():
        assert algo.name == name and algo.summary
        if algo.attn_func is not None:
            params = inspect.signature(algo.attn_func).parameters
            for arg in ("q", "k", "v", "causal", "softmax_scale", "group", "backend", "check", *algo.options):
                assert arg in params, (name, arg)
        for world in (1, 2, 4, 8):
            n, chunks = layout(name, world)
            assert len(chunks) == world and len({len(c) for c in chunks}) == 1, (name, world)
    for key in OPTION_VALUES:
        owners = [n for n, a in ALGORITHMS.items() if key in a.options]
        for name in set(ALGORITHMS) - set(owners):
            with pytest.raises(ValueError, match=f"{key} is a {'/'.join(owners)} option"):
                algorithm_options(name, **{key: 2})


def _run_case(rank, world, algo, causal, b, h, hkv, d, opts, group=None):
    gran = sequence_granularity(algo, world, **opts)
    s = gran * 3
    # same seed on every rank (str hashes differ between processes, so use crc32)
    gen = torch.Generator().manual_seed(zlib.crc32(repr((algo, causal, b, h, hkv, d, opts)).encode()))
    q = torch.randn(b, s, h, d, generator=gen)
    k = torch.randn(b, s, hkv, d, generator=gen)
    v = torch.randn(b, s, hkv, d, generator=gen)
    dout = torch.randn(b, s, h, d, generator=gen)
    scale = 0.7 / math.sqrt(d)
    qr, kr, vr = (x.double().requires_grad_() for x in (q, k, v))
    ref = attention_ref(qr, kr, vr, causal, scale)
    ref.backward(dout.double())

    def shard(x):
        return shard_sequence(algo, x, rank, world, **opts)

    ql, kl, vl = (shard(x).requires_grad_() for x in (q, k, v))
    stats = {} if algo == "dist_flash_attn" else None
    kw = dict(stats=stats) if stats is not None else {}
    out = FUNCS[algo](ql, kl, vl, causal, scale, group, **opts, **kw)
    out.backward(shard(dout))
    tag = f"{algo} causal={causal} b={b} h={h} hkv={hkv} d={d} {opts} W={world}"
    errs = {"out": rel_err(out, shard(ref)), "dq": rel_err(ql.grad, shard(qr.grad)),
            "dk": rel_err(kl.grad, shard(kr.grad)), "dv": rel_err(vl.grad, shard(vr.grad))}
    assert max(errs.values()) < TOL, f"{tag}: {errs}"
    if stats is not None and causal:
        bound = math.ceil((world + 1) / 2) + 1
        assert stats["forward_blocks"] <= max_blocks_per_rank(world) <= bound, (tag, stats)
        assert stats["backward_blocks"] == stats["forward_blocks"], (tag, stats)
        # balanced: every rank does W/2 full chunk x chunk blocks (the causal diagonal is half); an odd local
        # length splits the middle step's rows unevenly by one row, i.e. by 1/(2n) of a block
        assert abs(stats["forward_work"] - world / 2) <= 0.5 / ql.shape[1] + 1e-9, (tag, stats)
        return stats["forward_work"]
    return None


def _expect_error(fn, match):
    try:
        fn()
    except ValueError as e:
        assert match in str(e), str(e)
        return
    raise AssertionError(f"expected ValueError matching {match!r}")


def _worker(rank, world):
    blocks = {}
    for case in _cases(world):
        n = _run_case(rank, world, *case)
        if n is not None:
            blocks[repr(case)] = n

    # shard -> gather round trip restores the original order for every layout
    x = torch.arange(2 * 8 * world).view(2, 8 * world) * 10
    for algo in SEQ_ALGOS:
        assert torch.equal(gather_sequence(algo, shard_sequence(algo, x, rank, world)), x), algo

    # ranks that pass different shapes fail together before any p2p / all-to-all: no hang
    for algo, fn in FUNCS.items():
        s = 4 if rank == 0 else 8
        q = torch.randn(1, s, 4, 8)
        _expect_error(lambda: fn(q, q, q), "ranks of the group disagree")
    # an odd local length cannot be split into two zigzag chunks
    if world > 1:
        q = torch.randn(1, 5, 4, 8)
        _expect_error(lambda: zigzag_ring_attn_func(q, q, q), "must be even")
        # heads not divisible by the Ulysses degree
        q = torch.randn(1, 4, world + 1, 8)
        _expect_error(lambda: ulysses_attn_func(q, q, q), "not divisible by the Ulysses degree")
    return blocks


@pytest.mark.parametrize("world", [2, 4])
def test_all_algorithms_match_full_attention(world):
    per_rank = run_distributed(_worker, world, timeout=600)
    # dist_flash: all causal work (W^2/2 full blocks) is done exactly once across the ranks
    for case in per_rank[0]:
        assert abs(sum(r[case] for r in per_rank) - world * world / 2) < 1e-9, case


def test_single_process_world_of_one():
    """W=1 without torch.distributed: every algorithm is plain attention."""
    for case in _cases(1):
        _run_case(0, 1, *case)


def test_layouts_partition_the_sequence():
    for world in (1, 2, 3, 4, 8):
        for algo in SEQ_ALGOS:
            degrees = ({"ring_degree": r} for r in (1, 2, 4, 8) if world % r == 0)
            ring_opts = [{}] if algo != "usp_attn" else [{}, *degrees]
            for opts in ring_opts:
                n, chunks = layout(algo, world, **opts)
                flat = sorted(c for cs in chunks for c in cs)
                expected = list(range(n)) * (world if algo == "data_parallel" or world == 1 else 1)
                assert flat == sorted(expected), (algo, world, opts)


def test_sharding_errors_name_the_fix():
    x = torch.zeros(1, 1001)
    with pytest.raises(ValueError, match="not divisible by 8"):
        shard_sequence("zigzag_ring_attn", x, 0, 4)
    with pytest.raises(ValueError, match="unknown seq_algo"):
        shard_sequence("ring", x, 0, 4)
    with pytest.raises(ValueError, match="ring_degree=3 must divide"):
        shard_sequence("usp_attn", torch.zeros(1, 64), 0, 4, ring_degree=3)
