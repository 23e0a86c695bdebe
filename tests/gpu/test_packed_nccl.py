"""Packed documents over NCCL on 2 GPUs: every algorithm that takes ``cu_seqlens`` against a per-document float64
reference and against per-document SDPA calls in the same dtype (the yardstick of what the dtype costs).

Tolerance as in test_attention_nccl.py: each error at most 2x the SDPA yardstick's plus a floor (1e-5 float32,
1e-4 16-bit); a token that attends across a document boundary is off by ~1e-1 or more.
"""
import itertools

import pytest
import torch
from _dist import run_distributed
from _gpu import assert_cases_within_yardstick, installed, need_gpus
from reference import per_document_reference, rel_err

from easy_context import gather_sequence, get_attn_func, shard_sequence

pytestmark = need_gpus(2)

SEQ, HEADS, DIM = 2048, 8, 128
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
BACKEND_DTYPES = {"cudnn": ("bf16",), "flash": ("bf16",), "efficient": ("bf16", "fp32"), "auto": ("bf16", "fp32"),
                  "fa4": ("bf16",)}
ALGOS = [("zigzag_ring_attn", {}), ("ulysses_attn", {}), ("usp_attn", {"ring_degree": 1}),
         ("usp_attn", {"ring_degree": 2})]
MIXES = {  # document boundaries over SEQ tokens
    "random": [0, 37, 700, 1023, 1030, 1600, SEQ],
    "one-token and crossing": [0, 1, 2, 511, 1537, SEQ - 1, SEQ],
}
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-4}


def _data(kv, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(4321 + kv)
    q, k, v, dout = (torch.randn(1, SEQ, h, DIM, generator=g) for h in (HEADS, kv, kv, HEADS))
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, dout)]


def _reference(kv, causal, dtype, device, bounds):
    return per_document_reference(*_data(kv, dtype, device), causal, bounds)


def _worker(rank, world):
    device = torch.device("cuda", rank)
    refs, results = {}, []
    for (algo, opts), kv, causal, (backend, dts), mix in itertools.product(
            ALGOS, (2, 8), (True, False), installed(BACKEND_DTYPES).items(), MIXES):
        for dt in dts:
            dtype, bounds = DTYPES[dt], MIXES[mix]
            key = (kv, causal, dt, mix)
            if key not in refs:
                refs[key] = _reference(kv, causal, dtype, device, bounds)
            ref, sdpa = refs[key]
            q, k, v, dout = _data(kv, dtype, device)
            shard = lambda t: shard_sequence(algo, t, rank, world, **opts)  # noqa: E731
            ql, kl, vl = (shard(t).requires_grad_() for t in (q, k, v))
            out = get_attn_func(algo)(ql, kl, vl, causal=causal, backend=backend, cu_seqlens=bounds, **opts)
            out.backward(shard(dout))
            got = [gather_sequence(algo, t.detach(), **opts) for t in (out, ql.grad, kl.grad, vl.grad)]
            errs = [rel_err(x, r) for x, r in zip(got, ref)]
            results.append(dict(case=f"{algo}{opts or ''} kv={kv} causal={causal} {dt} {backend} [{mix}]",
                                errs=errs, sdpa=sdpa, finite=all(bool(torch.isfinite(x).all()) for x in got),
                                ok=all(e <= 2 * s + FLOOR[dtype] for e, s in zip(errs, sdpa))))
    return results


@pytest.fixture(scope="module")
def packed_results():
    return run_distributed(_worker, 2, timeout=600, backend="nccl")[0]


def test_packed_documents_match_per_document_float64(packed_results, record_property):
    results = packed_results
    assert_cases_within_yardstick(results, record_property)
