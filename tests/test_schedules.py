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
