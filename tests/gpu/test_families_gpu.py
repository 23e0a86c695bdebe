"""Sliding windows, soft-capping and sinks with FlashAttention-4 (backend ``fa4``) on one GPU: the kernel's banded
calls of ring blocks at arbitrary global offsets against float64, every algorithm in a simulated world (tests/_sim.py)
with a window, soft-capping and sinks, and tiny Gemma 2 / Gemma 3 / Mistral / gpt-oss at W=1 with fa4 against the
stock eager model.

Tolerance as in test_fa4_gpu.py: each error (relative norm against float64) at most 2x the yardstick's plus a floor of
1e-4. The yardstick here is transformers' eager attention in the same dtype on the same data (scores in that dtype,
softmax in float32: what the stock model computes; SDPA cannot soft-cap), so a banded block off by one key or a sink
counted per block (~1e-1) fails while kernel rounding passes.
"""
import itertools

import pytest
import torch
from _gpu import (  # _gpu puts tests/ on sys.path: _sim, reference
    assert_cases_within_yardstick,
    need_fa4,
    w1_logits_and_grads,
)
from _sim import simulate
from reference import masked_attention_ref, rel_err

from easy_context.attention.documents import normalize, plan_block
from easy_context.attention.kernels import get_kernel
from easy_context.attention.merge import add_sinks, merge_into, new_accumulators, sink_grad

pytestmark = need_fa4()

SEQ, HEADS, DIM = 2048, 8, 128
FLOOR = 1e-4
FEATURES = {"window", "softcap"}
DEV, BACKEND = torch.device("cuda"), "fa4"  # (a CPU dry run of these tests' logic swaps them for cpu / math)


def _data(kv, dtype, seed=0, seq=SEQ, dim=DIM):
    g = torch.Generator().manual_seed(seed + kv)
    return [torch.randn(1, seq, h, dim, generator=g).to(DEV, dtype) for h in (HEADS, kv, kv, HEADS)]


