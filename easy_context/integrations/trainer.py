"""Any transformers ``Trainer`` (or subclass: TRL's ``SFTTrainer``) on exact sequence parallelism.

One call between building the trainer and ``trainer.train()``. What it changes, all on this trainer instance (its
class, the model's class and other trainers are untouched), each through a method transformers or accelerate
documents as one to override:

* the model (``trainer.model``, or the model inside a PEFT wrapper) gets the SP attention
  (:func:`easy_context.apply_seq_parallel_monkey_patch`, object form) and a forward that, given
  ``easy_context_targets=``, returns this rank's cross-entropy *sum* from the chunked LM head
  (:func:`easy_context.loss.head_cross_entropy_sum`: no full-vocabulary logits, computed as the head's own forward,
  so FSDP under any wrap policy and ZeRO-3 gather the head for it). The loss is computed inside the model's forward,
  so inside the DDP / FSDP wrapper's forward (DDP arms its averaging there, FSDP gathers there);
* ``accelerator.prepare_data_loader``: the ranks of one SP group read the same batches, data-parallel replicas
  different ones (:func:`easy_context.prepare_dataloader`), for training and evaluation alike;
* ``compute_loss``: each micro-batch's full rows are shifted into targets exactly as transformers' causal LM loss
  shifts ``labels`` (or ``shift_labels`` as given), then sharded with the global positions
  (:func:`easy_context.prepare_seq_parallel_inputs`, packed rows reordered for balance);
* ``get_batch_samples``: ``num_items_in_batch``, the valid targets of the whole accumulated batch, counted once per
  replica (transformers' own count sees every SP rank's copy of the batch and would count it ``sp`` times);
* ``log``: ``tokens_per_second`` (input tokens of the global batch, every replica, per second of training);
* the counts transformers makes over every rank, which see each SP group's batch ``sp`` times: a callback divides
  each step's increase of ``state.num_input_tokens_seen`` (``include_num_input_tokens_seen``) by ``sp`` at the
  step's end, before it is logged or saved, and ``get_total_train_batch_size`` (the logged total batch, and the
  samples behind ``train_samples_per_second``) counts replicas, not ranks;
* ``accelerator.gather_for_metrics``: evaluation losses gathered once per replica, not once per SP rank.

Loss scaling, the same as transformers' for one process (derivation as in easy_context/loss.py). Let ``S_r`` be rank
r's cross-entropy sum of a micro-batch, ``N`` the valid targets of the step's whole accumulated batch over all
replicas (``average_tokens_across_devices=True``, the default) and ``W`` the world size. Rank r backpropagates
``W * S_r / N``; DDP / FSDP average over W ranks, so the update is the gradient of ``sum_r S_r / N`` summed over the
micro-batches: the token mean of the step, exactly what one process computes from the same rows. Trainer logs the
mean over ranks of ``sum W * S_r / N``, which is that token mean. (``average_tokens_across_devices=False``: ``N`` is
the replica's own count and the scale ``sp``, so the update is the mean over replicas of their token means, as
Trainer does per rank under DDP.) Evaluation: each batch's loss is the token mean of its rows (one process's
number), identical on the SP group's ranks, gathered once per replica.
"""
from __future__ import annotations

import functools
import time

import torch
from transformers import TrainerCallback  # this module is imported only by prepare_trainer's users

from ..sp_config import SPAttentionConfig, sp_config

# keys a collator may give that carry nothing the SP forward needs: flash-attn varlen arguments and TRL's sequence
# index restate the position ids' documents for the unsharded row; the rest are switches
_DERIVED_KEYS = frozenset({"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx", "use_cache",
                           "return_dict", "output_attentions", "output_hidden_states", "num_items_in_batch"})
_MEMORY_OPTIONS = ("offload_checkpointing", "attn_preserving_checkpointing", "tiled_mlp", "tiled_mlp_tile_size",
                   "low_memory_rmsnorm", "fused_kernels")
