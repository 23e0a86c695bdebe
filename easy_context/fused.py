"""Fused pointwise kernels of a decoder layer: RMSNorm, SwiGLU and the rotary embedding.

Between its matmuls and its attention a Llama layer runs many small elementwise kernels: the RMSNorm's float32
round trips, ``rotate_half``'s slice/neg/cat, SiLU and the gate-up product. Each reads and writes whole
``(seq, hidden)`` or ``(seq, intermediate)`` tensors, in the forward, the checkpoint recompute and the backward:
at 128K tokens on one H200 they took 13% of an easy_context training step (bench/RESULTS.md, section 5).

Each op here is an autograd Function whose forward and backward bodies are plain torch math (the backward is
the analytic gradient in float32). On CPU the bodies run eagerly; the tests compare them with float64 references.
On CUDA each body becomes one ``torch.compile``'d kernel (``EASY_CONTEXT_COMPILE=0``: eager everywhere).
What each Function saves for backward is chosen here, not by a compiler:

* RMSNorm: ``x`` and one float32 ``rstd`` per row (the plain code keeps float32 copies of the activations);
* SwiGLU ``silu(gate) * up``: ``gate`` and ``up`` (the plain code also keeps ``silu(gate)``);
* RoPE: ``cos`` and ``sin`` only.

:func:`enable_fused_kernels` switches a model over. Every candidate module (or rotary function) is first checked
numerically against the eager body and left alone if it computes something else, e.g. Gemma's ``1 + weight``
norm or a partial rotary embedding.
"""
from __future__ import annotations

import os
import sys
from types import MethodType

import torch
import torch.nn.functional as F

ENV_COMPILE = "EASY_CONTEXT_COMPILE"
_COMPILED: dict = {}


def on_device(fn, device: torch.device, env: str = ENV_COMPILE):
    """``fn`` itself on CPU (or when the environment variable ``env`` is "0"); on CUDA one cached
    ``torch.compile(fn, dynamic=True)``: every sequence length shares one compiled kernel, so a warm-up step at a
    short length leaves nothing to compile in the long step."""
    if device.type != "cuda" or os.environ.get(env, "1") == "0":
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


# ---------------------------------------------------------------- RMSNorm
# Eager rows per chunk: the float32 temporaries of one chunk stay near 256 MiB whatever the sequence length.
# A compiled kernel keeps no temporaries, so it takes all rows at once.
_NORM_CHUNK_ELEMENTS = 1 << 26


def _rms_norm_rows(x, weight, eps: float):
    """(rows, hidden) -> the plain code's ``weight * (x.float() * rstd).to(x.dtype)`` and the float32 rstd."""
    xf = x.to(torch.float32)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (xf * rstd).to(x.dtype), rstd


def _rms_norm_rows_backward(x, weight, rstd, dout):
    """Analytic gradient in float32: dx, and this chunk's float32 dweight."""
    xhat = x.to(torch.float32) * rstd
    g = dout.to(torch.float32) * weight.to(torch.float32)
    dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    # the plain code multiplies the weight by the normalised x rounded to x's dtype
    dw = (dout.to(torch.float32) * xhat.to(x.dtype).to(torch.float32)).sum(0)
    return dx.to(x.dtype), dw


