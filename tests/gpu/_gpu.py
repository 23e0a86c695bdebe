"""Helpers of the GPU tests (pytest marker ``gpu``): skipped without CUDA, run on the lent GPU machines by
bench/gpu_acceptance.sh.

CPU-green is not GPU-green: these tests see what gloo and the math kernel never show (cuDNN's graph cache, NCCL
streams, bf16/fp16 kernels, DeepSpeed's engine precision).
"""
import os
import socket
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: _dist, reference

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def need_gpus(n: int):
    """Marks for a test that needs ``n`` CUDA GPUs: ``gpu``, and a skip when fewer are present."""
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [pytest.mark.gpu, pytest.mark.skipif(have < n, reason=f"needs {n} CUDA GPU(s), found {have}")]


def need_fa4():
    """Marks for a test of the fa4 backend: one CUDA GPU (``need_gpus(1)``) and flash-attn-4 importable."""
    from easy_context.attention.kernels import fa4_importable

    missing = not torch.cuda.is_available() or not fa4_importable()
    return need_gpus(1) + [pytest.mark.skipif(missing, reason="flash-attn-4 is not installed (pip install "
                                                              "'easy-context[fa4]')")]


def accelerate_launch(config: str, nproc: int, script: str, *args, gpus: str = "0", timeout: int = 300):
    """Runs ``accelerate launch --config_file accelerate_configs/<config> --num_processes <nproc> <script> <args>``
    from the repository root on the GPUs ``gpus`` (a free port each time); fails the test with the output's tail."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(ROOT, "accelerate_configs", config), "--num_processes", str(nproc), "--main_process_port",
           port, os.path.join(ROOT, script), *map(str, args)]
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "CUDA_VISIBLE_DEVICES": gpus}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} {' '.join(map(str, args))}: " + proc.stdout[-3000:] + proc.stderr[-4000:]


def w1_logits_and_grads(model, ids, patched: bool, backend: str = "fa4", device: str = "cuda"):
    """One forward/backward of a causal LM on ``ids`` ``(1, seq)`` in a world of one rank: ``[logits, gradients...]``.
    ``patched``: through zigzag_ring_attn on ``backend`` with the shards of prepare_seq_parallel_inputs (W=1); else the
    model's own attention. The loss is ``mean(logits^2)``: every logit and parameter gets a gradient."""
    from easy_context import apply_seq_parallel_monkey_patch, prepare_seq_parallel_inputs

    seq = ids.shape[1]
    if patched:
        apply_seq_parallel_monkey_patch("zigzag_ring_attn", model, backend=backend)
        p = prepare_seq_parallel_inputs("zigzag_ring_attn", ids, torch.arange(seq)[None], ids, 0, 1, device)
        logits = model(p["local_input_ids"], position_ids=p["local_position_ids"]).logits
    else:
        logits = model(ids.to(device), position_ids=torch.arange(seq, device=device)[None]).logits
    logits.float().square().mean().backward()
    return [logits.detach()] + [p.grad for p in model.parameters() if p.grad is not None]


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
