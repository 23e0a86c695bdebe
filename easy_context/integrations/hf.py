"""How transformers reaches us: sequence-parallel attention registered with transformers' AttentionInterface.

A model whose attention layers call ``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)``
(Llama, Mistral, Qwen2, Qwen3 and most decoders of transformers 5) runs our attention once its config names
an implementation registered here. Nothing in the decoder is copied or replaced:

* :func:`register_attention` registers, under a name such as ``"easy_context_zigzag_ring_attn"``, an attention
  function that hands the local q/k/v shard to the algorithm's kernel with the right process group, and a mask
  function that builds no mask at all (returns None): causality over the global sequence is the kernel's job,
  and the zigzag/USP position-id jumps must never become an ``S x S`` "packed documents" mask.
* packed rows (position ids that restart at 0 at each document start): at layer 0 of every forward the ranks
  all-gather their position ids once, find the documents of the global row (:func:`global_documents`) and pass
  them to the algorithm as ``cu_seqlens``; every token then attends only within its document.
* :func:`patch_model` switches one loaded model to that name with the public ``set_attn_implementation``.
* :func:`patch_model_type` (the seed form, before the model exists) makes every model of a model type built
  afterwards (``from_pretrained``, ``from_config`` or the constructor, whatever ``attn_implementation`` it
  asks for) switch itself to that name at the end of its ``post_init``.
* both also give a causal LM the exact loss of ``labels=`` over the whole sequence (:func:`make_causal_lm_loss`):
  transformers' own shift-and-mean on a shard would drop each shard's last target and average per rank.
* shards.py's ``expect_sequence_parallel_model``: shards made by ``prepare_seq_parallel_inputs`` must reach a model
  whose attention assembles their layout; a model left on its own attention (patched too late, or not at all)
  raises at its first call with them instead of attending within each shard.
"""
from __future__ import annotations

import importlib
from typing import Callable

from ..sp_config import SPAttentionConfig, safe_attn_name  # noqa: F401 - the config lives with the API; re-exported
from .documents import global_documents

# Model types of the string (seed) form; any decoder routed through AttentionInterface works as an object.
# (Gemma 3 works as an object: its PreTrainedModel base is shared with the multimodal Gemma 3, which a type-wide
# patch would switch too.)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma2", "gpt_oss")

# Padding-free varlen arguments of flash-attn (DataCollatorWithFlattening(return_flash_attn_kwargs=True)): they describe
# the local shard, not the global row, so they are refused; packed rows are read from the position ids instead.
_VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens_q", "cu_seqlens_k", "max_length_q", "max_length_k")

# Arguments transformers passes to attention functions that change nothing the SP kernels compute. Any other argument
# with a value is refused by name instead of being dropped; the ones the kernels apply (sliding_window, Gemma 2's
# softcap, gpt-oss's s_aux sinks) are parameters of the attention function below.
_IGNORED_KWARGS = frozenset({"position_ids", "use_cache", "output_attentions", "output_router_logits",
                             "output_hidden_states", "cache_position", "past_key_values", "past_key_value",
                             "layer_idx", "return_dict",
                             "shift_labels", "num_items_in_batch"})  # loss arguments transformers passes down too
_UNSUPPORTED_HINTS = {"sinks": "attention sinks (easy_context takes gpt-oss's s_aux)",
                      "head_mask": "a head mask", "alibi": "ALiBi biases"}

def no_mask(*args, attention_mask=None, **kwargs):
    """The registered mask function: never builds a mask (causality is the kernel's job).

    transformers calls it once per forward from ``create_causal_mask`` / ``create_sliding_window_causal_mask``
    with the user's 2-D ``attention_mask`` (bool) if one was passed. A mask with zeros (padding) cannot be
    honoured by the SP kernels, so it is an error rather than silently ignored.
    """
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            "attention_mask with padding (zeros) is not supported under sequence parallelism: the SP kernels attend "
            "causally over the whole sequence. Do not pass attention_mask; right-pad instead "
            "(prepare_seq_parallel_inputs pads to the algorithm's granularity and sets the padded targets to -100, "
            "which is exact)")
    return None


