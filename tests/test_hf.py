"""The transformers integration (easy_context/integrations/hf.py): tiny Llama/Mistral/Qwen2/Qwen3 models under every
seq_algo on 2 and 4 gloo ranks, against a single-process unpatched forward/backward of the full sequence.

One process group per world size runs all cases. Every rank builds the same model and batch from a shared seed,
computes the unpatched reference itself, then runs the patched copy on its shard.
"""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _dist import run_distributed

from easy_context.api import apply_seq_parallel_monkey_patch, gather_seq_parallel_outputs, prepare_seq_parallel_inputs
from easy_context.attention.registry import SEQ_ALGOS, get_attn_func, shard_sequence
from easy_context.integrations import hf, shards
from easy_context.loss import sharded_cross_entropy

# fp32 everywhere. The SP path re-associates the softmax sums (ring merges, lse rescaling) and the loss sums
# (per-rank partial sums, chunked CE, all-reduced gradients): each changes float32 rounding at the ~1e-7
# relative level, amplified by 2 layers and backward to measured ~1e-6. 1e-4 relative (of the tensor's largest
# magnitude) keeps a wide margin; a wrong mask, a missing ring block or a mis-scaled loss is >1e-2.
RTOL = 1e-4

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=4096)


def _configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    return {
        "llama": LlamaConfig(**SMALL),
        "mistral": MistralConfig(**SMALL),  # sliding_window 4096 by default: longer than our sequences, honoured
        "qwen2": Qwen2Config(**SMALL),
        "qwen3": Qwen3Config(head_dim=16, **SMALL),
    }


def _model(cfg):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()


def _close(actual, expected, what, rtol=RTOL):
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item() + 1e-12
    assert err <= rtol * scale, f"{what}: max abs err {err:.3g} vs scale {scale:.3g}"
    return err / scale


