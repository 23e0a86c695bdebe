"""Sliding windows, logit soft-capping and attention sinks in the shared engine (easy_context/attention/features.py):
the block plans against the definition of the window, the skipped blocks counted and really skipped, every algorithm
in a simulated world (tests/_sim.py: the library's per-rank schedules as threads) against float64 attention from the
definition, and the errors that name the fix. No processes: the gloo runs are in test_families.py.
"""
import itertools
import math

import pytest
import torch
from _sim import simulate
from reference import masked_attention_ref, rel_err

from easy_context.attention.dist_flash import dist_flash_attn_func
from easy_context.attention.documents import normalize, zigzag_runs
from easy_context.attention.kernels import Kernel, get_kernel, resolve_backend
from easy_context.attention.plans import block_calls, block_spans
from easy_context.attention.zigzag_ring import zigzag_ring_attn_func

CPU = torch.device("cpu")
# float64 throughout the engine (math kernel, float64 accumulators and merges) against float64 from the definition:
# only summation order differs, ~1e-15 relative; 1e-10 leaves five orders of margin, a missing or doubled pair, a
# sink counted per block or a window off by one key is >1e-3.
TOL64 = 1e-10
# float32 inputs (float32 accumulation): merges re-associate float32 sums, ~1e-7; as test_sequence_parallel.TOL.
TOL32 = 1e-5


def _global(runs, row):
    """Global index of local row ``row`` of a rank holding ``runs``."""
    for a, b in runs:
        if row < b - a:
            return a + row
        row -= b - a
    raise IndexError(row)


def _pairs(segment, q_runs, k_runs):
    lo, hi = segment.band if segment.band is not None else (None, None)
    for a in range(segment.q.start, segment.q.stop):
        for b in range(segment.k.start, segment.k.stop):
            qa, kb = a - segment.q.start, b - segment.k.start
            if segment.causal and kb > qa:
                continue
            if (lo is not None and qa - kb < lo) or (hi is not None and qa - kb > hi):
                continue
            yield _global(q_runs, a), _global(k_runs, b)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_window_plans_cover_exactly_the_window_pairs(world):
    """Over every (rank, block), the planned calls compute each pair with ``0 <= i - j < window`` (within a document)
    exactly once and no other; every query row of a call sees a key of it and every key row is seen (the trimming
    that makes FA4's window sizes non-negative)."""
    n = 12
    seq = n * world
    packed = (0, 5, 17, seq) if seq > 17 else None
    for window, bounds in itertools.product((1, 3, 5, 6, 7, 13, seq - 1), (None, packed)):
        docs = None if bounds is None else (bounds,)
        want = {(i, j) for i in range(seq) for j in range(seq) if 0 <= i - j < window
                and (bounds is None or sum(i >= x for x in bounds) == sum(j >= x for x in bounds))}
        got = []
        for rank, src in itertools.product(range(world), range(world)):
            q_runs, k_runs = zigzag_runs(rank, world, n), zigzag_runs(src, world, n)
            for _, segments in block_calls(rank, src, world, n, True, docs, window):
                for sg in segments:
                    pairs = list(_pairs(sg, q_runs, k_runs))
                    assert {i for i, _ in pairs} == {_global(q_runs, a) for a in range(sg.q.start, sg.q.stop)}, sg
                    assert {j for _, j in pairs} == {_global(k_runs, b) for b in range(sg.k.start, sg.k.stop)}, sg
                    got += pairs
        assert len(got) == len(set(got)) and set(got) == want, (world, window, bounds)


def _skipped(world: int, rank: int) -> int:
    """Blocks without a pair at ``rank`` for a window of at most one zigzag chunk: rank r holds chunks r and 2W-1-r,
    the block of src chunks src and 2W-1-src; a chunk reaches only itself and the chunk before it, so only the blocks
    of src = r - 1 (chunk r-1 before chunk r) and src = r + 1 (chunk 2W-2-r before chunk 2W-1-r) have pairs."""
    return world - 1 - (rank >= 1) - (rank <= world - 2)


@pytest.mark.parametrize("world", [4, 8])
def test_blocks_outside_the_window_cost_no_kernel_call(world):
    """The ring's stats count the skipped blocks (the analytic number above) and a counting kernel sees exactly the
    planned calls: a skipped block costs none, forward or backward. Only the rows a window reaches travel."""
    n, window = 8, 3  # chunks of 4 rows
    calls = {"forward": 0, "backward": 0}
    math_k = get_kernel("math", CPU, torch.float64)

    def counted(name, fn):
        def wrapper(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)
        return wrapper

    kern = Kernel("math", counted("forward", math_k.forward), counted("backward", math_k.backward),
                  mods=math_k.mods)
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, n * world, h, 8, generator=g, dtype=torch.float64) for h in (2, 1, 1, 2))
    stats = []
    out, dq, dk, dv = simulate("zigzag_ring_attn", q, k, v, dout, world, kern, 0.3, window=window, stats=stats)
    assert sorted(s["skipped_blocks"] for s in stats) == sorted(_skipped(world, r) for r in range(world))
    assert calls["forward"] == sum(s["forward_calls"] for s in stats)
    assert calls["backward"] > 0 and sum(s["forward_blocks"] for s in stats) == world * world - sum(
        _skipped(world, r) for r in range(world))
    ref = masked_attention_ref(q, k, v, scale=0.3, window=window)
    assert rel_err(out, ref) < TOL64
    # the rows that travel: a window of 3 reaches the last 2 rows of a chunk from the next one
    for src in range(world):
        rows = sum(b - a for a, b in block_spans(src, world, n, True, None, window))
        assert rows <= 2 * (window - 1) < n, (src, rows)


