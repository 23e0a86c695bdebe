"""Ring schedules for world sizes the CPU cannot spawn cheaply (odd W, W=8), run in one process.

tests/_sim.py runs every rank's exact forward/backward schedule (the library's own functions) in a thread
with in-memory mailboxes in place of p2p; the result must equal float64 full attention.
"""
import pytest
import torch
from _sim import simulate
from reference import attention_ref, rel_err

from easy_context.attention.kernels import get_kernel

TOL = 1e-5  # float32 vs float64, as in test_sequence_parallel.py


@pytest.mark.parametrize("algo", ["zigzag_ring_attn", "dist_flash_attn"])
@pytest.mark.parametrize("world", [3, 5, 8])
@pytest.mark.parametrize("causal", [True, False])
def test_simulated_ring_matches_full_attention(algo, world, causal):
    torch.manual_seed(world)
    b, s, h, hkv, d = 1, 2 * world * 3, 4, 2, 16
    q, dout = torch.randn(b, s, h, d), torch.randn(b, s, h, d)
    k, v = torch.randn(b, s, hkv, d), torch.randn(b, s, hkv, d)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref = attention_ref(*leaves, causal, 0.3)
    ref.backward(dout.double())
    got = simulate(algo, q, k, v, dout, world, get_kernel("math", torch.device("cpu")), 0.3, causal)
    for g, r in zip(got, [ref] + [x.grad for x in leaves]):
        assert rel_err(g, r) < TOL


@pytest.mark.parametrize("algo", ["zigzag_ring_attn", "dist_flash_attn"])
def test_simulated_ring_with_split_causal_blocks(monkeypatch, algo):
    """Long local causal blocks split into three calls (kernels.split_causal) inside the rings: still exact."""
    monkeypatch.setenv("EASY_CONTEXT_SPLIT_CAUSAL", "4")
    torch.manual_seed(7)
    b, s, h, hkv, d, world = 1, 48, 4, 2, 16, 3
    q, dout = torch.randn(b, s, h, d), torch.randn(b, s, h, d)
    k, v = torch.randn(b, s, hkv, d), torch.randn(b, s, hkv, d)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref = attention_ref(*leaves, True, 0.3)
    ref.backward(dout.double())
    kernel = get_kernel("math", torch.device("cpu"))
    got = simulate(algo, q, k, v, dout, world, kernel, 0.3, True)
    for g, r in zip(got, [ref] + [x.grad for x in leaves]):
        assert rel_err(g, r) < TOL


def _per_document_ref(q, k, v, dout, bounds, causal, scale):
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    out = torch.cat([attention_ref(*(t[:, a:b] for t in leaves), causal, scale)
                     for a, b in zip(bounds[:-1], bounds[1:])], dim=1)
    out.backward(dout.double())
    return [out] + [x.grad for x in leaves]


@pytest.mark.parametrize("algo,world,ring", [("ulysses_attn", 2, None), ("ulysses_attn", 4, None),
                                             ("usp_attn", 4, 2), ("usp_attn", 2, 2), ("zigzag_ring_attn", 4, None)])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_simulated_world_covers_every_algorithm_dense_and_packed(algo, world, ring, packed, causal):
    """The simulator the one-GPU tests trust (tests/gpu/test_fa4_gpu.py): Ulysses and USP as head groups through the
    zigzag ring, packed documents through the ring's document plans, against float64 (per document when packed).
    kv heads 2 under a Ulysses degree of 4 exercise the kv replication."""
    torch.manual_seed(world)
    b, s, h, hkv, d = 1, 8 * world, 4, 2, 16
    q, dout = torch.randn(b, s, h, d), torch.randn(b, s, h, d)
    k, v = torch.randn(b, s, hkv, d), torch.randn(b, s, hkv, d)
    bounds = [0, 1, 5, 6, s // 2 + 3, s] if packed else [0, s]
    from easy_context.attention.documents import normalize

    docs = normalize(bounds, b, s, algo) if packed else None
    ref = _per_document_ref(q, k, v, dout, bounds, causal, 0.3)
    got = simulate(algo, q, k, v, dout, world, get_kernel("math", torch.device("cpu")), 0.3, causal, docs, ring)
    for g, r in zip(got, ref):
        assert rel_err(g, r) < TOL


def _varlen_math(calls: dict):
    """The math kernel with a varlen entry point (the contract of FA2/FA4 varlen on GPUs, one document at a time in
    float64-capable torch), each entry counted, so that the ring's varlen branches run on the CPU."""
    from easy_context.attention import backends as B
    from easy_context.attention.kernels import Kernel, Varlen

    def counted(name, fn):
        def wrapper(*args):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args)
        return wrapper

    return Kernel("math", B.math_forward, B.math_backward,
                  varlen=Varlen(counted("forward", B.math_varlen_forward),
                                counted("backward", B.math_varlen_backward), float("inf")))