def make_attention(config: SPAttentionConfig) -> Callable:
    """The function registered with AttentionInterface for ``config`` (see :func:`register_attention`)."""
    import torch.distributed as dist

    from ..attention.comm import get_sp_group
    from ..attention.registry import get_attn_func

    config.require_sequence_parallel()
    attn_func = get_attn_func(config.seq_algo)
    options = config.options
    # The documents of the current forward, found at layer 0 and reused by the later layers (and their recompute)
    # that get the same position_ids tensor.
    current = {"position_ids": None, "docs": None}

    def sequence_parallel_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                                    sliding_window=None, is_causal=None, softcap=None, s_aux=None, **kwargs):
        """transformers attention interface: q ``(b, h, s_local, d)``, k/v ``(b, h_kv, s_local, d)``
        -> ``((b, s_local, h, d), None)``. ``sliding_window`` (per layer: a model may mix sliding and full layers),
        ``softcap`` (Gemma 2) and ``s_aux`` (gpt-oss's sinks, a parameter of the layer) go to the algorithm."""
        if attention_mask is not None:
            raise ValueError(f"{config.name}: a prepared (4-D) attention mask cannot be honoured under sequence "
                             "parallelism; the kernels apply the causal mask over the global sequence themselves")
        if any(kwargs.get(k) is not None for k in _VARLEN_KWARGS):
            raise ValueError(f"{config.name}: flash-attn varlen arguments (cu_seq_lens, max_length) are not taken "
                             "under sequence parallelism: pass packed rows as position_ids that restart at 0 at each "
                             "document (DataCollatorWithFlattening without return_flash_attn_kwargs, or "
                             "prepare_data.py --packing documents); prepare_seq_parallel_inputs shards them")
        unsupported = sorted(k for k, v in kwargs.items() if k not in _IGNORED_KWARGS and k not in _VARLEN_KWARGS
                             and v is not None and v is not False)
        if unsupported:
            what = ", ".join(f"{k} ({_UNSUPPORTED_HINTS[k]})" if k in _UNSUPPORTED_HINTS else k for k in unsupported)
            raise ValueError(f"{config.name}: {type(module).__name__} passes attention arguments the "
                             f"sequence-parallel kernels do not implement: {what}. Ignoring them would compute "
                             f"another model; train this model with seq_algo='data_parallel'")
        if dropout:
            raise ValueError(f"{config.name}: attention dropout ({dropout}) is not supported; set "
                             "config.attention_dropout=0.0")
        if key.shape[2] != query.shape[2]:
            raise ValueError(f"{config.name}: {query.shape[2]} local queries against {key.shape[2]} keys: "
                             "generation with a KV cache is not supported; run it without sequence parallelism")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(f"{config.name}: torch.distributed is not initialised; launch with accelerate/"
                               "torchrun, or use seq_algo='data_parallel'")
        group = get_sp_group(config.sp_size)
        seq_len = query.shape[2] * dist.get_world_size(group)
        position_ids = kwargs.get("position_ids")
        if getattr(module, "layer_idx", 0) == 0:  # once per forward (every rank runs layer 0 at the same point)
            current["docs"] = global_documents(position_ids, query.shape[2], config, group)
            current["position_ids"] = position_ids
        elif position_ids is not current["position_ids"]:
            raise RuntimeError(f"{config.name}: layer {module.layer_idx} got other position_ids than layer 0 of the "
                               "same forward; the documents of a packed row are read once per forward at layer 0")
        docs = current["docs"]
        if docs is not None and len(docs) == 1 and query.shape[0] > 1:
            docs = docs * query.shape[0]  # position_ids (1, s) shared by the batch rows
        causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        # (b, h, s_local, d) -> (b, s_local, h, d): views, the flash-attn layout of the core
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        extra = {} if docs is None else {"cu_seqlens": docs}
        # HF semantics: a query attends to at most `sliding_window` keys (itself included); a window that covers
        # the whole (padded) sequence changes nothing and is not passed (dist_flash_attn refuses shorter ones)
        if sliding_window is not None and seq_len > sliding_window:
            extra["window"] = int(sliding_window)
        if softcap:
            extra["softcap"] = float(softcap)
        if s_aux is not None:
            extra["sinks"] = s_aux
        out = attn_func(q, k, v, causal=causal, softmax_scale=scaling, group=group, backend=config.backend,
                        **options, **extra)
        return out, None

    sequence_parallel_attention.__qualname__ = f"sequence_parallel_attention[{config.name}]"
    return sequence_parallel_attention


