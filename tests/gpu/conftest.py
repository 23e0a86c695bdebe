"""GPU tests (pytest marker ``gpu``): skipped without CUDA, run on the lent GPU machines by bench/gpu_acceptance.sh.

CPU-green is not GPU-green: these tests see what gloo and the math kernel never show (cuDNN's graph cache, NCCL
streams, bf16/fp16 kernels, DeepSpeed's engine precision). With ``EASY_CONTEXT_ACCEPTANCE_LOG`` set, every test
appends ``PASS|FAIL|SKIP <test id> <measurements>`` to that file (the acceptance script prints it).
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


def pytest_runtest_logreport(report):
    path = os.environ.get("EASY_CONTEXT_ACCEPTANCE_LOG")
    if not path or not (report.when == "call" or report.outcome != "passed"):
        return
    status = {"passed": "PASS", "failed": "FAIL", "skipped": "SKIP"}[report.outcome]
    details = " ".join(f"{k}={v}" for k, v in report.user_properties)
    if report.outcome != "passed":
        crash = getattr(report.longrepr, "reprcrash", None)
        msg = crash.message if crash else (report.longrepr[-1] if isinstance(report.longrepr, tuple) else
                                          str(report.longrepr))
        details += " | " + (msg.splitlines() or [""])[0][:400]
    with open(path, "a") as f:
        f.write(f"{status} {report.nodeid} {details}\n")
