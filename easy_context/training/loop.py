"""The training loop behind ``train.py``: model, data, accelerate (DDP or DeepSpeed ZeRO-3), checkpoints, logs.

How the loss reaches data parallelism. The model is wrapped in :class:`CausalLMWithShardedLoss`, whose forward runs
the decoder and returns :func:`easy_context.loss.sharded_cross_entropy` of the final hidden states against this
rank's targets (full-vocabulary logits never exist). ``accelerator.prepare`` wraps *that* module, so DDP's forward
(which arms its gradient all-reduce hooks) and DeepSpeed ZeRO-3's module hooks (which gather partitioned
parameters) run around the whole computation; calling ``model.model(...)`` on an unwrapped module would bypass
both. The LM head's weight is used by the wrapper rather than by ``lm_head.forward``, so under ZeRO-3 it is
registered as an external parameter of the wrapper (DeepSpeed's documented way to gather such a parameter).

Scaling. The loss group is the whole world: rank r returns ``W * S_r / N`` (``S_r`` its CE sum, ``N`` the valid
targets of all ranks, ``W`` the world size). DDP averages gradients over all W ranks, and so does DeepSpeed (ZeRO
divides the reduced gradients by its data-parallel world, which is W because DeepSpeed knows nothing of our sequence
parallelism); both therefore apply the gradient of the token mean over the global batch, for any mix of DP replicas
and SP groups. ``global_loss`` (that token mean, identical on all ranks) is what is logged. Gradient accumulation
divides each micro-batch's loss by the number of micro-batches (accelerate / DeepSpeed): the update is the mean of
the micro-batch token means.

Packed documents. When the dataset has a ``position_ids`` column (``prepare_data.py --packing documents`` / ``--sft``;
``--packing auto|documents``), the batch's positions restart at 0 at every document. They go to
``prepare_seq_parallel_inputs`` and on to the model, and :func:`~easy_context.data.shift_targets` sets the target of
every document's last token to -100. Under ``data_parallel`` the decoder is transformers' own: called with
``use_cache=False`` and no ``attention_mask`` (as :class:`CausalLMWithShardedLoss` does), transformers (>= 4.54,
``masking_utils.find_packed_sequence_indices``) reads restarting positions as packed sequences and builds a
block-diagonal causal mask for sdpa and eager attention, so each token attends only to its own document. The
loss stays the exact token mean over the valid targets (the boundary targets are simply not counted).

Data order and resume. Epoch ``e`` visits the dataset in the permutation of ``torch.Generator().manual_seed(seed +
e)``; ranks of an SP group read the same rows, DP replicas alternate rows (accelerate's batch sharding). A checkpoint
at optimizer step ``k`` holds accelerate's state (model, optimizer, the LR scheduler, RNG; DeepSpeed's own
checkpoint under ZeRO-3) plus ``k``; resuming reloads it and skips the ``k * gradient_accumulate_every`` micro-batches
already consumed, so the continued run sees the same batches and produces the same loss curve.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings

import torch
import torch.distributed as dist

from ..attention.registry import check_heads
from ..data import FixedLengthCollator, load_train_dataset, shift_targets
from ..utils import exit_with_parent, rank_world
from .checkpoints import LOG_FILE, STATE_FILE, latest_checkpoint, prepare_output_dir, save_checkpoint, save_model
from .config import TrainConfig, from_namespace, parse_config
from .deepspeed import describe_attention, describe_precision, mixed_precision_of, prepare_optimization
from .models import CausalLMWithShardedLoss, apply_memory_features, config_for, load_causal_lm

# packed rows: above this busiest-rank / mean attention work after reordering documents, train.py says once which
# algorithm balances them (issue 15's goal)
BALANCE_WARN = 1.1


def balance_warning(work_balance: float | None, seq_algo: str, sp: int) -> str | None:
    """What train.py says (once) when reordering documents left a ring's ranks off balance, naming the fix."""
    if work_balance is None or work_balance <= BALANCE_WARN:
        return None
    return (f"warning: packed rows: after reordering documents the busiest ring rank still does {work_balance:.2f}x "
            f"the mean attention work ({seq_algo} over {sp} ranks: documents longer than a zigzag chunk cannot be "
            "spread evenly); usp_attn with --ring-degree 2, or ulysses_attn, balances any mix of documents "
            "(bench/RESULTS.md 10f)")

def micro_batches(cfg: TrainConfig, dataset, accelerator, start: int, vocab_size: int | None = None):
    """Endless micro-batches (``input_ids`` ``(batch, seq)``; ``labels`` and ``position_ids`` if the dataset has
    them) in the documented order, skipping the first ``start`` of them; token ids are checked against
    ``vocab_size``, position ids by :func:`easy_context.data.check_position_ids`."""
    from torch.utils.data import DataLoader, RandomSampler

    from ..api import prepare_dataloader

    epoch = 0
    while True:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(cfg.seed + epoch))
        loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                            collate_fn=FixedLengthCollator(cfg.seq_length, vocab_size))
        loader = prepare_dataloader(cfg.seq_algo, loader, accelerator, sp_size=cfg.sp_size)
        if len(loader) == 0:
            raise ValueError(f"the dataset has {len(dataset)} rows: fewer than one batch per data-parallel replica")
        if start >= len(loader):
            start -= len(loader)
        else:
            yield from (accelerator.skip_first_batches(loader, start) if start else loader)
            start = 0
        epoch += 1