def register_attention(config: SPAttentionConfig) -> str:
    """Register the attention and the no-op mask for ``config`` with transformers; return the name.

    Idempotent: registering the same configuration again replaces the entry with an equivalent one.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    config.require_sequence_parallel()
    AttentionInterface.register(config.name, make_attention(config))
    AttentionMaskInterface.register(config.name, no_mask)
    _REGISTERED[config.name] = config
    return config.name


# attn_implementation name -> the configuration registered under it in this process
_REGISTERED: dict[str, SPAttentionConfig] = {}


def registered_config(attn_implementation: str | None) -> SPAttentionConfig | None:
    """The configuration behind an ``attn_implementation`` name of ours (None for any other): the registered name,
    or the longest one it starts with (wrappers such as attention-preserving checkpointing append a suffix)."""
    name = str(attn_implementation or "")
    if name in _REGISTERED:
        return _REGISTERED[name]
    prefixes = [n for n in _REGISTERED if name.startswith(n + "_")]
    return _REGISTERED[max(prefixes, key=len)] if prefixes else None


def patch_model(model, config: SPAttentionConfig):
    """Switch one loaded model (and only it) to the sequence-parallel attention of ``config``.

    Raises:
        TypeError: not a transformers ``PreTrainedModel``, or one whose attention does not go through
            ``AttentionInterface`` (it would keep attending within the local shard: silently wrong).
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a model-type string ({', '.join(SUPPORTED_MODEL_TYPES)}) or a loaded "
                        f"transformers PreTrainedModel, got {type(model).__name__}")
    name = register_attention(config)
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise TypeError(f"{type(model).__name__} does not route its attention through transformers' "
                        "AttentionInterface, so sequence-parallel attention cannot be applied to it")
    _install_loss(model, config)
    return model


def _install_loss(model, config: SPAttentionConfig) -> None:
    """Give a causal LM (``loss_type`` ForCausalLM) the exact sequence-parallel loss of ``labels=``."""
    if getattr(model, "loss_type", None) == "ForCausalLM":
        previous = getattr(model, "_easy_context_default_loss", None) or model.loss_function
        model._easy_context_default_loss = previous
        model.loss_function = make_causal_lm_loss(config, model, previous)


def make_causal_lm_loss(config: SPAttentionConfig, model, default: Callable) -> Callable:
    """The ``loss_function`` of a sequence-parallel causal LM: ``model(ids, position_ids=..., labels=labels).loss`` is
    exactly what the unpatched model returns on the whole sequence (of the SP group).

    transformers' loss shifts ``labels`` by one and averages. On a shard that is wrong twice: the target of a shard's
    last token is the first token of the *next* chunk, held by another rank (zigzag chunks are not even adjacent), and
    a per-rank mean weights tokens unequally. Here:

    * ``labels`` ``(batch, local_seq)``: this rank's shard of the unshifted labels (as the inputs were sharded, e.g.
      ``labels=prepared["local_input_ids"]``). They are all-gathered over the SP group (one collective of the ids),
      shifted over the whole sequence (the last position gets -100), and this rank's shard is taken again. Positions
      that ``prepare_seq_parallel_inputs`` padded count like any label (as in transformers): give them -100, or
    * ``shift_labels`` ``(batch, local_seq)``: already-shifted targets of this shard, e.g.
      ``shift_labels=prepared["local_target_ids"]`` (padding -100 already; no gather). transformers computes a loss
      only when ``labels`` is given too (any tensor of that shape: it is not read then).

    Returns a loss whose *value* is the token mean over the SP group (identical on its ranks) and whose *gradient* is
    that of ``sp * local_sum / N`` (:func:`easy_context.loss.group_token_mean`), so that DDP's average over all ranks
    applies the gradient of the mean of the replicas' token means, as DDP does for the unpatched model. A model no
    longer on an attention of ours (``set_attn_implementation("sdpa")``) gets ``default``, transformers' loss.
    """
    import weakref

    model_ref = weakref.ref(model)

    def sequence_parallel_causal_lm_loss(logits, labels, vocab_size: int, num_items_in_batch=None,
                                         ignore_index: int = -100, shift_labels=None, **kwargs):
        import torch.nn.functional as F

        from ..attention.comm import get_sp_group, group_rank_size
        from ..attention.registry import gather_sequence, shard_sequence
        from ..loss import group_token_mean

        owner = model_ref()  # (a deep copy shares the original's reference: it is judged like the original)
        if owner is not None and registered_config(owner.config._attn_implementation) is None:
            return default(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch,
                           ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)
        if num_items_in_batch is not None:
            raise ValueError(f"{config.name}: num_items_in_batch (a per-process token count, the Trainer's gradient "
                             "accumulation) cannot normalise a loss over sequence shards; the patched model averages "
                             "over the valid labels of the whole SP group itself. Use "
                             "easy_context.CausalLMWithShardedLoss for training loops")
        group = get_sp_group(config.sp_size)
        if shift_labels is None:
            if labels.shape != logits.shape[:-1]:
                raise ValueError(f"{config.name}: labels {tuple(labels.shape)} must be this rank's shard, shaped like "
                                 f"the logits {tuple(logits.shape[:-1])} (logits_to_keep cannot be combined)")
            rank, world = group_rank_size(group)
            # (b, s/W) shard -> (b, s) global labels -> shifted over the whole sequence -> this rank's shard again
            full = gather_sequence(config.seq_algo, labels.contiguous(), group=group, dim=1, **config.options)
            shifted = F.pad(full[:, 1:], (0, 1), value=ignore_index)
            shift_labels = shard_sequence(config.seq_algo, shifted, rank, world, dim=1, **config.options)
        elif shift_labels.shape != logits.shape[:-1]:
            raise ValueError(f"{config.name}: shift_labels {tuple(shift_labels.shape)} must be this rank's shard of "
                             f"the shifted targets, shaped like the logits {tuple(logits.shape[:-1])}")
        targets = shift_labels.to(logits.device).reshape(-1)
        local_sum = F.cross_entropy(logits.float().reshape(-1, vocab_size), targets, ignore_index=ignore_index,
                                    reduction="sum")
        out = group_token_mean(local_sum, (targets != ignore_index).sum(), group=group)
        # value: the group token mean; gradient: that of out.loss (scaled for the data-parallel average)
        return out.loss + (out.global_loss - out.loss).detach()

    sequence_parallel_causal_lm_loss.__qualname__ = f"sequence_parallel_causal_lm_loss[{config.name}]"
    return sequence_parallel_causal_lm_loss


