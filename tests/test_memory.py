"""easy_context/memory/ (checkpointing, attn_preserving, tiled_mlp), applied by easy_context/integrations/memory.py:
offloaded checkpointing, attention-preserving checkpointing and tiled MLP on tiny fp32 HF decoders, each against the
plain model with gradient checkpointing off (loss and every parameter gradient), plus a measurable effect per feature;
one 2-rank run composes all three with zigzag_ring_attn.
"""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _dist import run_distributed
from _models import RTOL, SEQ, SMALL, SP_RTOL, _assert_same, _batch, _close, _configs, _model, _run, _saved_bytes  # noqa: F401

from easy_context.integrations.memory import (
    apply_unsloth_offloaded_gradient_checkpoint_monkey_patch,
    enable_attention_preserving_checkpointing,
    enable_offloaded_checkpointing,
    enable_tiled_mlp,
)
from easy_context.integrations.patch import enable_fused_kernels, enable_low_memory_rmsnorm
from easy_context.memory import Checkpointer, PinnedHostPool


def _layers(model):
    return model.model.layers


class _CountingAttention:
    """An attention implementation that counts its calls and delegates to sdpa (registered under a test name)."""

    name = "ec_test_counting"

    def __init__(self):
        self.calls = 0

    def register(self):
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        def counting(*args, **kwargs):
            self.calls += 1
            return sdpa_attention_forward(*args, **kwargs)

        AttentionInterface.register(self.name, counting)
        AttentionMaskInterface.register(self.name, sdpa_mask)
        return self


def test_offloaded_checkpointing_exact_and_offloads_layer_inputs():
    ids, tgt = _batch()
    base = _model()
    reference = _run(copy.deepcopy(base), ids, tgt)
    model = copy.deepcopy(base)
    ckpt = enable_offloaded_checkpointing(model)
    assert all(layer.gradient_checkpointing and layer._gradient_checkpointing_func.checkpointer is ckpt
               for layer in _layers(model))
    _assert_same(_run(model, ids, tgt), reference, "offload")
    # exactly one tensor per layer went through the offload hook: the layer's input hidden state
    n_layers, hidden = SMALL["num_hidden_layers"], SMALL["hidden_size"]
    assert ckpt.offloaded_tensors == n_layers
    assert ckpt.offloaded_bytes == n_layers * ids.numel() * hidden * 4


def test_unsloth_global_patch(monkeypatch):
    import transformers.modeling_utils as modeling_utils

    monkeypatch.setattr(modeling_utils, "checkpoint", modeling_utils.checkpoint)  # restored after the test
    ids, tgt = _batch()
    base = _model()
    reference = _run(copy.deepcopy(base), ids, tgt)
    apply_unsloth_offloaded_gradient_checkpoint_monkey_patch()
    apply_unsloth_offloaded_gradient_checkpoint_monkey_patch()  # idempotent
    ckpt = modeling_utils.checkpoint
    assert isinstance(ckpt, Checkpointer) and ckpt.offload
    model = copy.deepcopy(base)
    model.activation_checkpointing_enable()
    _assert_same(_run(model, ids, tgt), reference, "global offload patch")
    assert ckpt.offloaded_tensors == SMALL["num_hidden_layers"]


def test_attention_preserving_exact_and_skips_attention_in_recompute():
    counter = _CountingAttention().register()
    ids, tgt = _batch()
    base = _model(attn=counter.name)
    n_layers = SMALL["num_hidden_layers"]

    def forward_backward_calls(model):
        counter.calls = 0
        logits = model(ids).logits
        forward_calls = counter.calls
        loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten())
        loss.backward()
        return (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}), forward_calls, \
            counter.calls - forward_calls

    reference, fwd, bwd = forward_backward_calls(copy.deepcopy(base))
    assert (fwd, bwd) == (n_layers, 0)

    plain_ckpt = copy.deepcopy(base)
    plain_ckpt.activation_checkpointing_enable()
    result, fwd, bwd = forward_backward_calls(plain_ckpt)
    _assert_same(result, reference, "plain checkpointing")
    assert (fwd, bwd) == (n_layers, n_layers)  # the recompute runs every layer's attention again

    model = copy.deepcopy(base)
    ckpt = enable_attention_preserving_checkpointing(model)
    assert ckpt.preserve_attention and model.config._attn_implementation == f"{counter.name}_attn_preserving"
    result, fwd, bwd = forward_backward_calls(model)
    _assert_same(result, reference, "attention-preserving checkpointing")
    assert (fwd, bwd) == (n_layers, 0)

    # a second step on the same model, and eval/no_grad (no checkpointing: plain delegation)
    model.zero_grad()
    result, fwd, bwd = forward_backward_calls(model)
    _assert_same(result, reference, "attention-preserving checkpointing, second step")
    with torch.no_grad():
        _close(model.eval()(ids).logits, base.eval()(ids).logits, "eval logits")


