"""FlashAttention-4 (backend ``fa4``) on one GPU: the kernel against float64, every algorithm in a simulated multi-rank
world (tests/_sim.py: ranks as threads, p2p as copies, so the result equals a W-process run), dense and packed, and
the patched Llama at W=1 against the stock model.

Tolerance as in test_attention_nccl.py: each error (out, dq, dk, dv; relative norm against float64) at most 2x the
error of one SDPA call in the same dtype on the same data (per document when packed), plus a floor of 1e-4. A ring
merges W partial results in float32 and rounds once, so its error is of the order of one call's; a wrong block or a
token attending across a document boundary is off by ~1e-1 or more.
"""
import itertools

import torch
from _gpu import (  # _gpu puts tests/ on sys.path: _sim, reference
    assert_cases_within_yardstick,
    need_fa4,
    w1_logits_and_grads,
)
from _sim import simulate
from reference import per_document_reference, rel_err

from easy_context.attention.documents import normalize
from easy_context.attention.kernels import get_kernel

pytestmark = need_fa4()

SEQ, HEADS, DIM = 2048, 8, 128
FLOOR = 1e-4
# (algorithm, world, ring degree): usp with a Ulysses degree of 2 around a ring of 2, and of 1 around a ring of 2
ALGOS = [("zigzag_ring_attn", 2, None), ("zigzag_ring_attn", 4, None), ("dist_flash_attn", 2, None),
         ("dist_flash_attn", 4, None), ("ulysses_attn", 2, None), ("ulysses_attn", 4, None), ("usp_attn", 4, 2),
         ("usp_attn", 2, 2)]
MIXES = {"dense": [0, SEQ], "packed": [0, 1, 2, 37, 700, 1023, 1030, 1600, SEQ - 1, SEQ]}  # one-token documents too


def _data(kv, dtype, seed=0, seq=SEQ, heads=HEADS, dim=DIM):
    g = torch.Generator().manual_seed(seed + kv)
    return [torch.randn(1, seq, h, dim, generator=g).to("cuda", dtype) for h in (heads, kv, kv, heads)]


def _case(name, got, ref, sdpa):
    errs = [rel_err(x, r) for x, r in zip(got, ref)]
    return dict(case=name, errs=errs, sdpa=sdpa, finite=all(bool(torch.isfinite(x).all()) for x in got),
                ok=all(e <= 2 * s + FLOOR for e, s in zip(errs, sdpa)))


def test_fa4_kernel_matches_float64(record_property):
    """The kernel alone: causal / non-causal, MHA / GQA, bf16 / fp16, head dims 64, 128, 256, a non-square unmasked
    block (a ring's remote block), and the ring property: each key block's backward with the merged out/lse."""
    kern = get_kernel("fa4", torch.device("cuda"), torch.bfloat16, DIM)
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    results = []
    for dtype, kv, causal, dim in itertools.product((torch.bfloat16, torch.float16), (2, 8), (True, False),
                                                    (64, 128, 256)):
        q, k, v, dout = _data(kv, dtype, dim=dim)
        ref, sdpa = per_document_reference(q, k, v, dout, causal, [0, SEQ])
        scale = dim ** -0.5
        o, lse = kern.forward(t(q), t(k), t(v), causal, scale)
        dq, dk, dv = kern.backward(t(dout), t(q), t(k), t(v), o, lse, causal, scale)
        results.append(_case(f"kernel {dtype} kv={kv} causal={causal} d={dim}", [t(o), t(dq), t(dk), t(dv)],
                             ref, sdpa))
    # two key blocks of a ring step (1536 and 512 keys, unmasked), merged, then backward per block
    from easy_context.attention.merge import merge_into, new_accumulators

    q, k, v, dout = _data(2, torch.bfloat16, seed=5)
    ref, sdpa = per_document_reference(q, k, v, dout, False, [0, SEQ])
    out, lse = new_accumulators(t(q))
    blocks = [slice(0, 1536), slice(1536, SEQ)]
    for b in blocks:
        merge_into(out, lse, *kern.forward(t(q), t(k[:, b]), t(v[:, b]), False, DIM ** -0.5))
    out = out.to(q.dtype)
    dq = torch.zeros_like(t(q), dtype=torch.float32)
    dks, dvs = [], []
    for b in blocks:
        g = kern.backward(t(dout), t(q), t(k[:, b]), t(v[:, b]), out, lse, False, DIM ** -0.5)
        dq += g[0]
        dks.append(t(g[1]))
        dvs.append(t(g[2]))
    results.append(_case("two merged key blocks", [t(out), t(dq), torch.cat(dks, 1), torch.cat(dvs, 1)], ref, sdpa))
    assert_cases_within_yardstick(results, record_property)


