"""Switching a transformers model's modules to the fused ops (easy_context.memory.ops): the low-memory RMSNorm, the
fused SwiGLU and the fused rotary embedding. Every candidate module (or rotary function) is first checked numerically
against the op's eager body and left alone if it computes something else (Gemma's ``1 + weight`` norm, a GeLU MLP, a
partial rotary embedding). Norms and MLPs are switched per instance (``forward`` replaced, class and state-dict names
kept); the rotary function is replaced in the model family's modeling module (transformers calls it as a module
global), which is process-wide for that family.
"""
from __future__ import annotations

import sys
from types import MethodType

import torch

from ..memory.ops.rmsnorm import low_memory_rms_norm, rms_norm_rows
from ..memory.ops.rope import rope, rope_eager
from ..memory.ops.swiglu import silu_mul, silu_mul_eager
from ..memory.tiled_mlp import mlp_forward, set_mlp_forward


def _low_memory_rmsnorm_forward(self, hidden_states):
    weight = self.weight
    if hasattr(weight, "ds_id") and weight.numel() == 0:  # a ZeRO-3 partition not gathered: the plain code
        return self._easy_context_norm_forward(hidden_states)
    return low_memory_rms_norm(hidden_states, weight, self.variance_epsilon)


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
        ours, _ = rms_norm_rows(x, weight, module.variance_epsilon)
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


class FusedSwiGLUForward:
    """The per-token function of a SwiGLU MLP instance with the fused ``silu(gate) * up``."""

    def __init__(self, mlp: torch.nn.Module):
        self.mlp = mlp

    def __call__(self, x):
        m = self.mlp
        return m.down_proj(silu_mul(m.gate_proj(x), m.up_proj(x)))


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
        return torch.equal(mlp(x), down(silu_mul_eager(gate(x), up(x))))


def enable_fused_swiglu(model) -> int:
    """Every SwiGLU MLP computes ``silu(gate) * up`` with :func:`silu_mul`; composes with
    :func:`easy_context.integrations.memory.enable_tiled_mlp` in either order (the tiles call the fused forward,
    through ``easy_context.memory.tiled_mlp.set_mlp_forward``)."""
    n = 0
    for module in model.modules():
        if isinstance(mlp_forward(module), FusedSwiGLUForward):
            n += 1
        elif _is_swiglu_mlp(module):
            set_mlp_forward(module, FusedSwiGLUForward(module))  # tiled: the tiles call it (memory/tiled_mlp.py)
            n += 1
    return n


def _make_fused_rope(original):
    """A drop-in ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`` over :func:`easy_context.memory.ops.rope`;
    anything else (extra arguments, trainable cos/sin, partial rotary) goes to ``original``."""

    def apply_rotary_pos_emb(q, k, cos, sin, *args, unsqueeze_dim=1, **kwargs):
        if (args or kwargs or cos.requires_grad or sin.requires_grad or q.shape[-1] != cos.shape[-1]
                or k.shape[-1] != cos.shape[-1]):
            return original(q, k, cos, sin, *args, unsqueeze_dim=unsqueeze_dim, **kwargs)
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return rope(q, cos, sin), rope(k, cos, sin)

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
    return torch.equal(q_out, rope_eager(q, cos, sin)) and torch.equal(k_out, rope_eager(k, cos, sin))


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
           "FusedSwiGLUForward"]