def _row_chunks(fn, eager, rows: int, hidden: int):
    step = rows if fn is not eager else max(1, _NORM_CHUNK_ELEMENTS // hidden)
    return [(i, min(rows, i + step)) for i in range(0, rows, step)]


class _LowMemoryRMSNorm(torch.autograd.Function):
    """``weight * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype)``, saving only ``x`` and the float32
    ``rstd`` per row (the autograd graph of the plain code keeps ``x.float()`` and the normalised ``x`` in x's
    dtype: 6 bytes per element for bf16, vs 2 here, 0 when ``x`` is kept anyway). Eager: the plain code's op
    sequence (bitwise equal), in row chunks; CUDA: one compiled kernel per pass."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        rows = x.reshape(-1, x.shape[-1])  # (batch * seq, hidden)
        fn = on_device(_rms_norm_rows, x.device)
        chunks = _row_chunks(fn, _rms_norm_rows, *rows.shape)
        if len(chunks) == 1:
            out, rstd = fn(rows, weight, eps)
        else:
            out = torch.empty(rows.shape, dtype=torch.result_type(weight, rows[:1]), device=x.device)
            rstd = torch.empty(rows.shape[0], 1, dtype=torch.float32, device=x.device)
            for a, b in chunks:
                out[a:b], rstd[a:b] = fn(rows[a:b], weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out.view(*x.shape[:-1], x.shape[-1])

    @staticmethod
    def backward(ctx, dout):
        x, weight, rstd = ctx.saved_tensors
        rows, grows = x.reshape(-1, x.shape[-1]), dout.reshape(-1, x.shape[-1])
        fn = on_device(_rms_norm_rows_backward, x.device)
        chunks = _row_chunks(fn, _rms_norm_rows_backward, *rows.shape)
        if len(chunks) == 1:
            dx, dw = fn(rows, weight, rstd, grows)
        else:
            dx = torch.empty_like(rows)
            dw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
            for a, b in chunks:
                dx[a:b], dw_chunk = fn(rows[a:b], weight, rstd[a:b], grows[a:b])
                dw += dw_chunk
        return (dx.view(x.shape) if ctx.needs_input_grad[0] else None,
                dw.to(weight.dtype) if ctx.needs_input_grad[1] else None, None)


def _low_memory_rmsnorm_forward(self, hidden_states):
    weight = self.weight
    if hasattr(weight, "ds_id") and weight.numel() == 0:  # a ZeRO-3 partition not gathered: the plain code
        return self._easy_context_norm_forward(hidden_states)
    return _LowMemoryRMSNorm.apply(hidden_states, weight, self.variance_epsilon)


def _probe(dim: int, like: torch.Tensor, rows: int = 3) -> torch.Tensor:
    """A small deterministic input for the numerical checks below, on ``like``'s device and dtype."""
    g = torch.Generator(device="cpu").manual_seed(0)
    return torch.randn(rows, dim, generator=g).to(device=like.device, dtype=like.dtype)


def _partitioned(weight) -> bool:
    """A ZeRO-3 partition or a meta tensor: not inspectable, so only known classes are switched."""
    return weight.numel() == 0 or weight.device.type == "meta"


def _is_plain_rmsnorm(module) -> bool:
    """Does ``module`` compute exactly ``weight * normalize(x.float()).to(x.dtype)``? Checked numerically on a
    small input against the eager body (Gemma's ``1 + weight`` and other variants fail and are left alone)."""
    weight = getattr(module, "weight", None)
    if not (type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.Tensor) and weight.dim() == 1
            and isinstance(getattr(module, "variance_epsilon", None), float)):
        return False
    if _partitioned(weight):
        return type(module).__name__ in ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
    x = _probe(weight.shape[0], weight)
    with torch.no_grad():
        plain = module(x)  # only called before the module is switched
        ours, _ = _rms_norm_rows(x, weight, module.variance_epsilon)
    return plain.dtype == ours.dtype and torch.equal(plain, ours)


def enable_low_memory_rmsnorm(model) -> int:
    """Replace the ``forward`` of every plain RMSNorm (Llama, Mistral, Qwen2/3 and look-alikes) with one that saves
    ``x`` and a float32 ``rstd`` per row instead of float32 copies of the activations.

    The plain code's autograd graph keeps ``x.float()`` and the normalised ``x`` (6 bytes per element for bf16):
    with two norms per layer that is ~5 of the ~20 ``seq x hidden`` bf16 units of a decoder layer's backward
    working set (the first norm's input is the checkpoint, kept anyway), and the final norm's copies stay for the
    whole step. On CPU the forward is bitwise the plain code; on CUDA it is one compiled kernel (float rounding
    may differ in the last bit). The gradient is the same formula in float32. Each candidate module is checked
    numerically before it is switched; variants that compute something else (Gemma's ``1 + weight``) are left alone.

    Returns:
        The number of norms switched.
    Raises:
        ValueError: the model has no plain RMSNorm.
    """
    n = 0
    for module in model.modules():
        if "_easy_context_norm_forward" in module.__dict__:
            n += 1
            continue
        if _is_plain_rmsnorm(module):
            module._easy_context_norm_forward = module.forward
            module.forward = MethodType(_low_memory_rmsnorm_forward, module)
            n += 1
    if not n:
        raise ValueError(f"{type(model).__name__}: no plain RMSNorm (weight * x / rms(x)) found")
    return n