def make_accelerator(cfg: TrainConfig):
    """The ``accelerate.Accelerator`` of a run: device, mixed precision, accumulation and trackers of ``cfg``."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin

    # cpu=True makes accelerate drop a DeepSpeed launch's plugin silently (plain DDP): without CUDA a DeepSpeed launch
    # (DS_ACCELERATOR=cpu) is left to pick the CPU itself
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    return Accelerator(
        cpu=cfg.cpu or (not torch.cuda.is_available() and not deepspeed), mixed_precision=mixed_precision_of(cfg),
        # sync purely every N micro-batches: an epoch end must not force an early step (resume would drift)
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=cfg.gradient_accumulate_every,
                                                                sync_with_dataloader=False),
        log_with=None if cfg.report_to == "none" else cfg.report_to, project_dir=cfg.output_dir)


def _resume(cfg: TrainConfig, accelerator) -> int:
    """Load ``--resume-from-checkpoint``; return its optimizer step and drop later steps from the log (a killed
    run logged them after its checkpoint: they are done again)."""
    path = latest_checkpoint(cfg.output_dir) if cfg.resume_from_checkpoint == "latest" else cfg.resume_from_checkpoint
    accelerator.load_state(path)
    with open(os.path.join(path, STATE_FILE)) as f:
        completed = json.load(f)["completed_steps"]
    accelerator.print(f"resumed from {path} at step {completed}")
    log_path = os.path.join(cfg.output_dir, LOG_FILE)
    if rank_world()[0] == 0 and os.path.exists(log_path):
        with open(log_path) as f:
            kept = [line for line in f if json.loads(line)["step"] <= completed]
        with open(log_path, "w") as f:
            f.writelines(kept)
    return completed


def train(cfg: TrainConfig) -> dict:
    """Run the training described by ``cfg`` (or by parsed train.py flags); return ``{"losses", "grad_norms",
    "model"}``.

    ``losses`` maps each optimizer step done in this call to its logged global loss, ``grad_norms`` to the global
    gradient norm before clipping (when clipping is on, or under DeepSpeed); ``model`` is the unwrapped
    causal LM (weights as trained, SP attention still active).
    """
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from ..api import apply_seq_parallel_monkey_patch, prepare_seq_parallel_inputs

    cfg = from_namespace(cfg)
    accelerator = make_accelerator(cfg)
    rank, world = rank_world((accelerator.process_index, accelerator.num_processes))
    # every check that needs no weights comes first: flags, processes, output folder, model shape, data
    cfg.check_world(world)
    if cfg.sp_degree != 1 and not dist.is_initialized():
        raise ValueError(f"--seq-algo {cfg.seq_algo} shards each sequence over a process group, and this is a single "
                         "process without one: launch with `accelerate launch --config_file "
                         "accelerate_configs/<config>.yaml train.py ...` (or torchrun), or pass --seq-algo "
                         "data_parallel to train in one process")
    prepare_output_dir(cfg)
    config = config_for(cfg)
    sp = cfg.sp_degree or world
    check_heads(cfg.seq_algo, config.num_attention_heads,
                getattr(config, "num_key_value_heads", None) or config.num_attention_heads, sp,
                ring_degree=cfg.ring_degree)
    replicas = world // sp
    tokens_per_step = cfg.batch_size * cfg.seq_length * cfg.gradient_accumulate_every * replicas
    dataset = load_train_dataset(cfg.dataset, seq_length=cfg.seq_length, vocab_size=config.vocab_size,
                                 num_samples=cfg.max_train_steps * cfg.batch_size * cfg.gradient_accumulate_every
                                 * replicas, seed=cfg.seed, packing=cfg.packing)
    packed = "position_ids" in dataset.column_names
    if len(dataset) < cfg.batch_size * replicas:
        raise ValueError(f"the dataset has {len(dataset)} rows: fewer than one batch ({cfg.batch_size} rows) for each "
                         f"of the {replicas} data-parallel replicas")
    set_seed(cfg.seed)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        cfg.dtype, torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    model = load_causal_lm(cfg.model, config, dtype, init_random=cfg.init_random)
    apply_seq_parallel_monkey_patch(cfg.seq_algo, model, sp_size=cfg.sp_size, ring_degree=cfg.ring_degree,
                                    backend=cfg.attn_backend)
    apply_memory_features(cfg, model)
    wrapper = CausalLMWithShardedLoss(model, chunk_size=cfg.loss_chunk_size)
    wrapper, optimizer, scheduler = prepare_optimization(cfg, accelerator, wrapper)
    accelerator.print(describe_precision(accelerator, wrapper))
    kernel_line = describe_attention(accelerator, model, cfg.seq_algo, cfg.attn_backend)
    if kernel_line:
        accelerator.print(kernel_line)
    completed = _resume(cfg, accelerator) if cfg.resume_from_checkpoint else 0
    if cfg.report_to != "none":
        accelerator.init_trackers(cfg.project_name, config={k: v for k, v in vars(cfg).items()
                                                             if isinstance(v, (int, float, str, bool))})
    accelerator.print(f"{world} processes, {cfg.seq_algo}, {replicas} data-parallel replica(s) x {sp} sequence-"
                      f"parallel rank(s); {len(dataset)} samples{' of packed documents' if packed else ''}; "
                      f"{tokens_per_step} tokens per step")
    log_path = os.path.join(cfg.output_dir, LOG_FILE)
    bar = tqdm(total=cfg.max_train_steps, initial=completed, disable=rank != 0)
    stop_at = min(cfg.max_train_steps, cfg.stop_after_steps or cfg.max_train_steps)
    losses, grad_norms, micro_losses, step_tokens, tic = {}, {}, [], 0, time.perf_counter()
    grad_norm, warned_balance = None, False
    wrapper.train()
    batches = micro_batches(cfg, dataset, accelerator, completed * cfg.gradient_accumulate_every, config.vocab_size)
    while completed < stop_at:
        batch = next(batches)
        ids, positions = batch["input_ids"], batch.get("position_ids")  # positions: packed documents, else None
        # the target of each document's last token is -100: nothing learns to predict the next document's start
        targets = shift_targets(batch.get("labels", ids), position_ids=positions)
        # packed rows under a ring: documents reordered so every rank gets the same attention work (same loss)
        prepared = prepare_seq_parallel_inputs(cfg.seq_algo, ids, positions, targets, rank, world, accelerator.device,
                                               sp_size=cfg.sp_size, ring_degree=cfg.ring_degree,
                                               balance_documents=positions is not None)
        warning = None if warned_balance else balance_warning(prepared["work_balance"], cfg.seq_algo, sp)
        if warning:
            warned_balance = True
            accelerator.print(warning)
        with accelerator.accumulate(wrapper):
            out = wrapper(prepared["local_input_ids"], prepared["local_position_ids"], prepared["local_target_ids"])
            accelerator.backward(out.loss)  # under DeepSpeed this also steps the engine (clipping included)
            if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(wrapper.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
        micro_losses.append(out.global_loss.item())
        step_tokens += int(out.num_tokens)
        if not accelerator.sync_gradients:
            continue
        if hasattr(wrapper, "get_global_grad_norm"):  # DeepSpeed: the norm its step computed before clipping
            grad_norm = wrapper.get_global_grad_norm()
        scheduler.step()  # under DeepSpeed a no-op wrapper: the engine has stepped it
        completed += 1
        loss = sum(micro_losses) / len(micro_losses)
        if not math.isfinite(loss):  # the same global value on every rank: all stop together
            raise FloatingPointError(f"step {completed}: the loss is {loss}; lower --learning-rate, train in bf16 "
                                     "rather than fp16 (--mixed-precision bf16), or check the data")
        if step_tokens == 0 and rank == 0:
            warnings.warn(f"step {completed}: no target token in the whole batch (every label is -100): nothing was "
                          "learned from it")
        step_tokens = 0
        elapsed, tic, micro_losses = time.perf_counter() - tic, time.perf_counter(), []
        record = {"step": completed, "loss": loss, "ppl": math.exp(min(loss, 50.0)),
                  "lr": scheduler.get_last_lr()[0], "tokens_per_second": tokens_per_step / elapsed}
        if grad_norm is not None:  # the global gradient norm before clipping
            record["grad_norm"] = grad_norms[completed] = float(grad_norm)
        losses[completed] = loss
        if cfg.report_to != "none":
            accelerator.log(record, step=completed)
        if rank == 0:  # (accelerate's is_main_process is True on every rank of a DeepSpeed launch on CPU)
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", ppl=f"{record['ppl']:.2f}", tok_s=f"{record['tokens_per_second']:.0f}")
        if cfg.checkpointing_steps and completed % cfg.checkpointing_steps == 0:
            save_checkpoint(accelerator, cfg.output_dir, completed, keep=cfg.checkpoints_total_limit)
    bar.close()
    unwrapped = accelerator.unwrap_model(wrapper).model
    if completed >= cfg.max_train_steps and cfg.save_model:
        save_model(accelerator, wrapper, cfg)
    for tracker in accelerator.trackers:  # not end_training(): that also destroys the caller's process group
        tracker.finish()
    return {"losses": losses, "grad_norms": grad_norms, "model": unwrapped}


def main(argv=None) -> None:
    """``train.py``: parse the flags, train, then take down the process group accelerate created.

    A bad flag, model or dataset ends the process with one line on standard error (from rank 0 only) and exit
    status 2, instead of a traceback per rank; the process also ends when its launcher dies (Linux)."""
    import sys

    exit_with_parent()
    try:
        train(parse_config(argv))
    except (ValueError, FileNotFoundError) as e:
        if rank_world()[0] == 0:
            print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


__all__ = ["LOG_FILE", "make_accelerator", "micro_batches", "train", "main"]
