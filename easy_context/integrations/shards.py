"""The check that the shards of ``prepare_seq_parallel_inputs`` reach a model whose attention assembles their layout
(a model left on its own attention would attend within each rank's shard only: wrong logits and gradients)."""
from __future__ import annotations

from .hf import SUPPORTED_MODEL_TYPES, patched_attn_implementation, registered_config


class _ShardGuard:
    """Shards of :func:`prepare_seq_parallel_inputs` waiting for the model they are fed to (see
    :func:`expect_sequence_parallel_model`). One per process: the two calls share no object."""

    def __init__(self):
        self.pending = []    # (weakref to local_input_ids, weakref to local_position_ids, expected layout)
        self.handle = None   # the global forward hook, present only while shards are pending

    def expect(self, tensors, layout) -> None:
        import weakref

        from torch.nn.modules.module import register_module_forward_hook

        self.pending = [p for p in self.pending if p[0]() is not None] + [(*map(weakref.ref, tensors), layout)]
        if self.handle is None:
            self.handle = register_module_forward_hook(self._check, with_kwargs=True)

    def _check(self, module, args, kwargs, output) -> None:
        # every module call while shards are pending: a few per step (the embedding, then the rotary embedding or the
        # model: the innermost module with a transformers config that got them finishes first)
        config = getattr(module, "config", None)
        attn = getattr(config, "_attn_implementation", None) if config is not None else None
        hit = None
        if attn is not None:
            given = [a for a in (*args, *kwargs.values()) if a is not None]
            hit = next((p for p in self.pending if any(a is p[0]() or a is p[1]() for a in given)), None)
        self.pending = [p for p in self.pending if p is not hit and p[0]() is not None]
        if not self.pending and self.handle is not None:
            self.handle.remove()
            self.handle = None
        if hit is not None:
            problem = _layout_problem(attn, hit[2], config)
            if problem:
                raise ValueError(f"a {getattr(config, 'model_type', '')} model got the shards of "
                                 f"prepare_seq_parallel_inputs({problem}")


_GUARD = _ShardGuard()


def expect_sequence_parallel_model(seq_algo: str, sp_world: int, options: dict, local_input_ids,
                                   local_position_ids) -> None:
    """Check, when these shards reach a model, that its attention assembles their layout.

    A model left on its own attention (the string form of the patch called after the model was built, no patch, or
    one with another algorithm / ``sp_size`` / ``ring_degree``) would attend within each rank's shard only: logits
    and gradients wrong, the loss barely. Mechanism: while shards are pending, a global forward hook (torch's
    ``register_module_forward_hook``, removed again once they arrived) looks at each finished module call; the first
    module with a transformers ``config`` that got one of these very tensors (``local_input_ids`` or
    ``local_position_ids``, by position or keyword) is the model's rotary embedding (Llama, Mistral, Qwen2/3: before
    any decoder layer ran) or the model itself. There it compares the ``attn_implementation`` with the layout and
    raises ValueError naming the fix. Only weak references to the shards are kept; shards that never reach a model
    cost nothing once freed.
    """
    _GUARD.expect((local_input_ids, local_position_ids), (seq_algo, sp_world, _resolved_options(seq_algo, sp_world,
                                                                                                 options)))


def _resolved_options(seq_algo: str, sp_world: int, options: dict) -> dict:
    if seq_algo == "usp_attn":
        from ..attention.comm import usp_degrees

        return {"ring_degree": usp_degrees(sp_world, options.get("ring_degree"))[0]}
    return dict(options)


def _layout_problem(attn_implementation: str, layout, config) -> str | None:
    """Why a model on ``attn_implementation`` cannot take shards of ``layout`` (None: it can); the message's tail."""
    from ..utils import rank_world

    seq_algo, sp_world, options = layout
    what = f"{seq_algo!r} over {sp_world} ranks{''.join(f', {k}={v}' for k, v in options.items())})"
    ours = registered_config(attn_implementation)
    if ours is None:
        model_type = getattr(config, "model_type", None)
        late = (f" {model_type} was patched with the string form, which switches only models built after it; this one "
                "was built before." if model_type in SUPPORTED_MODEL_TYPES
                and patched_attn_implementation(model_type) else "")
        sp = "" if sp_world == rank_world()[1] else f", sp_size={sp_world}"
        return (f"{what}, but its attention is {attn_implementation!r}, which would attend within each rank's shard "
                f"only (wrong logits and gradients).{late} Patch this model: apply_seq_parallel_monkey_patch("
                f"{seq_algo!r}, model{sp}{''.join(f', {k}={v}' for k, v in options.items())}), or patch with the "
                "string form before building it")
    model_sp = ours.sp_size or rank_world()[1]
    mine = (ours.seq_algo, model_sp, _resolved_options(ours.seq_algo, model_sp, ours.options))
    if mine != (seq_algo, sp_world, options):
        return (f"{what}, but its attention {attn_implementation!r} assembles {mine[0]!r} over {mine[1]} ranks"
                f"{''.join(f', {k}={v}' for k, v in mine[2].items())}: pass the same seq_algo, sp_size and "
                "ring_degree to apply_seq_parallel_monkey_patch and prepare_seq_parallel_inputs")
    return None


__all__ = ["expect_sequence_parallel_model"]
