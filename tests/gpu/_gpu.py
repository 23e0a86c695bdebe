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