def _data(seed, seq, heads, kv, dim, dtype):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, seq, h, dim, generator=g, dtype=torch.float64).to(dtype) for h in (heads, kv, kv, heads)]


# (algorithm, world, ring degree)
ALGOS = [("zigzag_ring_attn", 2, None), ("zigzag_ring_attn", 4, None), ("dist_flash_attn", 2, None),
         ("dist_flash_attn", 4, None), ("ulysses_attn", 2, None), ("ulysses_attn", 4, None), ("usp_attn", 4, 2),
         ("usp_attn", 2, 2)]
# window, softcap, sinks, documents (over a 32-token row)
FEATURES = [(5, 0.0, False, None), (11, 2.0, True, None), (None, 1.5, True, None), (6, 0.0, True, (0, 3, 13, 32)),
            (3, 4.0, False, (0, 9, 24, 32))]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_algorithm_with_windows_softcap_and_sinks_matches_the_definition(dtype):
    """Out, dq, dk, dv and the sinks' gradient (summed over the ranks) of every algorithm's own schedule against
    float64 autograd through the definition; dist_flash_attn with soft-capping and sinks (it refuses windows and
    documents)."""
    seq, heads, kv, dim, scale = 32, 4, 2, 8, 0.4
    kern = get_kernel("math", CPU, dtype, dim, {"window", "softcap"})
    tol = TOL64 if dtype == torch.float64 else TOL32
    worst = 0.0
    for (algo, world, ring), (window, softcap, with_sinks, bounds) in itertools.product(ALGOS, FEATURES):
        if algo == "dist_flash_attn" and (window is not None or bounds is not None):
            continue
        q, k, v, dout = _data(world, seq, heads, kv, dim, dtype)
        sinks = torch.linspace(-1.0, 2.0, heads, dtype=dtype) if with_sinks else None
        leaves = [x.detach().double().clone().requires_grad_() for x in (q, k, v)]
        sinks64 = sinks.detach().double().clone().requires_grad_() if with_sinks else None
        ref = masked_attention_ref(*leaves, scale=scale, window=window, softcap=softcap, sinks=sinks64, bounds=bounds)
        ref.backward(dout.double())
        want = [ref.detach()] + [x.grad for x in leaves] + ([sinks64.grad] if with_sinks else [])
        docs = None if bounds is None else normalize(list(bounds), 2, seq, algo)
        got = simulate(algo, q, k, v, dout, world, kern, scale, True, docs, ring, window=window, softcap=softcap,
                       sinks=sinks)
        assert len(got) == len(want)
        for name, a, b in zip(("out", "dq", "dk", "dv", "dsinks"), got, want):
            err = rel_err(a, b)
            worst = max(worst, err)
            assert err < tol, (algo, world, ring, window, softcap, with_sinks, bounds, name, err)
    assert worst > 0


def test_auto_picks_a_kernel_that_applies_the_features_and_named_ones_that_cannot_raise():
    assert resolve_backend("auto", CPU, torch.float32, 64, {"window", "softcap"}) == "math"
    assert resolve_backend(None, CPU, torch.bfloat16, 64, {"softcap"}) == "math"
    for name in ("cudnn", "flash", "efficient", "flash_attn"):
        with pytest.raises(ValueError, match=f"'{name}' cannot apply attention logit soft-capping; use "
                                             "backend='math'"):
            resolve_backend(name, CPU, torch.bfloat16, 64, {"softcap"})
        with pytest.raises(ValueError, match="cannot apply a sliding window"):
            get_kernel(name, CPU, torch.bfloat16, 64, {"window"})
    assert get_kernel("math", CPU, torch.float32, 64, {"window", "softcap"}).name == "math"


def test_features_are_validated_and_dist_flash_names_the_algorithms_with_windows():
    q = torch.randn(1, 16, 4, 8)
    k = v = torch.randn(1, 16, 2, 8)
    with pytest.raises(ValueError, match="zigzag_ring_attn, ulysses_attn or usp_attn"):
        dist_flash_attn_func(q, k, v, window=4)
    with pytest.raises(ValueError, match="causal attention only"):
        zigzag_ring_attn_func(q, k, v, causal=False, window=4)
    with pytest.raises(ValueError, match="positive number of keys"):
        zigzag_ring_attn_func(q, k, v, window=0)
    with pytest.raises(ValueError, match=r"one logit per query head, shape \(4,\)"):
        zigzag_ring_attn_func(q, k, v, sinks=torch.zeros(2))
    with pytest.raises(ValueError, match="cannot apply attention logit soft-capping"):
        zigzag_ring_attn_func(q, k, v, softcap=5.0, backend="cudnn")
    # a window that covers the sequence is no window: dist_flash takes it, and both equal plain causal attention
    full = zigzag_ring_attn_func(q, k, v)
    assert torch.equal(dist_flash_attn_func(q, k, v, window=16), dist_flash_attn_func(q, k, v))
    assert torch.equal(zigzag_ring_attn_func(q, k, v, window=16), full)
    # one rank, a window and soft-capping through the autograd Function: the definition (float32 tolerance)
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], requires_grad=True)
    out = zigzag_ring_attn_func(qr, kr, vr, window=5, softcap=3.0, sinks=sinks)
    out.square().sum().backward()
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v, sinks)]
    ref = masked_attention_ref(*leaves[:3], window=5, softcap=3.0, sinks=leaves[3])
    ref.square().sum().backward()
    assert rel_err(out, ref) < TOL32
    for got, leaf in zip((qr.grad, kr.grad, vr.grad, sinks.grad), leaves):
        assert rel_err(got, leaf.grad) < TOL32
    assert math.isfinite(float(sinks.grad.sum()))
