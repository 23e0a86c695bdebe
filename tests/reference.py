"""Independent references: plain float64 attention written from the definition (no library code)."""
import math

import torch
import torch.nn.functional as F


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


def per_document_reference(q, k, v, dout, causal, bounds):
    """For packed documents ``bounds`` (``[0, ..., S]``) of flash-layout q/k/v: float64 out and q/k/v gradients per
    document, and the relative errors of one SDPA call per document in the inputs' dtype (the yardstick of what that
    dtype costs)."""
    def per_document(fn, tensors):
        return torch.cat([fn(*(t[:, a:b] for t in tensors)) for a, b in zip(bounds[:-1], bounds[1:])], dim=1)

    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    out64 = per_document(lambda a, b, c: attention_ref(a, b, c, causal=causal), leaves)
    out64.backward(dout.double())
    ref = [out64.detach()] + [t.grad for t in leaves]
    sd = [t.clone().requires_grad_() for t in (q, k, v)]
    out = per_document(lambda a, b, c: F.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in (a, b, c)), is_causal=causal, enable_gqa=True).transpose(1, 2), sd)
    out.backward(dout)
    return ref, [rel_err(x, r) for x, r in zip([out.detach()] + [t.grad for t in sd], ref)]


def masked_attention_ref(q, k, v, *, scale=None, window=None, softcap=0.0, sinks=None, bounds=None):
    """Causal attention from the definition in float64, flash layout (b, s, h, d), GQA by repeat, with what
    transformers' eager functions add: a sliding window (query i sees keys j with 0 <= i - j < window), logit
    soft-capping (``softcap * tanh(s / softcap)``), attention sinks (one logit per head concatenated to each query's
    scores, softmax, then dropped: gpt-oss) and packed documents ``bounds`` (``[0, ..., S]``)."""
    q, k, v = q.double(), k.double(), v.double()
    h, hkv, n = q.shape[2], k.shape[2], q.shape[1]
    k, v = (x.repeat_interleave(h // hkv, dim=2) for x in (k, v))
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i, j = torch.arange(n, device=q.device)[:, None], torch.arange(n, device=q.device)[None]
    drop = j > i
    if window is not None:
        drop |= i - j >= window
    if bounds is not None:
        doc = torch.bucketize(torch.arange(n, device=q.device), torch.tensor(bounds[1:-1], device=q.device),
                              right=True)
        drop |= doc[:, None] != doc[None]
    s = s.masked_fill(drop, float("-inf"))
    if sinks is not None:
        sink = sinks.double().view(1, h, 1, 1).expand(s.shape[0], h, n, 1)
        p = torch.cat([s, sink], dim=-1).softmax(-1)[..., :-1]
    else:
        p = s.softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)