def test_attention_preserving_eager_and_double_backward_error():
    ids, tgt = _batch()
    base = _model(attn="eager")
    reference = _run(copy.deepcopy(base), ids, tgt)
    model = copy.deepcopy(base)
    enable_attention_preserving_checkpointing(model)
    assert model.config._attn_implementation == "eager_attn_preserving"
    _assert_same(_run(model, ids, tgt), reference, "attention-preserving (eager)")
    loss = F.cross_entropy(model(ids).logits.flatten(0, 1), tgt.flatten())
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def test_features_on_some_layers_only():
    """Partial offload / preservation (what fits 512K on one GPU): only the chosen layers are affected, still exact."""
    counter = _CountingAttention().register()
    cfg = _configs()["llama"]
    cfg.num_hidden_layers = 3
    ids, tgt = _batch()
    base = _model(cfg, attn=counter.name)
    reference = _run(copy.deepcopy(base), ids, tgt)
    model = copy.deepcopy(base)
    enable_offloaded_checkpointing(model, layers=[0, 2])
    ckpt = enable_attention_preserving_checkpointing(model, layers=1)  # the first layer only
    assert ckpt.offload == frozenset({0, 2}) and ckpt.preserve_attention == frozenset({0})
    counter.calls = 0
    _assert_same(_run(model, ids, tgt), reference, "offload layers 0, 2 + preserve layer 0")
    assert ckpt.offloaded_tensors == 2  # one layer input each for layers 0 and 2
    assert counter.calls == 3 + 2  # 3 forwards; the recompute skips layer 0's attention only
    assert enable_offloaded_checkpointing(model, layers=3).offload is True  # all 3 = every layer
    assert enable_offloaded_checkpointing(model, layers=0).offload == frozenset()
    for bad in (4, [3], -1):
        with pytest.raises(ValueError, match="decoder layers"):
            enable_offloaded_checkpointing(model, layers=bad)


def test_tiled_mlp_exact_and_tiles():
    ids, tgt = _batch()
    base = _model()
    reference = _run(copy.deepcopy(base), ids, tgt)
    n_layers = SMALL["num_hidden_layers"]
    for checkpointing in (False, True):
        model = copy.deepcopy(base)
        assert enable_tiled_mlp(model, tile_size=16) == n_layers
        if checkpointing:
            model.activation_checkpointing_enable()
        rows = []
        hooks = [layer.mlp.act_fn.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[-2]))
                 for layer in _layers(model)]
        _assert_same(_run(model, ids, tgt), reference, f"tiled MLP (checkpointing={checkpointing})")
        for h in hooks:
            h.remove()
        # 40 tokens in tiles of 16: 16, 16, 8; the (seq, intermediate) activation never exists for all 40 tokens.
        # Forward once, backward recompute once, and with checkpointing the layer recompute once more.
        passes = 3 if checkpointing else 2
        assert max(rows) == 16 and rows.count(8) == passes * n_layers and len(rows) == 3 * passes * n_layers
    # num_tiles and the default (tiles of 4 x hidden_size tokens: one tile here, the MLP runs untouched)
    model = copy.deepcopy(base)
    enable_tiled_mlp(model, num_tiles=3)
    _assert_same(_run(model, ids, tgt), reference, "tiled MLP num_tiles=3")
    model = copy.deepcopy(base)
    enable_tiled_mlp(model)
    _assert_same(_run(model, ids, tgt), reference, "tiled MLP default")
    with pytest.raises(ValueError, match="not both"):
        enable_tiled_mlp(model, tile_size=4, num_tiles=2)