# model-type base class -> its own post_init before we wrapped it (None: it inherited PreTrainedModel's)
_ORIGINAL_POST_INIT: dict[type, Callable | None] = {}


def pretrained_base(model_type: str) -> type:
    """``LlamaPreTrainedModel`` for ``"llama"``: the base class shared by every model class of the type."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)} "
                         "(or pass a loaded model: any decoder whose attention goes through AttentionInterface works)")
    from transformers import PreTrainedModel
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    model_class = getattr(module, MODEL_MAPPING_NAMES[model_type])
    return next(c for c in model_class.__mro__ if PreTrainedModel in c.__bases__)


def patch_model_type(model_type: str, config: SPAttentionConfig) -> str:
    """Make every ``model_type`` model created from now on use the attention of ``config``; return its name.

    Mechanism: the model type's ``<Type>PreTrainedModel.post_init`` (run at the end of every constructor,
    including inside ``from_pretrained`` / ``from_config``) is wrapped to call the public
    ``set_attn_implementation(name)`` afterwards. So whichever ``attn_implementation`` the user asks for
    ("sdpa", "flash_attention_2", ...) is validated by transformers as usual and then replaced by ours; other
    model types and models created before are untouched. Calling it again replaces the previous choice.
    """
    base = pretrained_base(model_type)
    name = register_attention(config)
    if base not in _ORIGINAL_POST_INIT:
        _ORIGINAL_POST_INIT[base] = base.__dict__.get("post_init")
    original = _ORIGINAL_POST_INIT[base] or super(base, base).post_init

    def post_init(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        self.set_attn_implementation(name)
        _install_loss(self, config)
        return result

    post_init.easy_context_attn_implementation = name
    base.post_init = post_init
    return name


def unpatch_model_type(model_type: str) -> None:
    """Undo :func:`patch_model_type` for models created from now on (existing models keep their attention)."""
    base = pretrained_base(model_type)
    if base not in _ORIGINAL_POST_INIT:
        return
    original = _ORIGINAL_POST_INIT.pop(base)
    if original is None:
        del base.post_init
    else:
        base.post_init = original


def patched_attn_implementation(model_type: str) -> str | None:
    """The attention name that new ``model_type`` models get, or None if the type is not patched."""
    return getattr(pretrained_base(model_type).__dict__.get("post_init"), "easy_context_attn_implementation", None)


def is_sequence_parallel(model) -> bool:
    """Whether ``model`` runs an attention registered by easy_context."""
    return str(getattr(model.config, "_attn_implementation", "")).startswith("easy_context_")


__all__ = ["SUPPORTED_MODEL_TYPES", "SPAttentionConfig", "register_attention", "patch_model", "patch_model_type",
           "unpatch_model_type", "patched_attn_implementation", "is_sequence_parallel", "no_mask", "make_attention",
           "pretrained_base", "safe_attn_name", "global_documents", "registered_config", "make_causal_lm_loss"]
