"""Independent references: plain float64 attention written from the definition (no library code)."""
import math

import torch


def attention_ref(q, k, v, causal=True, scale=None):
    """softmax(q k^T * scale [+ causal mask]) v in float64. Flash layout (b, s, h, d); GQA by repeat."""
    q, k, v = q.double(), k.double(), v.double()
    h, hkv = q.shape[2], k.shape[2]
    k = k.repeat_interleave(h // hkv, dim=2)
    v = v.repeat_interleave(h // hkv, dim=2)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        n = q.shape[1]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


def rel_err(a, b):
    """Relative error ||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()