def test_pinned_host_pool_reuses_exact_size_buffers():
    pool = PinnedHostPool(page_lock=False)
    a, b = pool.take((2, 3), torch.bfloat16), pool.take((6,), torch.bfloat16)
    assert a.data_ptr() != b.data_ptr() and pool.held_bytes == 24  # exact sizes, no power-of-two rounding
    ptr = a.data_ptr()
    pool.give_back(a)
    c = pool.take((3, 2), torch.bfloat16)  # same element count and dtype: the freed buffer comes back
    assert c.data_ptr() == ptr and c.shape == (3, 2) and pool.held_bytes == 24
    pool.take((2, 3), torch.float32)  # another dtype: a new buffer
    assert pool.held_bytes == 24 + 24
    # a new size (another sequence length) drops the free buffers of other sizes instead of piling them up
    pool.give_back(b)
    pool.take((5,), torch.bfloat16)
    assert pool.held_bytes == 24 + 24 - 12 + 10


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked offload needs CUDA (bench/gpu_acceptance.sh)")
def test_offload_to_page_locked_memory_cuda():
    ids, tgt = (t.cuda() for t in _batch())
    base = _model().cuda()
    reference = _run(copy.deepcopy(base), ids, tgt)
    model = copy.deepcopy(base)
    ckpt = enable_offloaded_checkpointing(model)
    for step in range(2):  # the second step reuses the first one's buffers
        model.zero_grad(set_to_none=True)
        _assert_same(_run(model, ids, tgt), reference, f"page-locked offload, step {step}")
        assert ckpt.host_buffers.held_bytes == SMALL["num_hidden_layers"] * ids.numel() * SMALL["hidden_size"] * 4


def test_low_memory_rmsnorm_exact_and_saves_less():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    # one norm in bf16, the dtype it is for: forward bitwise equal; saves x (bf16, usually kept anyway) + one float32
    # per row instead of x.float() and the normalised x in bf16: 2 bytes/element + 4/row vs 4 + 2 bytes/element
    torch.manual_seed(0)
    norm = LlamaRMSNorm(256, eps=1e-6).to(torch.bfloat16)
    norm.weight.data.normal_(1.0, 0.1)
    x = torch.randn(2, 300, 256, dtype=torch.bfloat16, requires_grad=True)
    plain_out, plain_bytes = _saved_bytes(norm, x)
    assert enable_low_memory_rmsnorm(norm) == 1
    ours_out, ours_bytes = _saved_bytes(norm, x)
    assert torch.equal(ours_out, plain_out)
    assert ours_bytes <= x.numel() * 2 + 600 * 4 + 256 * 2 < plain_bytes / 2.9
    # bf16 gradients against float64 of the same formula: the analytic float32 backward is at least as close as
    # the plain graph's (which rounds weight * dy to bf16 first); 1e-2 = a few bf16 ulps on O(1) values
    dy = torch.randn_like(plain_out)
    x64, w64 = x.detach().double().requires_grad_(), norm.weight.detach().double().requires_grad_()
    ref = w64 * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6))
    ref.backward(dy.double())
    dx, dw = torch.autograd.grad(ours_out, (x, norm.weight), dy)
    _close(dx.double(), x64.grad, "rmsnorm dx", rtol=1e-2)
    _close(dw.double(), w64.grad, "rmsnorm dweight", rtol=1e-2)

    # variants that compute something else are left alone; a model without a plain RMSNorm is an error
    class GemmaLikeRMSNorm(LlamaRMSNorm):
        def forward(self, h):
            return super().forward(h) * (1 + self.weight) / self.weight

    with pytest.raises(ValueError, match="no plain RMSNorm"):
        enable_low_memory_rmsnorm(GemmaLikeRMSNorm(8))


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_low_memory_rmsnorm_in_models(model_type):
    ids, tgt = _batch()
    base = _model(_configs()[model_type])
    reference = _run(copy.deepcopy(base), ids, tgt)
    model = copy.deepcopy(base)
    n_norms = 2 * SMALL["num_hidden_layers"] + 1 + (2 * SMALL["num_hidden_layers"] if model_type == "qwen3" else 0)
    assert enable_low_memory_rmsnorm(model) == n_norms  # qwen3 adds per-head q_norm / k_norm
    model.activation_checkpointing_enable()
    _assert_same(_run(model, ids, tgt), reference, f"{model_type} low-memory RMSNorm")


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_all_features_together(model_type):
    ids, tgt = _batch()
    base = _model(_configs()[model_type])
    reference = _run(copy.deepcopy(base), ids, tgt)
    model = copy.deepcopy(base)
    enable_tiled_mlp(model, tile_size=12)
    enable_low_memory_rmsnorm(model)
    enable_offloaded_checkpointing(model)
    ckpt = enable_attention_preserving_checkpointing(model)
    assert ckpt.offload and ckpt.preserve_attention  # the second call keeps the first one's feature
    _assert_same(_run(model, ids, tgt), reference, f"{model_type} offload + preserving + tiled MLP")
    assert ckpt.offloaded_tensors == SMALL["num_hidden_layers"]


