"""Helpers of the GPU tests (pytest marker ``gpu``): skipped without CUDA, run on the lent GPU machines by
bench/gpu_acceptance.sh.

CPU-green is not GPU-green: these tests see what gloo and the math kernel never show (cuDNN's graph cache, NCCL
streams, bf16/fp16 kernels, DeepSpeed's engine precision).
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: _dist, reference

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def need_gpus(n: int):
    """Marks for a test that needs ``n`` CUDA GPUs: ``gpu``, and a skip when fewer are present."""
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [pytest.mark.gpu, pytest.mark.skipif(have < n, reason=f"needs {n} CUDA GPU(s), found {have}")]


def assert_cases_within_yardstick(results, record_property):
    """Each NCCL case's errors (out, dq, dk, dv vs float64) against its yardstick (one SDPA call's errors in the same
    dtype): record the case count and the worst case, and fail listing every case off its bound or not finite."""
    worst = max(results, key=lambda r: max(e / (2 * s + 1e-30) for e, s in zip(r["errs"], r["sdpa"])))
    record_property("cases", len(results))
    record_property("worst", f"{worst['case']} errs(out,dq,dk,dv)={['%.2e' % e for e in worst['errs']]} "
                             f"sdpa={['%.2e' % e for e in worst['sdpa']]}")
    bad = [f"{r['case']}: errs {['%.2e' % e for e in r['errs']]} vs sdpa {['%.2e' % e for e in r['sdpa']]}"
           for r in results if not (r["ok"] and r["finite"])]
    assert not bad, f"{len(bad)} of {len(results)} cases off:\n" + "\n".join(bad)


def installed(backend_dtypes: dict) -> dict:
    """``backend_dtypes`` less the optional backends whose package is missing here (fa4: flash-attn-4); the tests
    that need one say so with a skip of their own."""
    from easy_context.attention.kernels import fa4_importable

    return {b: d for b, d in backend_dtypes.items() if b != "fa4" or fa4_importable()}
