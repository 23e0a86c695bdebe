"""Run a function on N ranks (gloo CPU processes, or NCCL with one GPU each) and collect what each rank returns.

Processes are started with ``spawn`` (safe with torch's thread pools and CUDA); a start costs a few seconds on
a 2-core box, so tests start one group per world size and run many cases inside the worker.
A worker that raises fails the test with its traceback; a hang fails it after ``timeout`` seconds.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import tempfile
import traceback


def _worker(rank, world_size, init_file, fn, args, results, backend):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if backend == "nccl":  # one GPU per rank; the kernels' own defaults (cudnn/flash/efficient by dtype)
        torch.cuda.set_device(rank)
    else:
        os.environ.setdefault("EASY_CONTEXT_ATTN_BACKEND", "math")
    try:
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        results.put((rank, "ok", out))
    except BaseException:  # noqa: BLE001 - any failure must reach the parent test
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 240.0, backend: str = "gloo"):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks; return the per-rank results.

    ``backend="gloo"``: CPU processes (the attention kernel defaults to math); ``"nccl"``: rank r on ``cuda:r``.

    Raises AssertionError with the worker traceback if any rank fails, or if the group does not finish
    within ``timeout`` seconds (a hang is a failure, never a stuck CI run).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_worker, args=(r, world_size, init_file, fn, args, results, backend), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        out, errors = {}, []
        try:
            for _ in range(world_size):
                rank, status, value = results.get(timeout=timeout)
                if status == "ok":
                    out[rank] = value
                else:
                    errors.append(f"rank {rank}:\n{value}")
                    break  # other ranks may now wait forever on a collective; do not wait for them
        except queue.Empty:
            errors.append(f"timed out after {timeout:.0f}s (a hang): ranks finished: {sorted(out)}")
        finally:
            for p in procs:
                p.join(timeout=5 if not errors else 0.1)
                if p.is_alive():
                    p.kill()
                    p.join()
    if errors:
        raise AssertionError("distributed worker failed\n" + "\n".join(errors))
    return [out[r] for r in range(world_size)]