def test_fa4_varlen_matches_float64_per_document(record_property):
    kern = get_kernel("fa4", torch.device("cuda"), torch.bfloat16, DIM)
    results = []
    bounds = MIXES["packed"]
    for kv, causal in itertools.product((2, 8), (True, False)):
        q, k, v, dout = _data(kv, torch.bfloat16, seed=9)
        ref, sdpa = per_document_reference(q, k, v, dout, causal, bounds)
        cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
        longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        flat = [x[0] for x in (q, k, v, dout)]  # (tokens, heads, dim)
        o, lse = kern.varlen.forward(*flat[:3], cu, longest, causal, DIM ** -0.5)
        g = kern.varlen.backward(flat[3], *flat[:3], o, lse, cu, longest, causal, DIM ** -0.5)
        results.append(_case(f"varlen kv={kv} causal={causal}", [x[None] for x in (o, *g)], ref, sdpa))
    assert_cases_within_yardstick(results, record_property)


def test_every_algorithm_with_fa4_in_a_simulated_world_matches_float64(record_property):
    """zigzag, dist_flash, ulysses, usp x W=2/4 x causal/non-causal x MHA/GQA x dense/packed, the fa4 kernel inside
    the library's own per-rank schedules (tests/_sim.py), against float64 (per document when packed)."""
    results, refs = [], {}
    kern = get_kernel("fa4", torch.device("cuda"), torch.bfloat16, DIM)
    for (algo, world, ring), kv, causal, mix in itertools.product(ALGOS, (2, 8), (True, False), MIXES):
        if algo == "dist_flash_attn" and mix == "packed":
            continue  # dist_flash does not take documents (an error names the algorithms that do)
        bounds = MIXES[mix]
        q, k, v, dout = _data(kv, torch.bfloat16, seed=3)
        if (kv, causal, mix) not in refs:
            refs[(kv, causal, mix)] = per_document_reference(q, k, v, dout, causal, bounds)
        ref, sdpa = refs[(kv, causal, mix)]
        docs = normalize(bounds, 1, SEQ, algo) if mix == "packed" else None
        got = simulate(algo, q, k, v, dout, world, kern, DIM ** -0.5, causal, docs, ring)
        results.append(_case(f"{algo} W={world} ring={ring} kv={kv} causal={causal} {mix}", got, ref, sdpa))
    assert_cases_within_yardstick(results, record_property)


def test_patched_llama_with_fa4_matches_the_stock_model(tmp_path, record_property):
    """W=1 (a world of one rank): the patched model with fa4 against the stock sdpa model in bf16, both against the
    same model in float64 (eager attention): the patched model's logits and gradients may be off by at most 2x the
    stock bf16 model's own error plus the floor."""
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    if not dist.is_initialized():
        dist.init_process_group("nccl", init_method=f"file://{tmp_path}/rdzv", rank=0, world_size=1)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=1000, max_position_embeddings=4096)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 1000, (1, SEQ))

    def run(dtype, attn, patched):
        model = LlamaForCausalLM(cfg)
        model.load_state_dict(base.state_dict())
        model.config._attn_implementation = attn
        return w1_logits_and_grads(model.to("cuda", dtype), ids, patched)

    ref = run(torch.float64, "eager", False)
    stock = run(torch.bfloat16, "sdpa", False)
    ours = run(torch.bfloat16, "sdpa", True)
    e_stock = [rel_err(a, b) for a, b in zip(stock, ref)]
    e_ours = [rel_err(a, b) for a, b in zip(ours, ref)]
    record_property("logits", f"fa4 {e_ours[0]:.2e} stock {e_stock[0]:.2e}")
    record_property("worst_grad", f"fa4 {max(e_ours[1:]):.2e} stock {max(e_stock[1:]):.2e}")
    bad = [(i, a, b) for i, (a, b) in enumerate(zip(e_ours, e_stock)) if not a <= 2 * b + FLOOR]
    assert not bad, bad
