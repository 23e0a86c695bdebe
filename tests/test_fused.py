"""easy_context/memory/ops + integrations/patch.py: the SwiGLU and rotary Functions against float64 autograd of the
plain formulas (the RMSNorm Function is tested in test_memory.py), and enable_fused_kernels on tiny HF decoders
against the plain model (loss and every parameter gradient), alone and with tiled MLP / attention preservation. On
CPU the bodies run eagerly; the compiled CUDA kernels are checked by bench/fused_check.py.
"""
import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from _models import SMALL, _assert_same, _batch, _close, _configs, _model, _run, _saved_bytes

import easy_context.memory.ops.swiglu as swiglu
from easy_context import utils
from easy_context.integrations import patch
from easy_context.integrations.memory import enable_attention_preserving_checkpointing, enable_tiled_mlp
from easy_context.integrations.patch import enable_fused_kernels
from easy_context.memory import silu_mul
from easy_context.memory.ops import rope_eager

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# float64 runs of the same math in another order (analytic backward vs autograd): ~1e-15 relative; 1e-12 is far
# below any real error (a wrong sign or a missing term is O(1)).
F64_RTOL = 1e-12
# bf16 outputs: a few bf16 ulps (2^-8 = 4e-3 relative) of O(1) values
BF16_RTOL = 1e-2


@pytest.fixture
def restore_rope(monkeypatch):
    """enable_fused_rope replaces apply_rotary_pos_emb in modeling modules process-wide: undo it after each test."""
    for family in FAMILIES:
        modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        monkeypatch.setattr(modeling, "apply_rotary_pos_emb", modeling.apply_rotary_pos_emb)


def _grads(fn, inputs, dout):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(dout)
    return out.detach(), [t.grad for t in leaves]


def test_silu_mul_exact_and_saves_two_tensors():
    g = torch.Generator().manual_seed(0)
    gate, up, dout = (torch.randn(2, 50, 96, generator=g, dtype=torch.float64) * 3 for _ in range(3))
    ref_out, ref_grads = _grads(lambda a, b: F.silu(a) * b, (gate, up), dout)
    out, grads = _grads(silu_mul, (gate, up), dout)
    _close(out, ref_out, "silu_mul out", F64_RTOL)
    for ours, ref, what in zip(grads, ref_grads, ("dgate", "dup")):
        _close(ours, ref, f"silu_mul {what}", F64_RTOL)
    # bf16: forward bitwise the plain code's (eager); gradients in float32 rounded once, within bf16 ulps of float64
    b16 = [t.to(torch.bfloat16) for t in (gate, up, dout)]
    out16, grads16 = _grads(silu_mul, b16[:2], b16[2])
    assert torch.equal(out16, F.silu(b16[0]) * b16[1])
    ref16_out, ref16_grads = _grads(lambda a, b: F.silu(a) * b, [t.double() for t in b16[:2]], b16[2].double())
    for ours, ref, what in zip(grads16, ref16_grads, ("dgate", "dup")):
        _close(ours.double(), ref, f"bf16 silu_mul {what}", BF16_RTOL)
    # saved for backward: gate and up; the plain graph also keeps silu(gate)
    leaves = [t.clone().requires_grad_() for t in b16[:2]]
    _, ours_bytes = _saved_bytes(silu_mul, *leaves)
    _, plain_bytes = _saved_bytes(lambda a, b: F.silu(a) * b, *leaves)
    assert ours_bytes == 2 * gate.numel() * 2 and plain_bytes == 3 * gate.numel() * 2