_FIX_PADDING = ("pad without an attention mask: a padding-free collator (DataCollatorWithFlattening, "
                "SFTConfig(padding_free=True) or packing=True), or rows of one length")


def _fail(message: str):
    raise ValueError(f"prepare_trainer: {message}")


def _unwrap_peft(model):
    """The transformers model inside a PEFT wrapper (``model`` itself otherwise)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and hasattr(model, "peft_config") else model


def prepare_trainer(trainer, seq_algo: str | SPAttentionConfig, *, sp_size: int | None = None,
                    ring_degree: int | None = None, backend: str | None = None, loss_chunk_size: int = 4096,
                    balance_documents: bool = True, **options):
    """Make ``trainer`` (a ``transformers.Trainer`` or subclass, e.g. TRL's ``SFTTrainer``) train with exact sequence
    parallelism; returns it. Call it once, after building the trainer and before ``trainer.train()``.

    Args:
        trainer: the trainer, its model a transformers causal LM or a PEFT model wrapping one (e.g. LoRA).
        seq_algo: an :class:`SPAttentionConfig`, or an algorithm name (``easy_context.SEQ_ALGOS``) with ``sp_size``,
            ``ring_degree``, ``backend`` as keywords.
        sp_size: ranks per sequence-parallel group (None: the whole world); the world splits into ``world / sp_size``
            data-parallel replicas, each reading its own batches.
        loss_chunk_size: tokens per chunk of the fused LM head + cross-entropy.
        balance_documents: packed rows under a ring: reorder each row's documents so the ranks' attention work is
            equal (the loss is the same).
        **options: the memory features, as train.py's flags: ``offload_checkpointing`` /
            ``attn_preserving_checkpointing`` (True: every decoder layer, or the first N), ``tiled_mlp``
            (+ ``tiled_mlp_tile_size``),
            ``low_memory_rmsnorm``, ``fused_kernels``. The checkpointing ones turn checkpointing on themselves: the
            trainer's ``gradient_checkpointing`` / ``activation_checkpointing`` argument is then set to False (it
            would replace their checkpoint function at ``train()``).
    Returns:
        ``trainer``.
    Raises:
        ValueError: called twice or after ``train()`` began; ``sp_size`` not dividing the world; heads that the
            algorithm cannot split; ``compute_metrics``, ``compute_loss_func`` or label smoothing (they need the full
            logits); an unknown option. During training: a batch whose ``attention_mask`` has zeros (padding), raised
            on every rank together; a batch without ``labels``; inputs the SP forward does not take.
    """
    from ..api import apply_seq_parallel_monkey_patch
    from ..attention.registry import check_heads
    from ..utils import check_sp_size, rank_world

    if getattr(trainer, "_easy_context", None) is not None:
        _fail("called twice on this trainer; it is prepared already (call it once, before train())")
    if getattr(trainer, "is_in_train", False) or trainer.state.global_step > 0 or trainer.model_wrapped is not \
            trainer.model:
        _fail("called after train() began (the model is already wrapped for data parallelism); build the trainer, "
              "call prepare_trainer(trainer, ...), then trainer.train()")
    unknown = sorted(set(options) - set(_MEMORY_OPTIONS))
    if unknown:
        _fail(f"unknown option(s) {', '.join(unknown)}; memory options: {', '.join(_MEMORY_OPTIONS)}")
    for what, value in (("compute_metrics", trainer.compute_metrics), ("compute_loss_func", trainer.compute_loss_func),
                        ("label smoothing (label_smoothing_factor)", trainer.label_smoother)):
        if value is not None:
            _fail(f"{what} needs the full logits, which sequence parallelism shards over the ranks; remove it (the "
                  "exact token-mean cross-entropy is the loss, eval_loss its evaluation)")
    config = sp_config(seq_algo, sp_size=sp_size, ring_degree=ring_degree, backend=backend)
    rank, world = rank_world()
    try:
        sp = check_sp_size(config.sp_size, world) if config.sequence_parallel else 1
    except ValueError:
        _fail(f"sp_size={config.sp_size} does not divide the world size {world}: pass sp_size= a divisor of the "
              f"number of processes (e.g. {world}, or None for the whole world)")
    causal_lm = _unwrap_peft(trainer.model)
    cfg = causal_lm.config
    if config.sequence_parallel:
        try:
            check_heads(config.seq_algo, cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None)
                        or cfg.num_attention_heads, sp, **config.options)
        except ValueError as e:
            _fail(f"{e} (prepare_trainer: another seq_algo, e.g. 'zigzag_ring_attn', or a smaller sp_size)")
    head = causal_lm.get_output_embeddings()
    if hasattr(head, "base_layer"):
        _fail("the LM head is a PEFT (LoRA) layer: the chunked loss reads its weight directly; leave lm_head out of "
              "target_modules")
    apply_seq_parallel_monkey_patch(config, causal_lm)
    _apply_memory_options(trainer, causal_lm, options)
    state = _State(trainer, config, rank, world, sp, loss_chunk_size, balance_documents)
    _install_loss_forward(causal_lm, loss_chunk_size)
    trainer._easy_context = state
    # the loss is normalised over the whole accumulated batch here: training_step must not divide by the steps
    trainer.loss_is_scaled_for_ga = True  # transformers >= 5.24
    trainer.model_accepts_loss_kwargs = True  # earlier: the same decision, read from this flag and num_items_in_batch
    trainer.compute_loss = state.compute_loss
    trainer.get_batch_samples = functools.partial(state.get_batch_samples, trainer.get_batch_samples)
    trainer.log = functools.partial(state.log, trainer.log)
    total_batch = getattr(trainer, "get_total_train_batch_size", None)  # transformers >= 5.x: the logged batch size
    if total_batch is not None:
        trainer.get_total_train_batch_size = lambda args: total_batch(args) // sp
    trainer.add_callback(_TokensOncePerReplica(sp))
    accelerator = trainer.accelerator
    accelerator.prepare_data_loader = state.prepare_data_loader
    accelerator.gather_for_metrics = state.gather_for_metrics
    return trainer


def _apply_memory_options(trainer, model, options: dict) -> None:
    from . import memory, patch

    def layers(flag):
        return None if flag is True else flag

    if options.get("offload_checkpointing") or options.get("attn_preserving_checkpointing"):
        for name in ("activation_checkpointing", "gradient_checkpointing"):  # transformers >= 5.24 / earlier
            if getattr(trainer.args, name, False):
                setattr(trainer.args, name, False)
    if options.get("fused_kernels"):
        patch.enable_fused_kernels(model)
    if options.get("offload_checkpointing"):
        memory.enable_offloaded_checkpointing(model, layers(options["offload_checkpointing"]))
    if options.get("attn_preserving_checkpointing"):
        memory.enable_attention_preserving_checkpointing(model, layers(options["attn_preserving_checkpointing"]))
    if options.get("tiled_mlp"):
        memory.enable_tiled_mlp(model, tile_size=options.get("tiled_mlp_tile_size"))
    if options.get("low_memory_rmsnorm"):
        patch.enable_low_memory_rmsnorm(model)


class _TokensOncePerReplica(TrainerCallback):
    """transformers adds every rank's input tokens to ``state.num_input_tokens_seen``; the ranks of an SP group hold
    the same rows, so each step's increase is ``sp`` times the tokens trained on. Divided at the step's end
    (callbacks run before the step is logged or saved; a count resumed from a checkpoint is already right)."""

    def __init__(self, sp: int):
        self.sp = sp

    def on_train_begin(self, args, state, control, **kwargs):  # prepare_trainer refuses a train() already begun
        self.mark = state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        state.num_input_tokens_seen = self.mark + (state.num_input_tokens_seen - self.mark) // self.sp
        self.mark = state.num_input_tokens_seen


def _install_loss_forward(causal_lm, chunk_size: int) -> None:
    """``causal_lm(input_ids=, position_ids=, easy_context_targets=)`` returns this rank's cross-entropy sum as
    ``.loss`` (decoder + chunked head, no logits); any other call is the model's own forward (generation, saving)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from ..loss import head_cross_entropy_sum

    original = causal_lm.forward

    @functools.wraps(original)  # the signature Trainer reads to keep dataset columns
    def forward(*args, easy_context_targets=None, **kwargs):
        if easy_context_targets is None:
            return original(*args, **kwargs)
        # a PEFT wrapper passes its own arguments down, as None
        hidden = causal_lm.base_model(input_ids=kwargs["input_ids"], position_ids=kwargs["position_ids"],
                                      use_cache=False)[0]
        # as the head's own forward: FSDP (any wrap policy) and ZeRO-3 gather the head for it
        local_sum = head_cross_entropy_sum(causal_lm.get_output_embeddings(), hidden, easy_context_targets,
                                           chunk_size=chunk_size)
        return CausalLMOutputWithPast(loss=local_sum)

    causal_lm.forward = forward


