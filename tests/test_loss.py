"""The sharded, chunked cross-entropy (easy_context/loss.py) against plain full-logit cross-entropy."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _dist import run_distributed

from easy_context.attention.comm import get_sp_group
from easy_context.attention.registry import shard_sequence
from easy_context.loss import linear_cross_entropy_sum, sharded_cross_entropy

# fp32: the chunked loss and its in-forward gradients differ from autograd through full logits only by the
# summation order (chunks, fp32 accumulators), ~1e-7 relative; 1e-5 leaves margin, a wrong token is >1e-2.
RTOL = 1e-5


def _close(actual, expected, what, rtol=RTOL):
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item() + 1e-12
    assert err <= rtol * scale, f"{what}: max abs err {err:.3g} vs scale {scale:.3g}"


def _problem(n=50, h=16, v=37, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype)
    weight = torch.randn(v, h, generator=gen).to(dtype)
    bias = torch.randn(v, generator=gen).to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[3:11] = -100
    return hidden, weight, bias, targets


def _grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    (out * 1.7).backward()  # a non-unit upstream gradient
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("chunk_size", [1, 7, 50, 4096])
def test_chunked_sum_matches_full_logits(chunk_size):
    hidden, weight, bias, targets = _problem()
    ref, ref_grads = _grads(lambda h, w, b: F.cross_entropy(h @ w.t() + b, targets, reduction="sum"),
                            hidden, weight, bias)
    got, got_grads = _grads(lambda h, w, b: linear_cross_entropy_sum(h, w, targets, bias=b, chunk_size=chunk_size),
                            hidden, weight, bias)
    _close(got, ref, "loss")
    for name, g, r in zip(("hidden", "weight", "bias"), got_grads, ref_grads):
        _close(g, r, f"grad {name}")


def test_chunked_sum_edge_cases():
    hidden, weight, _, targets = _problem()
    # batched (b, s, h) input, no bias, frozen weight
    got = linear_cross_entropy_sum(hidden.view(5, 10, -1), weight, targets.view(5, 10), chunk_size=8)
    _close(got, F.cross_entropy(hidden @ weight.t(), targets, reduction="sum"), "batched")
    # every target ignored: zero loss, zero gradients
    h = hidden.clone().requires_grad_()
    out = linear_cross_entropy_sum(h, weight, torch.full_like(targets, -100))
    out.backward()
    assert out.item() == 0.0 and not h.grad.any()
    # no valid target anywhere: the sharded loss is 0 (not nan)
    res = sharded_cross_entropy(hidden[None], weight, torch.full_like(targets, -100)[None])
    assert res.loss.item() == 0.0 and res.num_tokens.item() == 0
    # single process, no torch.distributed: the plain token mean
    res = sharded_cross_entropy(hidden[None], weight, targets[None], chunk_size=16)
    _close(res.loss, F.cross_entropy(hidden @ weight.t(), targets), "single-process mean")
    with pytest.raises(ValueError, match="targets must have hidden.shape"):
        linear_cross_entropy_sum(hidden, weight, targets[:-1])


def test_chunked_sum_bf16_close_to_fp32():
    hidden, weight, bias, targets = _problem(dtype=torch.bfloat16)
    ref, ref_grads = _grads(lambda h, w: F.cross_entropy(h.float() @ w.float().t(), targets, reduction="sum"),
                            hidden, weight)
    got, got_grads = _grads(lambda h, w: linear_cross_entropy_sum(h, w, targets, chunk_size=16), hidden, weight)
    assert got.dtype == torch.float32 and got_grads[0].dtype == torch.bfloat16
    # bf16 inputs: logits rounded to bf16 before the fp32 softmax (2^-8 relative)
    _close(got, ref, "bf16 loss", rtol=2e-2)
    for g, r in zip(got_grads, ref_grads):
        _close(g.float(), r, "bf16 grad", rtol=2e-2)


def _sft_worker(rank, world):
    """SFT: -100 spans spread unevenly over the ranks' zigzag shards. Gradients after DDP averaging equal those of
    the unsharded mean over valid tokens, for the world token mean and for the per-replica mean (sp_size 2)."""
    gen = torch.Generator().manual_seed(7)
    batch, seq, h, v = 2, 48, 16, 37
    hidden = torch.randn(batch, seq, h, generator=gen)
    weight = torch.randn(v, h, generator=gen)
    targets = torch.randint(0, v, (batch, seq), generator=gen)
    targets[0, :30] = -100   # a long prompt: rank 0's first chunk has no valid target at all
    targets[1, 20:26] = -100
    targets[1, 47] = -100

    def reference(rows):
        hd, w = hidden[rows].clone().requires_grad_(), weight.clone().requires_grad_()
        loss = F.cross_entropy((hd @ w.t()).flatten(0, 1), targets[rows].flatten())
        loss.backward()
        return loss.detach(), hd.grad, w.grad

    results = {}
    # 1) one SP group of all ranks, world token mean
    ref_loss, ref_dh, ref_dw = reference(slice(None))
    hd = shard_sequence("zigzag_ring_attn", hidden, rank, world).requires_grad_()
    w = weight.clone().requires_grad_()
    out = sharded_cross_entropy(hd, w, shard_sequence("zigzag_ring_attn", targets, rank, world), chunk_size=5)
    out.loss.backward()
    _close(out.global_loss, ref_loss, "sft loss")
    assert out.num_tokens.item() == int((targets != -100).sum())
    dw = w.grad.clone()
    dist.all_reduce(dw)
    _close(dw / world, ref_dw, "sft weight grad")
    # the hidden-state gradient is per token: this rank's shard of the reference, scaled by the DDP average
    _close(hd.grad / world, shard_sequence("zigzag_ring_attn", ref_dh, rank, world), "sft hidden grad")
    results["counts"] = int((shard_sequence("zigzag_ring_attn", targets, rank, world) != -100).sum())

    # 2) DP x SP: sp_size 2, replica r trains row r; unequal valid counts per replica
    sp = 2
    replica, sp_rank = rank // sp, rank % sp
    for group_kind in ("world", "sp"):
        group = None if group_kind == "world" else get_sp_group(sp)
        rows = slice(None) if group_kind == "world" else slice(replica, replica + 1)
        ref_loss, _, ref_dw = reference(rows)
        if group_kind == "sp":  # mean over replicas of each replica's token mean
            other = reference(slice(1 - replica, 2 - replica))[2]
            ref_dw = (ref_dw + other) / 2
        w = weight.clone().requires_grad_()
        out = sharded_cross_entropy(shard_sequence("ulysses_attn", hidden[replica:replica + 1], sp_rank, sp), w,
                                    shard_sequence("ulysses_attn", targets[replica:replica + 1], sp_rank, sp),
                                    group=group)
        out.loss.backward()
        _close(out.global_loss, ref_loss, f"dpxsp {group_kind} loss")
        dw = w.grad.clone()
        dist.all_reduce(dw)
        _close(dw / world, ref_dw, f"dpxsp {group_kind} weight grad")
    return results


def test_sharded_loss_on_4_ranks():
    results = run_distributed(_sft_worker, 4)
    counts = [r["counts"] for r in results]
    assert len(set(counts)) > 1, counts  # the case really is uneven across ranks


# ----------------------------------------------------------------------------- the public loss API under DDP
def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64)).float()


def _ddp_recipes(rank, world):
    """Each recipe trains one step of a zigzag-patched tiny Llama on this rank's shard under DDP. The exact one
    (CausalLMWithShardedLoss inside DDP) must give DDP's own averaged gradients equal to the unpatched model's on the
    whole sequence; a bypass of DDP's forward must be refused before DDP silently skips the averaging."""
    import copy

    from torch.nn.parallel import DistributedDataParallel as DDP

    from easy_context import CausalLMWithShardedLoss, apply_seq_parallel_monkey_patch, prepare_seq_parallel_inputs

    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 64, (2, 32), generator=gen)
    tgt = ids.roll(-1, 1)
    tgt[:, -1] = -100
    tgt[0, 3:19] = -100  # uneven valid targets over the ranks
    base = _tiny_llama()
    ref = copy.deepcopy(base)
    F.cross_entropy(ref(ids).logits.flatten(0, 1), tgt.flatten()).backward()

    def patched():
        model = copy.deepcopy(base)
        apply_seq_parallel_monkey_patch("zigzag_ring_attn", model)
        return model

    def step(call):
        p = prepare_seq_parallel_inputs("zigzag_ring_attn", ids, None, tgt, rank, world, "cpu")
        return call(p["local_input_ids"], p["local_position_ids"], p["local_target_ids"])

    def wrapper_in_ddp():
        ddp = DDP(CausalLMWithShardedLoss(patched()))
        step(ddp).loss.backward()
        for (name, param), ref_param in zip(ddp.module.model.named_parameters(), ref.parameters()):
            _close(param.grad, ref_param.grad, f"DDP-averaged grad {name}", rtol=1e-4)  # no all-reduce of ours
        return "exact"

    def inner_model_then_loss(no_grad=False):  # the old README recipe
        ddp = DDP(patched())
        model = ddp.module
        with torch.set_grad_enabled(not no_grad):
            return step(lambda i, p, t: sharded_cross_entropy(model.model(i, position_ids=p).last_hidden_state,
                                                              model.lm_head.weight, t))

    def wrapper_called_around_ddp():
        ddp = DDP(CausalLMWithShardedLoss(patched()))
        return step(ddp.module)  # the wrapper's forward, but not DDP's

    recipes = {"CausalLMWithShardedLoss inside DDP": wrapper_in_ddp,
               "model.model + sharded_cross_entropy under DDP": inner_model_then_loss,
               "the wrapper's module called around DDP": wrapper_called_around_ddp,
               "model.model + sharded_cross_entropy under DDP, no_grad (evaluation)":
                   lambda: inner_model_then_loss(no_grad=True) and "allowed"}
    out = {}
    for name, recipe in recipes.items():
        try:
            out[name] = recipe()
        except RuntimeError as e:
            out[name] = str(e)
    return out


