"""Page-locked host memory for offloaded checkpoints: exact-size buffers reused from step to step, and the handle
of one offloaded tensor that returns its buffer when autograd drops it."""
from __future__ import annotations

import math

import torch


class PinnedHostPool:
    """Exact-size page-locked host buffers for offloaded checkpoints, reused from step to step.

    ``torch.empty(..., pin_memory=True)`` goes through PyTorch's caching host allocator, which rounds every block
    up to a power of two: a 3 GiB checkpoint (384K tokens x 4096 x bf16) takes 4 GiB, and at 384K tokens on the
    H200 (128 GiB host) the offloaded checkpoints of 28 layers filled the host and the process was killed
    (bench/RESULTS.md). Here a buffer is plain host memory of the exact size, page-locked once
    (``cudaHostRegister``) and kept: after the first step no page-locking and no allocation.

    Args:
        page_lock: False keeps the buffers in ordinary memory (tests of the bookkeeping without a GPU).
    Attributes:
        held_bytes: host memory held by the pool's buffers, in use or free.
    """

    def __init__(self, *, page_lock: bool = True):
        self.page_lock = page_lock
        self.held_bytes = 0
        self._free: dict = {}  # (numel, dtype) -> [(buffer, event of its last copy or None)]
        self._locked: dict = {}  # data_ptr -> buffer registered with CUDA (unregistered when dropped)

    def take(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """A contiguous host buffer of ``shape``: a free one of the same size, or a new one."""
        key = (math.prod(shape), dtype)
        free = self._free.get(key)
        if free:
            buf, event = free.pop()
            if event is not None:
                event.synchronize()  # its copy back to the GPU (or to the host) has finished
            return buf.view(shape)
        self._release_free()  # a new size (another sequence length): free buffers of old sizes would only pile up
        buf = torch.empty(key[0], dtype=dtype)
        if self.page_lock:
            buf = self._lock(buf)
        self.held_bytes += buf.numel() * buf.element_size()
        return buf.view(shape)

    def _release_free(self) -> None:
        for free in self._free.values():
            for buf, event in free:
                if event is not None:
                    event.synchronize()
                self._unlock(buf)
                self.held_bytes -= buf.numel() * buf.element_size()
        self._free.clear()

    def give_back(self, buf: torch.Tensor, event=None) -> None:
        self._free.setdefault((buf.numel(), buf.dtype), []).append((buf.view(-1), event))

    def _lock(self, buf):
        err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel() * buf.element_size(), 0)
        if int(getattr(err, "value", err)) != 0:  # could not page-lock (limits): PyTorch's (rounded) pinned block
            return torch.empty(buf.shape, dtype=buf.dtype, pin_memory=True)
        self._locked[buf.data_ptr()] = buf
        return buf

    def _unlock(self, buf) -> None:
        if self._locked.pop(buf.data_ptr(), None) is not None:
            torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())

    def __del__(self):
        if not self._locked:
            return
        try:
            torch.cuda.synchronize()
            for buf in list(self._locked.values()):
                self._unlock(buf)
        except Exception:  # noqa: BLE001 - interpreter shutdown: CUDA may be gone, and the process with it
            pass


class OffloadedTensor:
    """One offloaded checkpoint: its host buffer goes back to the pool when autograd drops it, with an event
    marking the last copy that uses the buffer (to the host in forward, back to the GPU in backward)."""

    __slots__ = ("pool", "host", "device", "event")

    def __init__(self, pool, host, device):
        self.pool, self.host, self.device = pool, host, device
        self.event = torch.cuda.Event()
        self.event.record()

    def restore(self) -> torch.Tensor:
        out = self.host.to(self.device, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()
        return out

    def __del__(self):
        self.pool.give_back(self.host, self.event)


__all__ = ["PinnedHostPool", "OffloadedTensor"]