def _eager(q, k, v, qi, kj, window, softcap, sinks, scale):
    """transformers' eager attention in the inputs' dtype (softmax in float32) for global query indices ``qi`` and
    key indices ``kj`` (causal, window, sinks): the yardstick, and in float64 the reference."""
    h = q.shape[2]
    k, v = (x.repeat_interleave(h // x.shape[2], dim=2) for x in (k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    d = qi[:, None] - kj[None]
    s = s.masked_fill((d < 0) | ((d >= window) if window else torch.zeros_like(d, dtype=torch.bool)), float("-inf"))
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    if sinks is not None:
        sk = sinks.to(s.dtype).view(1, h, 1, 1).expand(s.shape[0], h, s.shape[2], 1)
        p = torch.cat([s, sk], -1).softmax(-1, dtype=dt)[..., :-1].to(q.dtype)
    else:
        p = s.softmax(-1, dtype=dt).to(q.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def _grads(fn, tensors, dout):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _case(name, got, ref, yard):
    errs = [rel_err(x, r) for x, r in zip(got, ref)]
    sdpa = [rel_err(x, r) for x, r in zip(yard, ref)]
    return dict(case=name, errs=errs, sdpa=sdpa, finite=all(bool(torch.isfinite(x).all()) for x in got),
                ok=all(e <= 2 * s + FLOOR for e, s in zip(errs, sdpa)))


def test_fa4_banded_ring_blocks_match_float64(record_property):
    """One ring block at a time: queries at global rows ``qr`` against keys at ``kr`` with a window (the band that
    documents.plan_block derives from the global offsets, backends.fa4_window's left/right), soft-capping, merged over
    two key blocks with sinks added after the merge, then each block's backward with the merged out/lse and the sink
    gradient."""
    results = []
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    # (query rows, key blocks, window): an earlier rank's block reached partly, a diagonal block, one beyond reach
    layouts = [((1024, 2048), [(0, 700), (700, 1024)], 1100), ((512, 1536), [(0, 512), (512, 1536)], 300),
               ((1536, 2048), [(256, 1024), (1024, 1536)], 1000)]
    for dtype, kv, softcap, with_sinks, (rows, blocks, window) in itertools.product(
            (torch.bfloat16,), (2, 8), (0.0, 20.0), (False, True), layouts):
        kern = get_kernel(BACKEND, DEV, dtype, DIM, FEATURES)
        q, k, v, dout = _data(kv, dtype, seed=11)
        qs = q[:, rows[0]:rows[1]]
        do = dout[:, rows[0]:rows[1]]
        keys = torch.cat([torch.arange(a, b) for a, b in blocks]).to(DEV)
        kk, vv = (torch.cat([x[:, a:b] for a, b in blocks], 1) for x in (k, v))
        qi = torch.arange(*rows).to(DEV)
        sinks = torch.linspace(-1, 3, HEADS, device=DEV) if with_sinks else None
        scale = DIM ** -0.5

        def ref_fn(a, b, c, dt=torch.float64):
            return _eager(a.to(dt), b.to(dt), c.to(dt), qi, keys, window, softcap,
                          None if sinks is None else sinks.to(dt), scale)
        ref = _grads(ref_fn, (qs, kk, vv), do.double())
        yard = _grads(lambda a, b, c: _eager(a, b, c, qi, keys, window, softcap, sinks, scale), (qs, kk, vv), do)
        out, lse = new_accumulators(t(qs))
        segs, off = [], 0
        for a, b in blocks:
            plan = plan_block(((rows[0], rows[1]),), ((a, b),), (0, SEQ), True, False, window)
            assert plan, (rows, (a, b), window)
            for sg in plan:  # rows of this key block -> rows of the concatenated keys
                ks = slice(sg.k.start + off, sg.k.stop + off)
                segs.append((sg, ks))
                o, l = kern.forward(t(qs)[:, :, sg.q], t(kk)[:, :, ks], t(vv)[:, :, ks], sg.causal, scale,
                                    **({"band": sg.band} if sg.band else {}), **({"softcap": softcap} if softcap
                                                                                    else {}))
                merge_into(out[:, :, sg.q], lse[:, :, sg.q], o, l)
            off += b - a
        if sinks is not None:
            out, lse = add_sinks(out, lse, sinks)
        out = out.to(dtype)
        dq = torch.zeros_like(t(qs), dtype=torch.float32)
        dk, dv = (torch.zeros_like(t(kk), dtype=torch.float32) for _ in range(2))
        for sg, ks in segs:
            g = kern.backward(t(do)[:, :, sg.q], t(qs)[:, :, sg.q], t(kk)[:, :, ks], t(vv)[:, :, ks], out[:, :, sg.q],
                              lse[:, :, sg.q], sg.causal, scale, **({"band": sg.band} if sg.band else {}),
                              **({"softcap": softcap} if softcap else {}))
            dq[:, :, sg.q] += g[0]
            dk[:, :, ks] += g[1]
            dv[:, :, ks] += g[2]
        got = [t(out), t(dq), t(dk), t(dv)]
        name = f"block q{rows} k{blocks} w={window} kv={kv} softcap={softcap} sinks={with_sinks}"
        results.append(_case(name, got, ref, yard))
        if sinks is not None:  # the sink gradient against float64 autograd (a rank's queries: the whole block here)
            s64 = sinks.double().requires_grad_()
            _eager(qs.double(), kk.double(), vv.double(), qi, keys, window, softcap, s64, scale).backward(do.double())
            err = rel_err(sink_grad(t(do), out, lse, sinks), s64.grad)
            results[-1]["errs"].append(err)
            results[-1]["sdpa"].append(results[-1]["sdpa"][0])  # out's yardstick: the sink gradient is a sum of it
            results[-1]["ok"] = results[-1]["ok"] and err <= 2 * results[-1]["sdpa"][0] + FLOOR
    assert_cases_within_yardstick(results, record_property)


ALGOS = [("zigzag_ring_attn", 2, None), ("zigzag_ring_attn", 4, None), ("dist_flash_attn", 4, None),
         ("ulysses_attn", 2, None), ("ulysses_attn", 4, None), ("usp_attn", 4, 2), ("usp_attn", 2, 2)]
# window, softcap, sinks, packed documents
MIXES = [(1024, 0.0, False, None), (300, 30.0, True, None), (None, 30.0, True, None),
         (700, 0.0, True, [0, 1, 37, 700, 1030, 1600, SEQ])]


def test_every_algorithm_with_fa4_windows_softcap_and_sinks_matches_float64(record_property):
    """Every algorithm's own schedule (tests/_sim.py) with fa4: windows (blocks skipped, partly covered, banded),
    soft-capping, sinks and packed documents, against float64 autograd through the definition."""
    results = []
    kern = get_kernel(BACKEND, DEV, torch.bfloat16, DIM, FEATURES)
    for (algo, world, ring), kv, (window, softcap, with_sinks, bounds) in itertools.product(ALGOS, (2, 8), MIXES):
        if algo == "dist_flash_attn" and (window is not None or bounds is not None):
            continue  # refused (an error names the algorithms that take windows / documents)
        q, k, v, dout = _data(kv, torch.bfloat16, seed=3)
        sinks = torch.linspace(-1, 3, HEADS, device=DEV) if with_sinks else None
        leaves = [x.double().requires_grad_() for x in (q, k, v)]
        s64 = sinks.double().requires_grad_() if with_sinks else None
        ref = masked_attention_ref(*leaves, window=window, softcap=softcap, sinks=s64, bounds=bounds)
        ref.backward(dout.double())
        want = [ref.detach()] + [x.grad for x in leaves] + ([s64.grad] if with_sinks else [])
        idx = torch.arange(SEQ, device=DEV)
        if bounds is None:
            yard = _grads(lambda a, b, c: _eager(a, b, c, idx, idx, window, softcap, sinks, DIM ** -0.5), (q, k, v),
                          dout)
        else:  # per document (the sinks join every query's softmax, inside its document)
            parts = [_grads(lambda a, b, c: _eager(a, b, c, idx[:e - s], idx[:e - s], window, softcap, sinks,
                                                   DIM ** -0.5), [x[:, s:e] for x in (q, k, v)], dout[:, s:e])
                     for s, e in zip(bounds[:-1], bounds[1:])]
            yard = [torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1),
                    torch.cat([p[2] for p in parts], 1), torch.cat([p[3] for p in parts], 1)]
        docs = normalize(bounds, 1, SEQ, algo) if bounds else None
        got = simulate(algo, q, k, v, dout, world, kern, DIM ** -0.5, True, docs, ring, window=window,
                       softcap=softcap, sinks=sinks)
        name = f"{algo} W={world} ring={ring} kv={kv} window={window} softcap={softcap} sinks={with_sinks} " \
               f"{'packed' if bounds else 'dense'}"
        case = _case(name, got[:4], want[:4], yard)
        if with_sinks:
            err = rel_err(got[4], want[4])
            case["errs"].append(err)
            case["sdpa"].append(case["sdpa"][0])
            case["ok"] = case["ok"] and err <= 2 * case["sdpa"][0] + FLOOR
        results.append(case)
    assert_cases_within_yardstick(results, record_property)


def _family_configs():
    from transformers import Gemma2Config, Gemma3TextConfig, GptOssConfig, MistralConfig

    small = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=64, vocab_size=1000, max_position_embeddings=4096)
    mixed = ["sliding_attention", "full_attention"]
    return {
        "gemma2": Gemma2Config(**small, sliding_window=512, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                               query_pre_attn_scalar=64, layer_types=mixed),
        "gemma3": Gemma3TextConfig(**small, sliding_window=512, layer_types=mixed),
        "mistral": MistralConfig(**small, sliding_window=512),
        "gpt_oss": GptOssConfig(**{**small, "intermediate_size": 256}, num_local_experts=4, num_experts_per_tok=2,
                                sliding_window=512, layer_types=mixed),
    }


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "mistral", "gpt_oss"])
def test_patched_family_with_fa4_matches_the_stock_model(family, tmp_path, record_property):
    """W=1: the patched model (zigzag_ring_attn, fa4: windows as banded calls, soft-capping, sinks) against the stock
    eager model in bf16, both against the same model in float64 (eager): the patched model's logits and gradients may
    be off by at most 2x the stock bf16 model's own error plus the floor."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    if not dist.is_initialized():
        dist.init_process_group("nccl", init_method=f"file://{tmp_path}/rdzv", rank=0, world_size=1)
    cfg = _family_configs()[family]
    torch.manual_seed(0)
    # eager experts (gpt-oss's MoE): torch._grouped_mm takes no float64, which the reference runs in
    base = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", experts_implementation="eager")
    ids = torch.randint(0, 1000, (1, SEQ))

    def run(dtype, patched):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", experts_implementation="eager")
        model.load_state_dict(base.state_dict())
        return w1_logits_and_grads(model.to("cuda", dtype), ids, patched)

    ref = run(torch.float64, False)
    stock = run(torch.bfloat16, False)
    ours = run(torch.bfloat16, True)
    assert len(ours) == len(ref) == len(stock)
    e_stock = [rel_err(a, b) for a, b in zip(stock, ref)]
    e_ours = [rel_err(a, b) for a, b in zip(ours, ref)]
    record_property("logits", f"fa4 {e_ours[0]:.2e} stock {e_stock[0]:.2e}")
    record_property("worst_grad", f"fa4 {max(e_ours[1:]):.2e} stock {max(e_stock[1:]):.2e}")
    bad = [(i, a, b) for i, (a, b) in enumerate(zip(e_ours, e_stock)) if not a <= 2 * b + FLOOR]
    assert not bad, bad