def test_rope_exact_with_gqa_and_transposed_layout():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(0)
    # q as transformers makes it: a (batch, heads, seq, head_dim) view of (batch, seq, heads, head_dim) memory
    q = torch.randn(2, 30, 4, 16, generator=g, dtype=torch.float64).transpose(1, 2)
    k = torch.randn(2, 2, 30, 16, generator=g, dtype=torch.float64)  # GQA: fewer kv heads
    angles = torch.randn(2, 30, 16, generator=g, dtype=torch.float64)
    cos, sin = angles.cos(), angles.sin()
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    fused_rope = patch._make_fused_rope(apply_rotary_pos_emb)

    def run(fn, q, k):
        q, k = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
        q_out, k_out = fn(q, k, cos.to(q.dtype), sin.to(q.dtype))
        torch.autograd.backward((q_out, k_out), (dq.to(q.dtype), dk.to(q.dtype)))
        return q_out.detach(), k_out.detach(), q.grad, k.grad

    for ours, ref, what in zip(run(fused_rope, q, k), run(apply_rotary_pos_emb, q, k), ("q", "k", "dq", "dk")):
        _close(ours, ref, f"rope {what}", F64_RTOL)
    ours16, ref16 = run(fused_rope, q.bfloat16(), k.bfloat16()), run(apply_rotary_pos_emb, q.bfloat16(), k.bfloat16())
    assert torch.equal(ours16[0], ref16[0]) and torch.equal(ours16[1], ref16[1])  # forward: the same op sequence
    # the same memory layouts as the eager code: q stays a view of (batch, seq, heads, head_dim) memory, so the
    # projection's backward needs no copy of dq
    assert [t.stride() for t in ours16] == [t.stride() for t in ref16]
    for ours, ref, what in zip(ours16[2:], run(apply_rotary_pos_emb, q, k)[2:], ("dq", "dk")):
        _close(ours.double(), ref, f"bf16 rope {what}", BF16_RTOL)
    # anything else (an extra argument, trainable cos) goes to the original function
    assert patch._is_standard_rope(apply_rotary_pos_emb) and not patch._is_standard_rope(lambda q, k, c, s: (q, k))
    with pytest.raises(TypeError):
        fused_rope(q, k, cos, sin, "unexpected")


def _fused_ops_in_graph(model, ids):
    """Names of the fused Functions on the autograd graph of the model's logits."""
    seen, stack, names = set(), [model(ids).logits.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return {n for n in names if n in ("_LowMemoryRMSNormBackward", "_SiluMulBackward", "_RopeBackward")}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_fused_kernels_in_models(model_type, restore_rope):
    ids, tgt = _batch()
    base = _model(_configs()[model_type])
    reference = _run(copy.deepcopy(base), ids, tgt)
    model = copy.deepcopy(base)
    layers = SMALL["num_hidden_layers"]
    n_norms = 2 * layers + 1 + (2 * layers if model_type == "qwen3" else 0)  # qwen3: per-head q_norm / k_norm
    assert enable_fused_kernels(model) == {"rmsnorm": n_norms, "swiglu": layers, "rope": 1}
    assert enable_fused_kernels(model) == {"rmsnorm": n_norms, "swiglu": layers, "rope": 1}  # idempotent
    assert _fused_ops_in_graph(model, ids) == {"_LowMemoryRMSNormBackward", "_SiluMulBackward", "_RopeBackward"}
    model.zero_grad(set_to_none=True)
    # fp32: forward bitwise the plain code's on CPU, gradients re-associated (~1e-7): the RTOL of _models
    _assert_same(_run(model, ids, tgt), reference, f"{model_type} fused kernels")


@pytest.mark.parametrize("tiled_first", [True, False])
def test_fused_kernels_compose(tiled_first, restore_rope, monkeypatch):
    ids, tgt = _batch()
    base = _model()
    reference = _run(copy.deepcopy(base), ids, tgt)
    model = copy.deepcopy(base)
    if tiled_first:
        enable_tiled_mlp(model, tile_size=12)
        enable_fused_kernels(model)
    else:
        enable_fused_kernels(model)
        enable_tiled_mlp(model, tile_size=12)
    enable_attention_preserving_checkpointing(model)
    calls = []
    original = swiglu.silu_mul_eager
    monkeypatch.setattr(swiglu, "silu_mul_eager", lambda g, u: calls.append(g.shape[-2]) or original(g, u))
    _assert_same(_run(model, ids, tgt), reference, f"fused + tiled (tiled first: {tiled_first}) + preserving")
    # the tiles call the fused op: forward and checkpoint recompute (no grad) and the tiles' recompute in backward
    assert calls == [12, 12, 12, 4] * 3 * SMALL["num_hidden_layers"]


def test_fused_kernels_leave_other_modules_alone(restore_rope):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    gelu = LlamaForCausalLM(LlamaConfig(**dict(SMALL, hidden_act="gelu")))
    assert enable_fused_kernels(gelu) == {"rmsnorm": 5, "swiglu": 0, "rope": 1}  # a GeLU MLP is not SwiGLU
    with pytest.raises(ValueError, match="fused kernels do not apply"):
        enable_fused_kernels(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)))


def test_on_device_is_eager_on_cpu(monkeypatch):
    assert utils.compiled(rope_eager, torch.device("cpu")) is rope_eager
    monkeypatch.setenv(utils.ENV_COMPILE, "0")
    assert utils.compiled(rope_eager, torch.device("cuda")) is rope_eager
