"""Fused pointwise ops of a decoder layer (RMSNorm, SwiGLU, rotary embedding): autograd Functions whose bodies are
plain torch math, each compiled to one kernel per pass on CUDA. What each saves for backward is chosen here. They
know nothing of models: easy_context/integrations/patch.py switches a model's modules to them.

At 128K tokens on one H200 the plain code's elementwise kernels took 13% of an easy_context training step
(bench/RESULTS.md, section 5); the fused ops run RMSNorm 4.6x, RoPE 3.1x and SwiGLU 1.4x faster (fwd+bwd).
``EASY_CONTEXT_COMPILE=0`` keeps them eager everywhere.
"""
from .rmsnorm import low_memory_rms_norm, rms_norm_rows
from .rope import rope, rope_eager
from .swiglu import silu_mul

__all__ = ["low_memory_rms_norm", "rms_norm_rows", "rope", "rope_eager", "silu_mul"]