class _State:
    """What :func:`prepare_trainer` installs on one trainer: its settings and the overriding methods."""

    def __init__(self, trainer, config, rank, world, sp, chunk_size, balance_documents):
        self.trainer, self.config, self.rank, self.world, self.sp = trainer, config, rank, world, sp
        self.replicas, self.replica = world // sp, rank // sp
        self.chunk_size, self.balance_documents = chunk_size, balance_documents
        self.tokens, self.since = 0, None

    # ---------------------------------------------------------------- collectives
    def _all_reduce(self, values: list[float], group=None) -> list[float]:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return values
        device = self.trainer.accelerator.device if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor(values, dtype=torch.float64, device=device)  # float64: counts exact far beyond 2^24
        dist.all_reduce(t, group=group)
        return t.tolist()

    def _sp_group(self):
        from ..attention.comm import get_sp_group

        return get_sp_group(self.sp) if self.world > 1 else None

    # ---------------------------------------------------------------- data
    def prepare_data_loader(self, data_loader, device_placement=None, slice_fn_for_dispatch=None):
        """``Accelerator.prepare_data_loader`` by SP group: :func:`easy_context.prepare_dataloader`."""
        from ..api import prepare_dataloader

        return prepare_dataloader(self.config, data_loader, self.trainer.accelerator)

    def gather_for_metrics(self, input_data, use_gather_object=False):
        """``Accelerator.gather_for_metrics`` with one copy per replica (the SP ranks of a replica hold the same
        per-batch values); the padded tail of the last batch is cut as accelerate does."""
        from accelerate.utils import gather, gather_object, recursively_apply

        if use_gather_object:
            data = gather_object(input_data)[::self.sp]  # one object per rank
        else:
            def one_per_replica(t):  # (world * n, ...) rank-major -> (replicas * n, ...)
                return t.reshape(self.world, -1, *t.shape[1:])[::self.sp].reshape(-1, *t.shape[1:])

            data = recursively_apply(one_per_replica, gather(input_data))
        state = self.trainer.accelerator.gradient_state
        remainder = getattr(state, "remainder", -1)
        if state.end_of_dataloader and remainder and remainder > 0:
            cut = (lambda t: t[:remainder])
            return cut(data) if use_gather_object else recursively_apply(cut, data)
        return data

    @staticmethod
    def _targets(batch) -> torch.Tensor:
        """The targets of full rows as transformers' causal LM loss takes them: ``shift_labels`` as given, else
        ``labels`` shifted by one (the last position -100)."""
        if batch.get("shift_labels") is not None:
            return batch["shift_labels"]
        labels = batch.get("labels")
        if labels is None:
            _fail("the batch has no 'labels': the collator must give them (-100 where no loss), e.g. "
                  "DataCollatorForLanguageModeling(tokenizer, mlm=False) or DataCollatorWithFlattening")
        from ..data import shift_targets

        return shift_targets(labels)  # no positions: a packed collator already put -100 at each document start

    @staticmethod
    def _padded(batch) -> bool:
        mask = batch.get("attention_mask")
        return mask is not None and not bool(mask.bool().all())

    def _padding_error(self):
        _fail(f"a batch has an attention_mask with zeros (padding), which the sequence-parallel attention cannot "
              f"apply (it attends causally over the whole row); {_FIX_PADDING}")

    def get_batch_samples(self, original, epoch_iterator, num_batches, device):
        """The accumulated batch and its valid-target count ``num_items_in_batch``, once per replica: over all
        replicas (``average_tokens_across_devices``) or this replica's. One all-reduce, which also makes a padded
        batch an error on every rank at once."""
        batches, _ = original(epoch_iterator, num_batches, device)
        if self.since is None:
            self.since = time.perf_counter()
        counts = [0.0] * (self.replicas + 1)  # [valid targets of each replica, padded batches]
        counts[self.replica] = float(sum(int(self._targets(b).ne(-100).sum()) for b in batches)) / self.sp
        counts[-1] = float(sum(self._padded(b) for b in batches))
        counts = self._all_reduce(counts)
        if counts[-1]:
            self._padding_error()
        total = counts[self.replica] if not self.trainer.args.average_tokens_across_devices else sum(counts[:-1])
        return batches, torch.tensor(round(total), dtype=torch.long, device=device)

    # ---------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """``Trainer.compute_loss`` on this rank's shard (see the module docstring for the scaling)."""
        from ..api import prepare_seq_parallel_inputs

        training = model.training and torch.is_grad_enabled()
        if not training and self._all_reduce([float(self._padded(inputs))])[0]:
            self._padding_error()
        other = sorted(k for k, v in inputs.items() if v is not None and k not in _DERIVED_KEYS and k not in
                       ("input_ids", "labels", "shift_labels", "position_ids", "attention_mask"))
        if other:
            _fail(f"the batch holds {', '.join(other)}, which the sequence-parallel forward does not take "
                  "(input_ids, labels or shift_labels, position_ids for packed rows); remove them in the collator")
        ids, positions = inputs["input_ids"], inputs.get("position_ids")
        targets = self._targets(inputs)
        balance = self.balance_documents and positions is not None and bool((positions[:, 1:] == 0).any())
        p = prepare_seq_parallel_inputs(self.config, ids, positions, targets, self.rank, self.world, ids.device,
                                        balance_documents=balance)
        outputs = model(input_ids=p["local_input_ids"], position_ids=p["local_position_ids"],
                        easy_context_targets=p["local_target_ids"])
        local_sum = outputs.loss
        if training:
            self.tokens += ids.numel()
            average = self.trainer.args.average_tokens_across_devices
            if num_items_in_batch is None:  # compute_loss called on its own: this micro-batch is the whole batch
                counts = [0.0] * self.replicas
                counts[self.replica] = float(targets.ne(-100).sum()) / self.sp
                counts = self._all_reduce(counts)
                num_items_in_batch = counts[self.replica] if not average else sum(counts)
            scale = (self.world if average else self.sp) / max(float(num_items_in_batch), 1.0)
            loss = local_sum * scale
        else:
            from ..loss import group_token_mean

            count = p["local_target_ids"].ne(-100).sum()
            loss = group_token_mean(local_sum, count, group=self._sp_group()).global_loss
        outputs.loss = loss
        return (loss, outputs) if return_outputs else loss

    # ---------------------------------------------------------------- logs
    def log(self, original, logs, *args, **kwargs):
        """``Trainer.log`` plus ``tokens_per_second`` on training logs (every rank logs: one all-reduce)."""
        if "loss" in logs and self.since is not None:
            tokens = self._all_reduce([float(self.tokens) / self.sp])[0]
            now = time.perf_counter()
            logs["tokens_per_second"] = round(tokens / max(now - self.since, 1e-9), 2)
            self.tokens, self.since = 0, now
        return original(logs, *args, **kwargs)


__all__ = ["prepare_trainer"]