def _check_autocast(rank, world, ids, tgt):
    """float32 weights under bf16 autocast (train.py --dtype float32 --mixed-precision bf16): attention gets float32
    q/k (rotary embeddings multiply in float32) and a bfloat16 v, and must follow autocast as SDPA does."""
    sp_algos = [a for a in SEQ_ALGOS if a != "data_parallel"]
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, ids.shape[1], h, 16, generator=gen) for h in (4, 2, 2))
    for algo in sp_algos:  # function level: exactly the bf16 call, gradients back in float32
        ql, kl, vl = (shard_sequence(algo, x, rank, world).requires_grad_() for x in (q, k, v))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = get_attn_func(algo)(ql, kl, vl.bfloat16())
        plain = get_attn_func(algo)(*(x.detach().bfloat16() for x in (ql, kl, vl)))
        assert out.dtype == torch.bfloat16 and torch.equal(out, plain), algo
        out.float().sum().backward()
        assert ql.grad.dtype == kl.grad.dtype == torch.float32, algo
        with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 is not autocast's to cast (SDPA keeps it too)
            out64 = get_attn_func(algo)(*(x.detach().double() for x in (ql, kl, vl)))
        assert out64.dtype == torch.float64, algo
    # model level: against the unpatched model (SDPA) under the same autocast. Both compute in bfloat16 (8 bits of
    # mantissa, 2**-8 = 3.9e-3 relative per rounding) with different kernels and summation orders, through 2
    # layers and the loss: a few roundings apart, so 3e-2 of the largest value (float32 runs above agree to 1e-4).
    base = _model(_configs()["llama"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _reference(base, ids, tgt)
    worst = 0.0
    for algo in sp_algos:
        model = copy.deepcopy(base)
        apply_seq_parallel_monkey_patch(algo, model)
        p = prepare_seq_parallel_inputs(algo, ids, torch.arange(ids.shape[1])[None], tgt, rank, world, "cpu")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model.model(p["local_input_ids"], position_ids=p["local_position_ids"]).last_hidden_state
            logits = gather_seq_parallel_outputs(algo, model.lm_head(hidden).float(), seq_len=ids.shape[1])
            out = sharded_cross_entropy(hidden, model.lm_head.weight, p["local_target_ids"], chunk_size=40)
        out.loss.backward()
        worst = max(worst, _close(logits, ref[1].float(), f"autocast {algo} logits", 3e-2),
                    _close(out.global_loss, ref[0].float(), f"autocast {algo} loss", 3e-2))
        for name, param in model.named_parameters():
            grad = param.grad.clone()
            dist.all_reduce(grad)
            worst = max(worst, _close(grad / world, ref[2][name], f"autocast {algo} grad {name}", 3e-2))
    return worst


def _reference(model, ids, tgt):
    """Unpatched single-process loss (token mean over valid targets), logits and parameter gradients."""
    ref = copy.deepcopy(model)
    logits = ref(ids, position_ids=torch.arange(ids.shape[1])[None]).logits
    loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-100)
    loss.backward()
    return loss.detach(), logits.detach(), {n: p.grad for n, p in ref.named_parameters()}


def _check_sp(model, algo, ids, tgt, ref, rank, world, what, **opts):
    """Run ``model`` (already patched) on this rank's shard; compare logits, loss and DDP-averaged gradients."""
    ref_loss, ref_logits, ref_grads = ref
    p = prepare_seq_parallel_inputs(algo, ids, torch.arange(ids.shape[1])[None], tgt, rank, world, "cpu", **opts)
    hidden = model.model(p["local_input_ids"], position_ids=p["local_position_ids"]).last_hidden_state
    out = sharded_cross_entropy(hidden, model.lm_head.weight, p["local_target_ids"], chunk_size=40)
    out.loss.backward()
    logits = gather_seq_parallel_outputs(algo, model.lm_head(hidden).detach(), seq_len=ids.shape[1], **opts)
    _close(logits, ref_logits, f"{what} logits")
    _close(out.global_loss, ref_loss, f"{what} loss")
    for name, param in model.named_parameters():
        grad = param.grad.clone()
        dist.all_reduce(grad)  # what DDP / DeepSpeed do: average over all ranks
        _close(grad / world, ref_grads[name], f"{what} grad {name}")


def _equivalence_worker(rank, world):
    from transformers.masking_utils import AttentionMaskInterface

    gen = torch.Generator().manual_seed(1234)
    seq = 48  # a multiple of every layout's granularity on 2 and 4 ranks (largest: 2*4 = 8)
    ids = torch.randint(0, 128, (2, seq), generator=gen)
    tgt = ids.roll(-1, dims=1)
    tgt[:, -1] = -100
    tgt[0, 5:17] = -100  # an SFT-style prompt span: uneven valid counts per rank
    mask_calls = []
    checked = []
    for model_type, cfg in _configs().items():
        base = _model(cfg)
        ref = _reference(base, ids, tgt)
        for algo in SEQ_ALGOS:
            model = copy.deepcopy(base)
            name = apply_seq_parallel_monkey_patch(algo, model)
            if algo == "data_parallel":
                assert name is None and model.config._attn_implementation == "sdpa"
                continue
            assert model.config._attn_implementation == name and base.config._attn_implementation == "sdpa"
            # spy on the registered mask function: it must be called, and build nothing
            mask_fn = AttentionMaskInterface()[name]  # the public Mapping API (local overrides, then the global table)
            AttentionMaskInterface.register(name, lambda *a, _f=mask_fn, **k: mask_calls.append(_f(*a, **k)))
            try:
                _check_sp(model, algo, ids, tgt, ref, rank, world, f"{model_type}/{algo}/w{world}")
            finally:
                AttentionMaskInterface.register(name, mask_fn)
            checked.append((model_type, algo))
    assert mask_calls and all(m is None for m in mask_calls)
    checked.append(("llama autocast bf16, worst relative error", _check_autocast(rank, world, ids, tgt)))

    # DP x SP inside the SP group sizes is covered in test_api; here: an options variant per world size
    if world == 4:
        base = _model(_configs()["qwen2"])
        ref = _reference(base, ids, tgt)
        for ring_degree in (1, 2, 4):
            model = copy.deepcopy(base)
            apply_seq_parallel_monkey_patch("usp_attn", model, ring_degree=ring_degree)
            _check_sp(model, "usp_attn", ids, tgt, ref, rank, world, f"usp ring{ring_degree}",
                      ring_degree=ring_degree)
            checked.append(("qwen2", f"usp_attn ring_degree={ring_degree}"))

    # never silently wrong: padding masks, short sliding windows, cached generation
    model = _model(_configs()["llama"])
    apply_seq_parallel_monkey_patch("zigzag_ring_attn", model)
    p = prepare_seq_parallel_inputs("zigzag_ring_attn", ids, None, None, rank, world, "cpu")
    local = p["local_input_ids"]
    with torch.no_grad():
        plain = model(local, position_ids=p["local_position_ids"], use_cache=False).logits
        ones = model(local, position_ids=p["local_position_ids"], attention_mask=torch.ones_like(local),
                     use_cache=False).logits
    assert torch.equal(plain, ones)  # an all-ones mask is no padding: accepted, same result
    padded = torch.ones_like(local)
    padded[:, -3:] = 0
    with pytest.raises(ValueError, match="padding"):
        model(local, position_ids=p["local_position_ids"], attention_mask=padded)
    with pytest.raises(ValueError, match="4-D"):
        model(local, position_ids=p["local_position_ids"], attention_mask=torch.zeros(2, 1, seq // world, seq // world))

    cfg = copy.deepcopy(_configs()["mistral"])
    cfg.sliding_window = 16  # shorter than the 48-token sequence: applied by the others (test_families.py)
    model = _model(cfg)
    apply_seq_parallel_monkey_patch("dist_flash_attn", model)
    p = prepare_seq_parallel_inputs("dist_flash_attn", ids, None, None, rank, world, "cpu")
    with pytest.raises(ValueError, match="sliding window shorter than the sequence.*zigzag_ring_attn"):
        model(p["local_input_ids"], position_ids=p["local_position_ids"])
    return checked


@pytest.mark.parametrize("world", [2, 4])
def test_models_match_unsharded_reference(world):
    results = run_distributed(_equivalence_worker, world, timeout=300)
    assert len(results[0]) >= 4 * 4  # 4 model types x 4 SP algorithms ran on every rank


def test_mask_function_builds_nothing_and_ignores_zigzag_jumps():
    """Zigzag position ids jump (0..5, 42..47): with sdpa transformers reads that as packed documents and
    materialises a mask; under our registered name no mask is built at all."""
    from transformers.masking_utils import create_causal_mask

    cfg = _configs()["llama"]
    name = hf.register_attention(hf.SPAttentionConfig("zigzag_ring_attn"))
    embeds = torch.zeros(1, 12, 64)
    zigzag_pos = torch.cat([torch.arange(6), torch.arange(42, 48)])[None]
    cfg._attn_implementation = "sdpa"
    assert create_causal_mask(cfg, embeds, None, None, position_ids=zigzag_pos) is not None  # would be wrong
    cfg._attn_implementation = name
    assert create_causal_mask(cfg, embeds, None, None, position_ids=zigzag_pos) is None
    assert create_causal_mask(cfg, embeds, torch.ones(1, 12, dtype=torch.long), None, position_ids=zigzag_pos) is None
    with pytest.raises(ValueError, match="padding"):
        create_causal_mask(cfg, embeds, torch.tensor([[1] * 10 + [0] * 2]), None, position_ids=zigzag_pos)


def test_registered_names_avoid_transformers_reserved_words():
    for algo in SEQ_ALGOS[:-1]:
        name = hf.SPAttentionConfig(algo, sp_size=2, backend="flash").name
        assert name.startswith("easy_context_") and not any(w in name for w in ("flash", "sdpa", "flex"))
    assert hf.SPAttentionConfig("usp_attn", ring_degree=2).name == "easy_context_usp_attn_ring2"


def test_object_form_patches_that_model_only():
    from transformers import AutoModelForCausalLM

    cfg = _configs()["qwen3"]
    a, b = _model(cfg), AutoModelForCausalLM.from_config(copy.deepcopy(cfg))
    name = apply_seq_parallel_monkey_patch("dist_flash_attn", a, sp_size=2)
    assert a.config._attn_implementation == name == "easy_context_dist_fa_attn_sp2"
    assert b.config._attn_implementation == "sdpa" and hf.is_sequence_parallel(a) and not hf.is_sequence_parallel(b)


def test_string_form_patches_future_models_of_that_type_only():
    from transformers import AutoModelForCausalLM

    cfgs = _configs()
    before = _model(cfgs["mistral"])
    try:
        name = apply_seq_parallel_monkey_patch("ulysses_attn", "mistral")
        for impl in ("sdpa", "eager", None):
            kwargs = {} if impl is None else {"attn_implementation": impl}
            model = AutoModelForCausalLM.from_config(copy.deepcopy(cfgs["mistral"]), **kwargs)
            assert model.config._attn_implementation == name, impl
        assert before.config._attn_implementation == "sdpa"
        assert _model(cfgs["llama"]).config._attn_implementation == "sdpa"  # other types untouched
        # a second patch of the same type replaces the first
        assert apply_seq_parallel_monkey_patch("usp_attn", "mistral", ring_degree=1) == "easy_context_usp_attn_ring1"
        assert _model(cfgs["mistral"]).config._attn_implementation == "easy_context_usp_attn_ring1"
    finally:
        hf.unpatch_model_type("mistral")
    assert _model(cfgs["mistral"]).config._attn_implementation == "sdpa"
    assert apply_seq_parallel_monkey_patch("data_parallel", "mistral") is None
    assert hf.patched_attn_implementation("mistral") is None


def test_clear_errors():
    model = _model(_configs()["llama"])
    with pytest.raises(ValueError, match="unknown seq_algo .*zigzag_ring_attn"):
        apply_seq_parallel_monkey_patch("ring_attn", "llama")
    with pytest.raises(ValueError, match="unsupported model type 'gpt2'.*llama, mistral, qwen2, qwen3"):
        apply_seq_parallel_monkey_patch("zigzag_ring_attn", "gpt2")
    with pytest.raises(ValueError, match="unsupported model type"):
        apply_seq_parallel_monkey_patch("data_parallel", "gpt2")
    with pytest.raises(TypeError, match="PreTrainedModel"):
        apply_seq_parallel_monkey_patch("zigzag_ring_attn", torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="ring_degree is a usp_attn option"):
        apply_seq_parallel_monkey_patch("zigzag_ring_attn", model, ring_degree=2)
    with pytest.raises(ValueError, match="sp_size"):
        apply_seq_parallel_monkey_patch("zigzag_ring_attn", model, sp_size=0)
    assert model.config._attn_implementation == "sdpa"  # failed calls changed nothing
    apply_seq_parallel_monkey_patch("zigzag_ring_attn", model)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        model(torch.zeros(1, 8, dtype=torch.long))


# ----------------------------------------------------------------------------- misuse that used to be silently wrong
def _wrong_attention_rows(rank, world, ids, tgt):
    """Shards fed to a model whose attention does not assemble them: each row's error text (or "ok")."""
    cfg = _configs()["llama"]

    def wrapped(model):
        from easy_context import CausalLMWithShardedLoss

        return CausalLMWithShardedLoss(model)

    def prepared(algo="zigzag_ring_attn", **opts):
        return prepare_seq_parallel_inputs(algo, ids, None, tgt, rank, world, "cpu", **opts)

    def string_form_after_build():
        model = _model(cfg)
        try:
            apply_seq_parallel_monkey_patch("zigzag_ring_attn", "llama")  # too late for `model`
            p = prepared()
            return model(p["local_input_ids"], position_ids=p["local_position_ids"])
        finally:
            hf.unpatch_model_type("llama")

    def unpatched(call):
        model = _model(cfg)
        p = prepared()
        return call(model, p)

    def patched(algo, prepare_algo, model_opts=None, prepare_opts=None):
        model = _model(cfg)
        apply_seq_parallel_monkey_patch(algo, model, **(model_opts or {}))
        p = prepared(prepare_algo, **(prepare_opts or {}))
        return model(p["local_input_ids"], position_ids=p["local_position_ids"])

    rows = {
        "string form after the model was built": string_form_after_build,
        "no patch": lambda: unpatched(lambda m, p: m(p["local_input_ids"], position_ids=p["local_position_ids"])),
        "no patch, called by keywords": lambda: unpatched(
            lambda m, p: m(input_ids=p["local_input_ids"], position_ids=p["local_position_ids"])),
        "no patch, inside CausalLMWithShardedLoss": lambda: unpatched(
            lambda m, p: wrapped(m)(p["local_input_ids"], p["local_position_ids"], p["local_target_ids"])),
        "patched for another algorithm": lambda: patched("ulysses_attn", "zigzag_ring_attn"),
        "patched with another ring_degree": lambda: patched("usp_attn", "usp_attn", {"ring_degree": 1},
                                                            {"ring_degree": 2}),
        "patched alike (the control)": lambda: patched("usp_attn", "usp_attn", {"ring_degree": 2},
                                                       {"ring_degree": 2}),
    }
    out = {}
    for name, row in rows.items():
        try:
            row()
            out[name] = "ok"
        except Exception as e:  # noqa: BLE001 - the parent test names any failure
            out[name] = f"{type(e).__name__}: {e}"
    # the global hook exists only while shards wait for their model
    out["hook removed after the last row"] = "ok" if shards._GUARD.handle is None else "still registered"
    return out


def _labels_rows(rank, world, ids, tgt):
    """``labels=`` / ``shift_labels=`` given to the patched model: its loss against the unpatched model's on the whole
    sequence, and the DDP-averaged gradients against the unpatched ones. Returns each row's worst relative error."""
    base = _model(_configs()["llama"])
    labels = ids.clone()
    labels[0, 5:17] = -100  # an SFT prompt span: uneven valid labels over the ranks
    out = {}
    for algo in ("zigzag_ring_attn", "ulysses_attn"):
        ref = copy.deepcopy(base)
        ref_out = ref(ids, labels=labels)
        ref_out.loss.backward()
        for how in ("labels", "shift_labels"):
            model = copy.deepcopy(base)
            apply_seq_parallel_monkey_patch(algo, model)
            shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
            p = prepare_seq_parallel_inputs(algo, ids, None, shifted, rank, world, "cpu")
            local_labels = shard_sequence(algo, labels, rank, world)
            kwargs = dict(labels=local_labels) if how == "labels" else dict(labels=local_labels,
                                                                            shift_labels=p["local_target_ids"])
            loss = model(p["local_input_ids"], position_ids=p["local_position_ids"], **kwargs).loss
            loss.backward()
            worst = _close(loss, ref_out.loss.detach(), f"{algo} {how} loss")  # the same value on every rank
            for name, param in model.named_parameters():
                grad = param.grad.clone()
                dist.all_reduce(grad)  # what DDP does: average over all ranks
                worst = max(worst, _close(grad / world, dict(ref.named_parameters())[name].grad,
                                          f"{algo} {how} grad {name}"))
            out[f"{algo} {how}"] = worst
    model = copy.deepcopy(base)
    apply_seq_parallel_monkey_patch("zigzag_ring_attn", model)
    p = prepare_seq_parallel_inputs("zigzag_ring_attn", ids, None, None, rank, world, "cpu")
    try:
        model(p["local_input_ids"], position_ids=p["local_position_ids"], labels=p["local_input_ids"],
              num_items_in_batch=torch.tensor(7))
        out["num_items_in_batch"] = "ok"
    except ValueError as e:
        out["num_items_in_batch"] = f"ValueError: {e}"
    return out


def _misuse_worker(rank, world):
    gen = torch.Generator().manual_seed(9)
    ids = torch.randint(0, 128, (2, 32), generator=gen)
    tgt = ids.roll(-1, 1)
    tgt[:, -1] = -100
    return {"wrong attention": _wrong_attention_rows(rank, world, ids, tgt),
            "labels": _labels_rows(rank, world, ids, tgt)}


@pytest.fixture(scope="module")
def misuse_on_2_ranks():
    return run_distributed(_misuse_worker, 2, timeout=240)


WRONG_ATTENTION_EXPECTED = {
    "string form after the model was built": r"llama was patched with the string form.*"
                                             r"apply_seq_parallel_monkey_patch\('zigzag_ring_attn', model\)",
    "no patch": r"its attention is 'sdpa'.*apply_seq_parallel_monkey_patch\('zigzag_ring_attn', model\)",
    "no patch, called by keywords": r"its attention is 'sdpa'",
    "no patch, inside CausalLMWithShardedLoss": r"ValueError: a llama model got the shards.*its attention is 'sdpa'",
    "patched for another algorithm": r"assembles 'ulysses_attn' over 2 ranks: pass the same seq_algo",
    "patched with another ring_degree": r"over 2 ranks, ring_degree=2\), but .* ring_degree=1: pass the same",
    "patched alike (the control)": r"^ok$",
    "hook removed after the last row": r"^ok$",
}


@pytest.mark.parametrize("row", WRONG_ATTENTION_EXPECTED)
def test_shards_reach_only_a_model_that_assembles_them(misuse_on_2_ranks, row):
    import re

    for per_rank in misuse_on_2_ranks:
        got = per_rank["wrong attention"][row]
        assert re.search(WRONG_ATTENTION_EXPECTED[row], got), (row, got)


@pytest.mark.parametrize("row", ["zigzag_ring_attn labels", "zigzag_ring_attn shift_labels", "ulysses_attn labels",
                                 "ulysses_attn shift_labels", "num_items_in_batch"])
def test_labels_give_the_exact_loss_of_the_whole_sequence(misuse_on_2_ranks, row):
    for per_rank in misuse_on_2_ranks:
        got = per_rank["labels"][row]
        if row == "num_items_in_batch":
            assert "num_items_in_batch" in got and "CausalLMWithShardedLoss" in got, got
        else:
            assert got <= RTOL, (row, got)  # _close already asserted inside the worker; the worst error is recorded