def _rows_ref(q, k, v, dout, per_row, causal, scale):
    """Each document of each batch row through float64 attention on its own; out, dq, dk, dv."""
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    out = torch.cat([torch.cat([attention_ref(*(t[r:r + 1, a:b] for t in leaves), causal, scale)
                                for a, b in zip(bounds[:-1], bounds[1:])], dim=1)
                     for r, bounds in enumerate(per_row)], dim=0)
    out.backward(dout.double())
    return [out] + [x.grad for x in leaves]


def _varlen_mixes(s):
    """Per-row boundary lists over ``s`` tokens: one-token documents, a document per token, documents crossing the
    shards, and batch rows with different or the same documents (the same: one varlen call over both rows)."""
    one_token = [0, 1, 2, 5, s // 2, s // 2 + 1, s - 1, s]
    per_token = list(range(s + 1))
    crossing = [0, 3, s // 2 - 1, s // 2 + 2, s]
    # a row of one-token documents alone has dq = 0 exactly in float64 (one key: softmax is constant) and ~1e-8 in
    # float32, so it shares its batch with a row whose dq is not 0
    return {"one-token documents": [one_token], "a document per token": [per_token, one_token],
            "rows with different documents": [one_token, crossing], "rows sharing documents": [crossing, crossing]}


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("causal", [True, False])
def test_zigzag_ring_varlen_branches_match_per_document_reference(world, causal):
    """The varlen branches of the ring (the own block's documents as one kernel call, forward and backward), which
    only kernels with a ``varlen`` entry reach (cuDNN auto/flash/fa4 on GPUs): simulated W=1 (the local path inside
    ring_forward/ring_backward), 2 and 4, GQA, against float64 per document. The varlen entries must have run."""
    from easy_context.attention.documents import normalize

    torch.manual_seed(100 + world)
    s, h, hkv, d = 8 * max(world, 2), 4, 2, 16
    calls: dict = {}
    kernel = _varlen_math(calls)
    for name, per_row in _varlen_mixes(s).items():
        b = len(per_row)
        q, dout = torch.randn(b, s, h, d), torch.randn(b, s, h, d)
        k, v = torch.randn(b, s, hkv, d), torch.randn(b, s, hkv, d)
        docs = normalize(per_row, b, s, "zigzag_ring_attn")
        got = simulate("zigzag_ring_attn", q, k, v, dout, world, kernel, 0.3, causal, docs)
        for what, g, r in zip(("out", "dq", "dk", "dv"), got, _rows_ref(q, k, v, dout, per_row, causal, 0.3)):
            assert rel_err(g, r) < TOL, f"W={world} causal={causal} [{name}] {what}: {rel_err(g, r)}"
    assert calls.get("forward") and calls.get("backward"), f"the varlen entries never ran: {calls}"


@pytest.mark.parametrize("causal", [True, False])
def test_zigzag_ring_attn_func_varlen_on_one_rank(monkeypatch, causal):
    """The real W=1 path (zigzag_ring_attn_func without a process group: the autograd Function around the local
    forward/backward) with the varlen math kernel, against float64 per document."""
    from easy_context.attention import kernels as K
    from easy_context.attention.zigzag_ring import zigzag_ring_attn_func

    calls: dict = {}
    monkeypatch.setitem(K.KERNELS, "math", _varlen_math(calls))
    torch.manual_seed(5)
    s, h, hkv, d = 24, 4, 2, 16
    for name, per_row in _varlen_mixes(s).items():
        b = len(per_row)
        q, dout = torch.randn(b, s, h, d), torch.randn(b, s, h, d)
        k, v = torch.randn(b, s, hkv, d), torch.randn(b, s, hkv, d)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        cu = per_row if len(set(map(tuple, per_row))) > 1 else per_row[0]
        out = zigzag_ring_attn_func(*leaves, causal, 0.3, backend="math", cu_seqlens=cu)
        out.backward(dout)
        got = [out] + [x.grad for x in leaves]
        for what, g, r in zip(("out", "dq", "dk", "dv"), got, _rows_ref(q, k, v, dout, per_row, causal, 0.3)):
            assert rel_err(g, r) < TOL, f"causal={causal} [{name}] {what}: {rel_err(g, r)}"
    assert calls.get("forward") and calls.get("backward"), f"the varlen entries never ran: {calls}"
