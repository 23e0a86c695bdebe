"""Local kernels (math backend on CPU) against the float64 definition, including the ring property:
backward of each key block with the *merged* out/lse sums to the full backward."""
import pytest
import torch
from reference import attention_ref, rel_err

from easy_context.attention.backends import math_backward as _math_backward
from easy_context.attention.backends import math_forward as _math_forward
from easy_context.attention.kernels import Kernel, get_kernel, local_attn_func, resolve_backend, split_causal
from easy_context.attention.merge import merge_into, new_accumulators

# fp32 kernels vs float64 reference: rounding of O(seq) fp32 sums gives ~1e-7 relative error; 1e-5 leaves
# two orders of margin while still catching any masking/scaling bug (those give errors >1e-2).
TOL = 1e-5


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("h,hkv,d", [(4, 4, 16), (4, 2, 24), (6, 1, 8)])
def test_local_attn_matches_reference(causal, h, hkv, d):
    torch.manual_seed(0)
    q = torch.randn(2, 37, h, d, requires_grad=True)
    k = torch.randn(2, 37, hkv, d, requires_grad=True)
    v = torch.randn(2, 37, hkv, d, requires_grad=True)
    dout = torch.randn(2, 37, h, d)
    out = local_attn_func(q, k, v, causal, 0.3, backend="math")
    out.backward(dout)
    qr, kr, vr = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = attention_ref(qr, kr, vr, causal, 0.3)
    ref.backward(dout.double())
    assert rel_err(out, ref) < TOL
    for a, b in ((q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        assert rel_err(a, b) < TOL


def test_backward_with_merged_out_lse_is_exact():
    """Split the keys into two blocks, merge forward, call backward per block with the final out/lse."""
    torch.manual_seed(1)
    kern = get_kernel("math", torch.device("cpu"))
    b, h, s, d = 1, 4, 24, 16
    q, k, v = (torch.randn(b, h, s, d) for _ in range(3))
    dout = torch.randn(b, h, s, d)
    out, lse = new_accumulators(q)
    halves = [slice(0, 10), slice(10, s)]
    for sl in halves:
        o, l = kern.forward(q, k[:, :, sl], v[:, :, sl], False, 0.25)
        merge_into(out, lse, o, l)
    qr, kr, vr = (x.double().transpose(1, 2).requires_grad_() for x in (q, k, v))
    ref = attention_ref(qr, kr, vr, False, 0.25)
    ref.backward(dout.double().transpose(1, 2))
    assert rel_err(out.transpose(1, 2), ref) < TOL
    dq = torch.zeros_like(q)
    dks, dvs = [], []
    for sl in halves:
        g = kern.backward(dout, q, k[:, :, sl], v[:, :, sl], out.float(), lse, False, 0.25)
        dq += g[0]
        dks.append(g[1])
        dvs.append(g[2])
    assert rel_err(dq.transpose(1, 2), qr.grad) < TOL
    assert rel_err(torch.cat(dks, 2).transpose(1, 2), kr.grad) < TOL
    assert rel_err(torch.cat(dvs, 2).transpose(1, 2), vr.grad) < TOL


@pytest.mark.parametrize("seq", [36, 37])  # even: split; odd: left whole
def test_split_causal_forward_matches_reference(monkeypatch, seq):
    """Long causal forwards as three calls (top causal, bottom-left full, bottom-right causal) merged in fp32,
    then one backward with the merged out/lse: the same attention and gradients (same TOL: fp32 rounding)."""
    calls = []
    counting = Kernel("math", lambda *a: calls.append(a[3]) or _math_forward(*a), _math_backward)
    split = split_causal(counting, 16)
    torch.manual_seed(2)
    q, dout = torch.randn(2, 4, seq, 16), torch.randn(2, 4, seq, 16)
    k, v = torch.randn(2, 2, seq, 16), torch.randn(2, 2, seq, 16)
    out, lse = split.forward(q, k, v, True, 0.3)
    assert calls == ([True, False, True] if seq % 2 == 0 else [True])  # what ran: 3 calls, or one
    dq, dk, dv = split.backward(dout, q, k, v, out, lse, True, 0.3)
    qr, kr, vr = (x.double().transpose(1, 2).requires_grad_() for x in (q, k, v))
    ref = attention_ref(qr, kr, vr, True, 0.3)
    ref.backward(dout.double().transpose(1, 2))
    assert rel_err(out.transpose(1, 2), ref) < TOL
    for a, b in ((dq, qr.grad), (dk, kr.grad), (dv, vr.grad)):
        assert rel_err(a.transpose(1, 2), b) < TOL
    # the environment switch reaches every algorithm through get_kernel
    monkeypatch.setenv("EASY_CONTEXT_SPLIT_CAUSAL", "16")
    assert get_kernel("math", torch.device("cpu")).forward is not _math_forward
    monkeypatch.setenv("EASY_CONTEXT_SPLIT_CAUSAL", "0")
    assert get_kernel("math", torch.device("cpu")).forward is _math_forward
    monkeypatch.setenv("EASY_CONTEXT_SPLIT_CAUSAL", "many")
    with pytest.raises(ValueError, match="token count"):
        get_kernel("math", torch.device("cpu"))


def test_backend_selection_and_errors(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_backend(None, cpu) == "math"
    monkeypatch.setenv("EASY_CONTEXT_ATTN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend(None, cpu)
    monkeypatch.delenv("EASY_CONTEXT_ATTN_BACKEND")
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_backend("cudnn", cpu)


def test_flash_attn_backend_missing_names_the_install():
    try:
        import flash_attn  # noqa: F401
        pytest.skip("flash-attn is installed")
    except ImportError:
        pass
    from easy_context.attention.backends import flash_attn_module as _flash_attn_module
    with pytest.raises(ImportError, match=r"easy-context\[flash\]"):
        _flash_attn_module()


def test_bad_shapes_name_the_problem():
    q = torch.randn(1, 8, 3, 16)
    k = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        local_attn_func(q, k, k)


def test_a_backend_is_chosen_by_dtype_and_refuses_dtypes_it_does_not_take():
    """cuDNN returned NaN for float32 on the H200 instead of refusing it: a named backend that does not take the
    dtype is an error naming the fix; 'auto' routes float32 to 'efficient' and float64 to 'math' on CUDA."""
    cuda = torch.device("cuda")  # only the device type is read on these paths: no GPU needed
    for backend in ("cudnn", "flash", "flash_attn"):
        refusal = "takes float16, bfloat16 inputs, got torch.float32.*--mixed-precision bf16"
        with pytest.raises(ValueError, match=refusal):
            resolve_backend(backend, cuda, torch.float32)
    assert resolve_backend("efficient", cuda, torch.float32) == "efficient"
    assert resolve_backend(None, cuda, torch.float32) == "efficient"
    assert resolve_backend(None, cuda, torch.float64) == "math"
    with pytest.raises(ValueError, match="efficient"):
        resolve_backend("efficient", cuda, torch.float64)
    assert resolve_backend("math", torch.device("cpu"), torch.float64) == "math"


def test_cudnn_backward_inputs_get_the_layout_that_q_implies():
    """PyTorch caches cuDNN's backward graph by q/k/v strides only, so out/grad_out must be laid out as a function
    of q: the same layout whatever the caller passed (values unchanged), a zero-copy restride where only size-one
    dimensions differ. (The GPU test checks the gradients themselves.)"""
    from easy_context.attention.backends import in_layout_of as _in_layout_of

    q = torch.randn(2, 16, 8, 32).transpose(1, 2)  # (b, h, s, d) view of (b, s, h, d) memory
    for x in (torch.randn(2, 8, 16, 32), torch.randn(2, 16, 8, 32).transpose(1, 2)):
        y = _in_layout_of(x, q)
        assert y.stride() == q.stride() and torch.equal(y, x)
    rows = q[:, :, 4:12]  # a ring block's query rows: not dense; the layout empty_like gives, in q's dim order
    y = _in_layout_of(torch.randn(2, 8, 8, 32), rows)
    assert y.stride() == torch.empty_like(rows).stride()
    one = torch.randn(1, 16, 8, 32).transpose(1, 2)
    odd = one.as_strided(one.shape, (7, *one.stride()[1:]))  # batch of one: its stride is arbitrary
    y = _in_layout_of(one, odd)
    assert y.stride() == odd.stride() and y.data_ptr() == one.data_ptr()


def test_fa4_is_chosen_where_it_runs_and_refused_elsewhere_with_the_fix(monkeypatch):
    """auto takes FlashAttention-4 for 16-bit inputs on sm90 / sm100 when it imports and takes the head dim, cuDNN (or
    flash on older GPUs) otherwise; naming fa4 where it cannot run is an error naming the fix. No GPU is needed: the
    device capability and the import are stood in for (the GPU tests run the kernel itself)."""
    import easy_context.attention.kernels as K

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    arch = {"major": 9}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (arch["major"], 0))
    monkeypatch.delenv("EASY_CONTEXT_ATTN_BACKEND", raising=False)
    importable = {"yes": True}
    monkeypatch.setattr(K, "fa4_importable", lambda: importable["yes"])
    monkeypatch.setattr(K.B, "fa4_interface", lambda: None)
    # (arch, importable, dtype, head dim) -> what auto gives
    for major, imports, dtype, head_dim, want in [
            (9, True, torch.bfloat16, 128, "fa4"), (10, True, torch.float16, 64, "fa4"),
            (9, True, torch.bfloat16, 256, "fa4"), (10, True, torch.bfloat16, 192, "cudnn"),
            (9, True, torch.bfloat16, 100, "cudnn"),  # not a multiple of 8
            (9, False, torch.bfloat16, 128, "cudnn"), (8, True, torch.bfloat16, 128, "flash"),
            (12, True, torch.bfloat16, 128, "cudnn"),
            (9, True, torch.float32, 128, "efficient"), (9, True, torch.float64, 128, "math")]:
        arch["major"], importable["yes"] = major, imports
        assert resolve_backend(None, cuda, dtype, head_dim) == want, (major, imports, dtype, head_dim)
    arch["major"], importable["yes"] = 9, True
    assert resolve_backend("fa4", cuda, torch.bfloat16, 128) == "fa4"
    assert get_kernel(None, cuda, torch.bfloat16, 128).varlen.below == float("inf")  # packed: one varlen call
    # named where it cannot run: (device, arch, dtype, head dim) -> the error's words
    for device, major, dtype, head_dim, match in [
            (cpu, 9, torch.bfloat16, 128, "needs CUDA.*'math'"),
            (cuda, 9, torch.float32, 128, "takes float16, bfloat16 inputs, got torch.float32.*'efficient'"),
            (cuda, 8, torch.bfloat16, 128, "sm90 / sm100.*sm8x.*'flash'"),
            (cuda, 10, torch.bfloat16, 192, "head dim 192.*'cudnn'")]:
        arch["major"] = major
        with pytest.raises(ValueError, match=match):
            resolve_backend("fa4", device, dtype, head_dim)
    arch["major"], importable["yes"] = 9, False
    monkeypatch.undo()  # the real import: flash-attn-4 is not installed on CPU machines
    try:
        import flash_attn.cute  # noqa: F401
        pytest.skip("flash-attn-4 is installed")
    except ImportError:
        pass
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with pytest.raises(ImportError, match=r"pip install 'easy-context\[fa4\]'.*backend='cudnn'"):
        resolve_backend("fa4", cuda, torch.bfloat16, 128)


def test_the_startup_line_names_the_kernel_that_runs(monkeypatch):
    from easy_context.attention.kernels import describe_kernel

    monkeypatch.delenv("EASY_CONTEXT_ATTN_BACKEND", raising=False)
    assert describe_kernel(None, torch.device("cpu"), torch.float32) == \
        "attention kernel: math (chosen by auto for float32 on cpu)"
    monkeypatch.setenv("EASY_CONTEXT_ATTN_BACKEND", "math")
    assert describe_kernel(None, torch.device("cpu"), torch.float32).startswith("attention kernel: math (named")