# ---------------------------------------------------------------- SwiGLU
def _silu_mul(gate, up):
    return F.silu(gate) * up


def _wide(t):
    """float32 for 16-bit inputs (float64 stays float64)."""
    return t if t.dtype == torch.float64 else t.to(torch.float32)


def _silu_mul_backward(gate, up, dout):
    g, d = _wide(gate), _wide(dout)
    s = torch.sigmoid(g)
    # d silu(g) / dg = s * (1 + g * (1 - s))
    return (d * _wide(up) * s * (1 + g * (1 - s))).to(gate.dtype), (d * g * s).to(up.dtype)


class _SiluMul(torch.autograd.Function):
    """``silu(gate) * up``, saving ``gate`` and ``up`` (the plain graph also keeps ``silu(gate)``)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return on_device(_silu_mul, gate.device)(gate, up)

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        dgate, dup = on_device(_silu_mul_backward, gate.device)(gate, up, dout)
        return dgate if ctx.needs_input_grad[0] else None, dup if ctx.needs_input_grad[1] else None


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` as one fused kernel per pass on CUDA (gate and up of one shape and dtype)."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        return _silu_mul(gate, up)
    return _SiluMul.apply(gate, up)


def _fused_mlp_forward(self, x):
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def _is_swiglu_mlp(mlp) -> bool:
    """Does ``mlp(x)`` compute ``down_proj(silu(gate_proj(x)) * up_proj(x))``? Checked numerically."""
    parts = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")]
    if not all(isinstance(p, torch.nn.Module) for p in parts):
        return False
    gate, up, down, act = parts
    if not (isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"):
        return False
    weight = getattr(gate, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return False
    if _partitioned(weight):
        return type(mlp).__name__ in ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")
    x = _probe(weight.shape[1], weight)
    with torch.no_grad():
        return torch.equal(mlp(x), down(_silu_mul(gate(x), up(x))))


def enable_fused_swiglu(model) -> int:
    """Every SwiGLU MLP computes ``silu(gate) * up`` with :func:`silu_mul`; composes with
    :func:`easy_context.memory.enable_tiled_mlp` in either order (the tiles call the fused forward)."""
    n = 0
    for module in model.modules():
        if "_easy_context_fused_mlp" in module.__dict__:
            n += 1
        elif _is_swiglu_mlp(module):
            module._easy_context_fused_mlp = True
            fused = MethodType(_fused_mlp_forward, module)
            if "_easy_context_mlp_forward" in module.__dict__:  # tiled: the tiles call the inner forward
                module._easy_context_mlp_forward = fused
            else:
                module.forward = fused
            n += 1
    return n


# ---------------------------------------------------------------- rotary embedding
def _rope(x, cos, sin):
    """transformers' ``x * cos + rotate_half(x) * sin`` (``rotate_half(x) = cat(-x2, x1)``)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _rope_backward(dout, cos, sin):
    # rotate_half is a signed permutation; its transpose maps z = (z1, z2) to (z2, -z1)
    t = dout * sin
    half = t.shape[-1] // 2
    return dout * cos + torch.cat((t[..., half:], -t[..., :half]), dim=-1)


def _seq_major(x) -> bool:
    """Is ``x`` a ``(batch, heads, seq, head_dim)`` view of ``(batch, seq, heads, head_dim)`` memory (how
    transformers makes q and k)?"""
    return x.dim() == 4 and not x.is_contiguous() and x.transpose(1, 2).is_contiguous()


