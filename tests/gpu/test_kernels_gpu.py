"""The local kernels on one GPU: every backend and dtype against float64, the dtype refusal, and the cuDNN backward
graph-cache regression (the root cause of usp_attn(ring_degree=1)'s wrong gradients over NCCL)."""
import pytest
import torch
import torch.nn.functional as F
from _gpu import need_gpus
from reference import attention_ref, rel_err

from easy_context.attention.kernels import KERNELS as _KERNELS
from easy_context.attention.kernels import fa4_importable, get_kernel, local_attn_func

pytestmark = need_gpus(1)

S, H, D = 1024, 8, 128


def _qkv(kv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, S, h, D, generator=g).to("cuda", dtype) for h in (H, kv, kv, H)]


def _ref_grads(q, k, v, dout, causal):
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    out = attention_ref(*leaves, causal=causal)
    out.backward(dout.double())
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("backend", ["auto", "fa4", "cudnn", "flash", "efficient", "math"])
def test_backend_dtype_matches_float64_or_is_refused(backend, dtype, record_property):
    if backend == "fa4" and not fa4_importable():
        pytest.skip("flash-attn-4 is not installed (pip install 'easy-context[fa4]')")
    q, k, v, dout = _qkv(2, dtype)
    if backend != "auto" and dtype not in _KERNELS[backend].dtypes:
        with pytest.raises(ValueError, match="takes"):
            local_attn_func(q, k, v, True, backend=backend)
        return
    ref = _ref_grads(q, k, v, dout, True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = local_attn_func(*leaves, True, backend=backend)
    out.backward(dout)
    errs = [rel_err(x, r) for x, r in zip([out.detach()] + [t.grad for t in leaves], ref)]
    sd = [t.clone().requires_grad_() for t in (q, k, v)]
    o = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in sd), is_causal=True, enable_gqa=True)
    o.transpose(1, 2).backward(dout)
    sdpa = [rel_err(x, r) for x, r in zip([o.transpose(1, 2).detach()] + [t.grad for t in sd], ref)]
    record_property("errs", ["%.2e" % e for e in errs])
    record_property("sdpa", ["%.2e" % e for e in sdpa])
    # see test_attention_nccl.py: 2x one SDPA call's error plus a floor
    floor = 1e-5 if dtype == torch.float32 else 1e-4
    assert all(e <= 2 * s + floor for e, s in zip(errs, sdpa)), (errs, sdpa)


def test_cudnn_backward_is_right_whatever_the_grad_output_layout():
    """PyTorch caches cuDNN's backward graph by q/k/v strides only; out/grad_out of another layout used to reuse a
    graph built for the first layout. Alternate the layouts with the same q/k/v: every call must be right."""
    kern = get_kernel("cudnn", torch.device("cuda"), torch.bfloat16)
    q, k, v, dout = _qkv(8, torch.bfloat16, seed=1)
    ref = _ref_grads(q, k, v, dout, True)
    t = lambda x: x.transpose(1, 2)  # noqa: E731  (b, s, h, d) memory seen as (b, h, s, d)
    out, lse = kern.forward(t(q), t(k), t(v), True, D ** -0.5)
    layouts = {"bshd": t(dout), "bhsd": t(dout).contiguous()}
    for name in ("bshd", "bhsd", "bshd", "bhsd"):
        dq, dk, dv = kern.backward(layouts[name], t(q), t(k), t(v), out, lse, True, D ** -0.5)
        errs = [rel_err(t(g), r) for g, r in zip((dq, dk, dv), ref[1:])]
        assert max(errs) < 2e-2, (name, errs)  # bf16: ~3e-3; the stale graph gave ~1.4