def _zigzag_worker(rank, world):
    from easy_context.api import apply_seq_parallel_monkey_patch, prepare_seq_parallel_inputs
    from easy_context.loss import sharded_cross_entropy

    ids, tgt = _batch(seq=48)
    base = _model()
    reference = _run(copy.deepcopy(base), ids, tgt)
    counts = {}
    for features in ("none", "all"):
        model = copy.deepcopy(base)
        name = apply_seq_parallel_monkey_patch("zigzag_ring_attn", model)
        if features == "all":
            enable_tiled_mlp(model, tile_size=8)
            enable_fused_kernels(model)
            enable_offloaded_checkpointing(model)
            enable_attention_preserving_checkpointing(model)
            assert model.config._attn_implementation == f"{name}_attn_preserving"
        else:
            model.activation_checkpointing_enable()
        p = prepare_seq_parallel_inputs("zigzag_ring_attn", ids, None, tgt, rank, world, "cpu")
        calls = []
        from easy_context.attention import ring  # the engine whose ring_forward the zigzag ring's Function calls
        original = ring.ring_forward

        def counting_ring_forward(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        ring.ring_forward = counting_ring_forward
        try:
            hidden = model.model(p["local_input_ids"], position_ids=p["local_position_ids"]).last_hidden_state
            out = sharded_cross_entropy(hidden, model.lm_head.weight, p["local_target_ids"], chunk_size=40)
            forward_calls = len(calls)
            out.loss.backward()
        finally:
            ring.ring_forward = original
        counts[features] = (forward_calls, len(calls) - forward_calls)
        _close(out.global_loss, reference[0], f"zigzag {features} loss", SP_RTOL)
        for n, param in model.named_parameters():
            grad = param.grad.clone()
            dist.all_reduce(grad)
            _close(grad / world, reference[1][n], f"zigzag {features} grad {n}", SP_RTOL)
    return counts


def test_all_features_with_zigzag_ring_attn():
    n_layers = SMALL["num_hidden_layers"]
    for counts in run_distributed(_zigzag_worker, 2, timeout=180):
        assert counts["none"] == (n_layers, n_layers)  # plain checkpointing re-runs the ring forward
        assert counts["all"] == (n_layers, 0)


def _all_to_all_worker(rank, world, algo):
    """Every feature with Ulysses / USP: exact, and the kept attention graph holds one output per layer (the
    lean all-to-all path saves the sequence-sharded q/k/v, which the recompute provides, not head-sharded copies)."""
    from easy_context.api import apply_seq_parallel_monkey_patch, prepare_seq_parallel_inputs
    from easy_context.loss import sharded_cross_entropy
    from easy_context.memory import attn_preserving as memory

    kept = {}
    light = memory._light_hooks

    def counting_light_hooks(entry):
        hooks = light(entry)

        def pack(t):
            packed = hooks.pack_hook(t)
            if not isinstance(packed, memory._Slot):
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return packed

        return torch.autograd.graph.saved_tensors_hooks(pack, hooks.unpack_hook)

    memory._light_hooks = counting_light_hooks
    ids, tgt = _batch(seq=48)
    base = _model()
    reference = _run(copy.deepcopy(base), ids, tgt)
    model = copy.deepcopy(base)
    apply_seq_parallel_monkey_patch(algo, model)
    enable_tiled_mlp(model, tile_size=8)
    enable_low_memory_rmsnorm(model)
    enable_offloaded_checkpointing(model)
    enable_attention_preserving_checkpointing(model)
    p = prepare_seq_parallel_inputs(algo, ids, None, tgt, rank, world, "cpu")
    hidden = model.model(p["local_input_ids"], position_ids=p["local_position_ids"]).last_hidden_state
    unit = hidden.numel() * hidden.element_size()  # one layer input (batch x local seq x hidden)
    out = sharded_cross_entropy(hidden, model.lm_head.weight, p["local_target_ids"], chunk_size=40)
    out.loss.backward()
    _close(out.global_loss, reference[0], f"{algo} loss", SP_RTOL)
    for n, param in model.named_parameters():
        grad = param.grad.clone()
        dist.all_reduce(grad)
        _close(grad / world, reference[1][n], f"{algo} grad {n}", SP_RTOL)
    return sum(kept.values()) / unit


@pytest.mark.parametrize("algo,world", [("ulysses_attn", 2), ("usp_attn", 4)])
def test_all_features_with_all_to_all_algorithms(algo, world):
    n_layers = SMALL["num_hidden_layers"]
    for units in run_distributed(_all_to_all_worker, world, algo, timeout=180):
        # the saved output (1 unit) + float32 lse (heads/hidden = 1/16 unit here) per layer; the head-sharded
        # q/k/v/out copies would add 4 units per layer
        assert units <= n_layers * 1.2, units


def test_attention_preserving_keeps_no_qkv_storage(monkeypatch):
    """The kept attention graph must not pin this forward's q/k/v: after the forward, the leaves of every kept
    graph point at empty storage (the recompute re-provides q/k/v), and the gradients stay exact."""
    from easy_context.memory import attn_preserving as memory

    entries = []
    orig = memory._PreservedAttention.forward

    def spy(ctx, entry, call, query, key, value):
        out = orig(ctx, entry, call, query, key, value)
        entries.append(entry)
        return out

    monkeypatch.setattr(memory._PreservedAttention, "forward", staticmethod(spy))
    ids, tgt = _batch()
    reference = _run(_model(), ids, tgt)
    model = _model()
    enable_attention_preserving_checkpointing(model)
    model.train()
    loss = F.cross_entropy(model(ids).logits.flatten(0, 1), tgt.flatten())
    assert len(entries) == len(_layers(model))
    for e in entries:
        assert all(t.untyped_storage().nbytes() == 0 for t in e.inputs)
    loss.backward()
    result = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    _assert_same(result, reference, "preserving without q/k/v storage")


def test_old_memory_paths_are_the_moved_functions():
    """The model-level functions moved to easy_context.integrations; the seed-era paths still name them."""
    import easy_context
    from easy_context import memory
    from easy_context.integrations import memory as hf_memory
    from easy_context.integrations import patch

    for name in ("enable_offloaded_checkpointing", "apply_unsloth_offloaded_gradient_checkpoint_monkey_patch",
                 "enable_attention_preserving_checkpointing", "make_preserving_attention", "preserving_name",
                 "enable_tiled_mlp"):
        assert getattr(memory, name) is getattr(hf_memory, name) is getattr(easy_context, name)
    for name in ("enable_low_memory_rmsnorm", "enable_fused_kernels", "enable_fused_swiglu", "enable_fused_rope"):
        assert getattr(memory, name) is getattr(patch, name) is getattr(easy_context, name)
    with pytest.raises(AttributeError):
        memory.no_such_feature  # noqa: B018