def _rope_in_layout(fn, x, cos, sin, seq_major: bool):
    """``fn`` over ``(batch, seq, heads, head_dim)`` memory when ``seq_major``: the compiled kernel then reads and
    writes contiguously and returns the layout the eager code would (and the projections' backward wants)."""
    if not seq_major:
        return fn(x, cos, sin)
    return fn(x.transpose(1, 2), cos.transpose(1, 2), sin.transpose(1, 2)).transpose(1, 2)


class _Rope(torch.autograd.Function):
    """Rotary embedding of one tensor, saving only ``cos`` and ``sin``."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.seq_major = _seq_major(x)
        return _rope_in_layout(on_device(_rope, x.device), x, cos, sin, ctx.seq_major)

    @staticmethod
    def backward(ctx, dout):
        cos, sin = ctx.saved_tensors
        fn = on_device(_rope_backward, dout.device)
        return _rope_in_layout(fn, dout, cos, sin, ctx.seq_major), None, None


def _make_fused_rope(original):
    """A drop-in ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`` over :class:`_Rope`; anything else
    (extra arguments, trainable cos/sin, partial rotary) goes to ``original``."""

    def apply_rotary_pos_emb(q, k, cos, sin, *args, unsqueeze_dim=1, **kwargs):
        if (args or kwargs or cos.requires_grad or sin.requires_grad or q.shape[-1] != cos.shape[-1]
                or k.shape[-1] != cos.shape[-1]):
            return original(q, k, cos, sin, *args, unsqueeze_dim=unsqueeze_dim, **kwargs)
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return _Rope.apply(q, cos, sin), _Rope.apply(k, cos, sin)

    apply_rotary_pos_emb._easy_context_original = original
    return apply_rotary_pos_emb


def _is_standard_rope(fn) -> bool:
    """Does ``fn(q, k, cos, sin)`` compute transformers' Llama rotary embedding? Checked numerically (float32)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k = torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 1, 5, 8, generator=g)
    angles = torch.randn(1, 5, 8, generator=g)
    try:
        q_out, k_out = fn(q, k, angles.cos(), angles.sin())
    except Exception:  # noqa: BLE001 - another signature: not the function we replace
        return False
    cos, sin = angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)
    return torch.equal(q_out, _rope(q, cos, sin)) and torch.equal(k_out, _rope(k, cos, sin))


def enable_fused_rope(model) -> int:
    """Replace ``apply_rotary_pos_emb`` in the modeling module of each attention class of ``model`` with the
    fused one (transformers calls it as a module global from the attention's forward, so this is process-wide
    for that model family). Returns the number of modeling modules switched."""
    n = 0
    for module_name in sorted({type(m).__module__ for m in model.modules() if hasattr(m, "q_proj")}):
        modeling = sys.modules[module_name]
        current = getattr(modeling, "apply_rotary_pos_emb", None)
        if current is None:
            continue
        if hasattr(current, "_easy_context_original"):
            n += 1
        elif _is_standard_rope(current):
            modeling.apply_rotary_pos_emb = _make_fused_rope(current)
            n += 1
    return n


def enable_fused_kernels(model) -> dict:
    """Fused RMSNorm (:func:`enable_low_memory_rmsnorm`), SwiGLU and rotary embedding for ``model``.

    Exact up to float rounding: on CPU the forward of each op is the plain code's, on CUDA one compiled kernel
    per op and pass computes in float32 and rounds once. Call it before training, in either order with the
    other memory features and the sequence-parallel patch.

    Returns:
        How many of each were switched: ``{"rmsnorm": n, "swiglu": n, "rope": n}`` (modules, modules, modeling
        modules).
    Raises:
        ValueError: none of the three was found.
    """
    counts = {"rmsnorm": 0, "swiglu": enable_fused_swiglu(model), "rope": enable_fused_rope(model)}
    try:
        counts["rmsnorm"] = enable_low_memory_rmsnorm(model)
    except ValueError:
        if not any(counts.values()):
            raise ValueError(f"{type(model).__name__}: no plain RMSNorm, SwiGLU MLP or standard rotary embedding "
                             "found; fused kernels do not apply") from None
    return counts


__all__ = ["enable_fused_kernels", "enable_low_memory_rmsnorm", "enable_fused_swiglu", "enable_fused_rope",
           "silu_mul", "on_device"]