DDP_EXPECTED = {
    "CausalLMWithShardedLoss inside DDP": "exact",
    "model.model + sharded_cross_entropy under DDP": "would never average these gradients",
    "the wrapper's module called around DDP": "would never average these gradients",
    "model.model + sharded_cross_entropy under DDP, no_grad (evaluation)": "allowed",
}


def test_loss_api_is_exact_under_ddp_and_a_bypass_is_refused():
    for per_rank in run_distributed(_ddp_recipes, 2):
        for name, expected in DDP_EXPECTED.items():
            assert expected in per_rank[name], (name, per_rank[name])
            if expected != "exact":
                assert expected == "allowed" or "CausalLMWithShardedLoss" in per_rank[name]


@pytest.mark.parametrize("weight, match", [
    (torch.empty(0), r"weight \(0,\) .*ZeRO-3 or FSDP"),  # a ZeRO-3 placeholder outside its module's forward
    (torch.randn(37 * 16 // 2), r"weight \(296,\)"),      # a flat FSDP shard
    (torch.randn(37, 8), r"weight \(37, 8\)"),
])
def test_a_sharded_or_mismatched_head_weight_is_refused(weight, match):
    hidden, _, _, targets = _problem()
    with pytest.raises(ValueError, match=match):
        sharded_cross_entropy(hidden[None], weight, targets[None])


# ----------------------------------------------------------------------------- the LM head in an FSDP2 unit of its own
def _fsdp2_head_unit_worker(rank, world):
    """Both ranks hold the same 3 rows (no SP); FSDP2 shards every decoder layer, the embedding and the LM head as
    units of their own, then the wrapper. The fused loss must gather the head for itself (it runs as the head's
    forward): a head weight read from the wrapper's forward is a sharded DTensor there."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from easy_context.loss import CausalLMWithShardedLoss

    model = _tiny_llama()
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 64, (3, 24), generator=torch.Generator().manual_seed(5))
    ref = reference(input_ids=ids, labels=ids).loss  # the unsharded model, one process's mean over all targets
    ref.backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}
    mesh = init_device_mesh("cpu", (world,))
    for unit in [*model.model.layers, model.model.embed_tokens, model.lm_head]:
        fully_shard(unit, mesh=mesh)
    wrapper = fully_shard(CausalLMWithShardedLoss(model), mesh=mesh)
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)
    positions = torch.arange(24).expand(3, 24)
    out = wrapper(ids, positions, targets)
    out.loss.backward()  # world x this rank's share of the world's mean; FSDP2 averages: the one-process gradient
    grads = {n.replace("model.", "", 1): p.grad.full_tensor() for n, p in wrapper.named_parameters()}
    _close(out.global_loss, ref.detach(), "loss")
    for name, grad in ref_grads.items():
        _close(grads[name], grad, f"grad {name}")
    return float(out.global_loss)


def test_the_loss_gathers_an_lm_head_sharded_in_its_own_fsdp2_unit():
    losses = run_distributed(_fsdp2_head_unit_worker, 2)
    assert losses[0] == losses[1]
