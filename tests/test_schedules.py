"""Ring schedules for world sizes the CPU cannot spawn cheaply (odd W, W=8), run in one process.

bench/sim.py runs every rank's exact forward/backward schedule (the library's own functions) in a thread
with in-memory mailboxes in place of p2p; the result must equal float64 full attention.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
from sim import simulate  # noqa: E402

from easy_context.attention.kernels import get_kernel  # noqa: E402
from reference import attention_ref, rel_err  # noqa: E402

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
