"""The score features beyond causal/documents that every algorithm takes: a sliding window, logit soft-capping and
attention sinks. Where each lives:

* ``window`` (Mistral, Qwen2 ``use_sliding_window``, Gemma 2/3 and gpt-oss sliding layers): a query at global index
  ``i`` sees keys ``j`` with ``0 <= i - j <= window - 1`` (transformers' ``sliding_window``: at most ``window`` keys,
  itself included). A constraint on which (query, key) pairs exist, like documents: documents.plan_block turns it
  into per-block calls with a band (or none: the ring skips the block), plans.block_spans sends only the rows a
  window reaches, the kernels apply the band (kernels.py: math, fa4);
* ``softcap`` (Gemma 2): ``softcap * tanh(s / softcap)`` on every score, inside each kernel call (math, fa4);
* ``sinks`` (gpt-oss ``s_aux``): one logit per head in every query's softmax denominator, added once after the last
  merge (merge.add_sinks), with its gradient summed over the ranks' queries (merge.sink_grad).
"""
from __future__ import annotations

import torch

WINDOW_ALGORITHMS = "zigzag_ring_attn, ulysses_attn or usp_attn"


def check_features(what: str, q: torch.Tensor, causal: bool, seq_len: int, window, softcap, sinks):
    """Validate an algorithm's ``window``, ``softcap`` and ``sinks`` for queries ``q`` ``(b, s_local, h, d)`` over a
    global sequence of ``seq_len`` tokens (local check, no communication).

    Returns:
        ``(window, softcap, features)``: the window (None when it covers the whole sequence: it then changes
        nothing), the soft-cap (0.0 for none) and the kernel features they need (kernels.get_kernel's ``features``).
    Raises:
        ValueError: a window that is not a positive integer or is given with non-causal attention, a negative
            soft-cap, or sinks that are not one value per query head.
    """
    features = set()
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"{what}: window must be a positive number of keys (transformers' sliding_window), "
                             f"got {window!r}")
        if not causal:
            raise ValueError(f"{what}: a sliding window is defined for causal attention only (pass causal=True)")
        if window >= seq_len:
            window = None  # every query sees all its keys: the same attention
        else:
            features.add("window")
    softcap = float(softcap or 0.0)
    if softcap < 0:
        raise ValueError(f"{what}: softcap must be positive (or None / 0 for none), got {softcap}")
    if softcap:
        features.add("softcap")
    if sinks is not None and (not isinstance(sinks, torch.Tensor) or tuple(sinks.shape) != (q.shape[2],)):
        raise ValueError(f"{what}: sinks must be one logit per query head, shape ({q.shape[2]},), got "
                         f"{tuple(sinks.shape) if isinstance(sinks, torch.Tensor) else type(sinks).__name__}")
    return window, softcap, frozenset(features)


__all__ = ["check_features", "WINDOW_ALGORITHMS"]
