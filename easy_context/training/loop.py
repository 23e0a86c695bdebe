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
from .checkpoints import LOG_FILE, CheckpointWriteError, save_checkpoint, save_model
from .config import TrainConfig, from_namespace, parse_config
from .deepspeed import describe_attention, describe_precision, mixed_precision_of, prepare_optimization
from .models import CausalLMWithShardedLoss, apply_memory_features, config_for, load_causal_lm
from .resume import data_fingerprint, find_resume_checkpoint, finish_resume, prepare_output_dir, run_settings
from .sharding import apply_fsdp2, apply_lora, full_tensor, load_sharded, save_sharded

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
        loader = prepare_dataloader(cfg.sp, loader, accelerator)
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
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs

    # cpu=True makes accelerate drop a DeepSpeed launch's plugin silently (plain DDP): without CUDA a DeepSpeed launch
    # (DS_ACCELERATOR=cpu) is left to pick the CPU itself
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    return Accelerator(
        cpu=cfg.cpu or (not torch.cuda.is_available() and not deepspeed), mixed_precision=mixed_precision_of(cfg),
        # sync purely every N micro-batches: an epoch end must not force an early step (resume would drift)
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=cfg.gradient_accumulate_every,
                                                                sync_with_dataloader=False),
        log_with=None if cfg.report_to == "none" else cfg.report_to, project_dir=cfg.output_dir,
        # a rank that stops arriving fails the others' collectives after this long (when accelerate creates the group)
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.collective_timeout))])


def _grad_norm(accelerator, wrapper, max_norm: float):
    """The global gradient norm before clipping (all ranks hold the reduced gradients: the same number on each);
    the gradients are clipped to ``max_norm`` (> 0) only when it is finite, so non-finite ones stay for
    :func:`_first_nonfinite` to name. The same arithmetic as ``torch.nn.utils.clip_grad_norm_``."""
    accelerator.unscale_gradients()  # fp16: the scaler's gradients, unscaled once
    params = [p for p in wrapper.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if max_norm > 0 and torch.isfinite(norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return full_tensor(norm)  # FSDP2: a DTensor over the gradient shards


def _first_nonfinite(wrapper) -> str:
    """The first parameter (in the model's order) whose gradient, else whose value, is not finite."""
    for kind in ("gradient", "value"):
        for name, p in wrapper.named_parameters():
            t = full_tensor(p.grad if kind == "gradient" else p.detach())  # FSDP2: every rank gathers alike
            if t is not None and not torch.isfinite(t).all():
                return f"{name.removeprefix('module.').removeprefix('model.')} ({kind})"  # the causal LM's name
    return "none (each gradient is finite: their sum of squares overflows)"


def _nonfinite_error(cfg, steps: list[int], where: str, accelerator, applied: bool) -> FloatingPointError:
    fp16 = (" Under fp16 the loss scaler overflows for a few steps while it settles: raise --max-nonfinite-steps."
            if accelerator.mixed_precision == "fp16" else "")
    span = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"
    if applied:
        what = ("the DeepSpeed engine applied the update (it skips only fp16 overflows), so the weights are no longer "
                "trustworthy; resume from the last checkpoint")
    else:
        what = (f"{len(steps)} consecutive step(s) with a non-finite gradient norm or loss (--max-nonfinite-steps "
                f"{cfg.max_nonfinite_steps}); their updates were skipped")
    return FloatingPointError(f"{span}: {what}. First non-finite parameter: {where}. Lower --learning-rate, train in "
                              f"bf16 rather than fp16 (--mixed-precision bf16), or check the data.{fp16}")


def _finite_or_none(x: float) -> float | None:
    """JSON has no Infinity/NaN: a non-finite number is logged as null (with ``"nonfinite": true``)."""
    return x if math.isfinite(x) else None


class CollectiveTimeout(RuntimeError):
    """A collective waited longer than ``--collective-timeout``: a rank stopped arriving (named where possible)."""


ROLL_CALL = "easy_context/collective_timeout/"


def _timed_out(e: BaseException) -> bool:
    """Whether a process-group error is a timeout (gloo: "Timed out waiting 3000ms for recv operation"; NCCL, when
    its watchdog leaves the error to Python: "Watchdog caught collective operation timeout")."""
    return isinstance(e, RuntimeError) and any(m in str(e).lower() for m in ("timed out", "timeout"))


def _absent_ranks(rank: int, world: int, wait_s: float) -> list[int] | None:
    """Roll call after a timeout: each rank that timed out says so in the launcher's TCP store (``MASTER_ADDR:
    MASTER_PORT``) and waits up to ``wait_s`` for the others; the ranks that never answer are the stuck ones (a rank
    blocked on a stuck one times out itself and answers). None: the store cannot be reached (another rendezvous)."""
    from datetime import timedelta

    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=max(wait_s, 1.0)))
        store.set(f"{ROLL_CALL}{rank}", "1")
        deadline = time.monotonic() + wait_s
        while True:
            absent = [r for r in range(world) if not store.check([f"{ROLL_CALL}{r}"])]
            if not absent or time.monotonic() > deadline:
                return absent
            time.sleep(0.2)
    except (KeyError, ValueError, RuntimeError):  # no env, or the store is gone (its host rank is the stuck one)
        return None


def _timeout_error(cfg: TrainConfig, e: BaseException) -> CollectiveTimeout:
    rank, world = rank_world()
    absent = _absent_ranks(rank, world, min(cfg.collective_timeout, 60.0))
    if absent:
        who = (f"rank(s) {', '.join(map(str, absent))} of {world} did not arrive (stopped, hung or dead: see "
               "its own output)")
    elif absent == []:
        who = "every rank timed out waiting (ranks calling different collectives?)"
    else:
        who = "a rank did not arrive (which one could not be determined: no launcher store at MASTER_ADDR)"
    return CollectiveTimeout(f"rank {rank}: a collective waited longer than --collective-timeout "
                             f"{cfg.collective_timeout:g} s: {who}. If a rank is only slow (a checkpoint save on a "
                             f"slow disk, a very long step), raise --collective-timeout. ({e})")


def train(cfg: TrainConfig) -> dict:
    """Run the training described by ``cfg`` (or by parsed train.py flags); return ``{"losses", "grad_norms",
    "model"}``.

    ``losses`` maps each optimizer step done in this call to its logged global loss, ``grad_norms`` to the global
    gradient norm before clipping; ``model`` is the unwrapped causal LM (weights as trained, SP attention still
    active).

    Raises:
        CollectiveTimeout: a collective waited longer than ``--collective-timeout`` (the message names the ranks
            that did not arrive, where the launcher's store tells). FloatingPointError: ``--max-nonfinite-steps``
            consecutive non-finite steps. CheckpointWriteError: a checkpoint could not be written.
    """
    cfg = from_namespace(cfg)
    try:
        return _train(cfg)
    except RuntimeError as e:
        if dist.is_available() and dist.is_initialized() and _timed_out(e) and not isinstance(e, CollectiveTimeout):
            raise _timeout_error(cfg, e) from e
        raise


def _train(cfg: TrainConfig) -> dict:
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from ..api import apply_seq_parallel_monkey_patch, prepare_seq_parallel_inputs

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
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        cfg.dtype, torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    settings = run_settings(cfg, replicas=replicas, packed=packed, dtype=dtype,
                            mixed_precision=accelerator.mixed_precision, fingerprint=data_fingerprint(dataset))
    # the checkpoint's files, settings and the log are checked before any weights are loaded
    resume = find_resume_checkpoint(cfg, settings) if cfg.resume_from_checkpoint else None
    set_seed(cfg.seed)
    model = load_causal_lm(cfg.model, config, dtype, init_random=cfg.init_random)
    sp = cfg.sp  # the settings, parsed once for the patch and every micro-batch
    apply_seq_parallel_monkey_patch(sp, model)
    apply_memory_features(cfg, model)
    peft_model = apply_lora(cfg, model)  # None without --lora-r; else the adapters are in model itself
    wrapper = CausalLMWithShardedLoss(model, chunk_size=cfg.loss_chunk_size)
    if cfg.fsdp2:
        apply_fsdp2(wrapper, accelerator.device, accelerator.mixed_precision)
    wrapper, optimizer, scheduler = prepare_optimization(cfg, accelerator, wrapper)
    accelerator.print(describe_precision(accelerator, wrapper))
    kernel_line = describe_attention(accelerator, model, cfg.seq_algo, cfg.attn_backend)
    if kernel_line:
        accelerator.print(kernel_line)
    completed = 0
    if resume:
        path, completed = resume
        accelerator.load_state(path)
        if cfg.fsdp2:  # the model and optimizer shards (accelerate holds the schedule and RNG only)
            load_sharded(wrapper, optimizer, path)
        accelerator.print(f"resumed from {path} at step {completed}")
        finish_resume(cfg, path, completed)
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
    grad_norm, warned_balance, nonfinite, first_bad = None, False, [], None
    deepspeed = hasattr(wrapper, "get_global_grad_norm")
    wrapper.train()
    batches = micro_batches(cfg, dataset, accelerator, completed * cfg.gradient_accumulate_every, config.vocab_size)
    while completed < stop_at:
        batch = next(batches)
        ids, positions = batch["input_ids"], batch.get("position_ids")  # positions: packed documents, else None
        # the target of each document's last token is -100: nothing learns to predict the next document's start
        targets = shift_targets(batch.get("labels", ids), position_ids=positions)
        # packed rows under a ring: documents reordered so every rank gets the same attention work (same loss)
        prepared = prepare_seq_parallel_inputs(sp, ids, positions, targets, rank, world, accelerator.device,
                                               balance_documents=positions is not None)
        warning = None if warned_balance else balance_warning(prepared["work_balance"], cfg.seq_algo, sp)
        if warning:
            warned_balance = True
            accelerator.print(warning)
        with accelerator.accumulate(wrapper):
            out = wrapper(prepared["local_input_ids"], prepared["local_position_ids"], prepared["local_target_ids"])
            accelerator.backward(out.loss)  # under DeepSpeed this also steps the engine (clipping included)
            micro_losses.append(out.global_loss.item())
            skip = False
            if accelerator.sync_gradients and not deepspeed:
                grad_norm = _grad_norm(accelerator, wrapper, cfg.max_grad_norm)
                if not (torch.isfinite(grad_norm) and all(map(math.isfinite, micro_losses))):
                    if first_bad is None:
                        first_bad = _first_nonfinite(wrapper)
                    # skip the update and the schedule, as accelerate does when fp16's GradScaler skips a step (then
                    # the scaler's own step must run: it skips the update itself and lowers the scale)
                    skip = accelerator.scaler is None
            if not skip:
                optimizer.step()
                # fp16: the GradScaler skipped an overflowed step; our scheduler (not accelerate's) must skip it too
                skip = accelerator.sync_gradients and bool(getattr(optimizer, "step_was_skipped", False))
            optimizer.zero_grad()
        step_tokens += int(out.num_tokens)
        if not accelerator.sync_gradients:
            continue
        if deepspeed:  # the norm its step computed before clipping
            grad_norm = wrapper.get_global_grad_norm()
        if not skip:
            scheduler.step()  # under DeepSpeed a no-op wrapper: the engine has stepped it
        completed += 1
        loss = sum(micro_losses) / len(micro_losses)
        # the loss and the norm are global (the same on every rank), so every rank counts alike and all stop together
        if math.isfinite(loss) and (grad_norm is None or math.isfinite(float(grad_norm))):
            nonfinite, first_bad = [], None
        else:
            nonfinite.append(completed)
            if first_bad is None:
                first_bad = ("not named under DeepSpeed (its gradients are partitioned)" if deepspeed
                             else _first_nonfinite(wrapper))
        applied = bool(nonfinite) and deepspeed and accelerator.mixed_precision != "fp16"
        stop = applied or len(nonfinite) >= cfg.max_nonfinite_steps  # raised once this step is logged
        if step_tokens == 0 and rank == 0:
            warnings.warn(f"step {completed}: no target token in the whole batch (every label is -100): nothing was "
                          "learned from it")
        step_tokens = 0
        elapsed, tic, micro_losses = time.perf_counter() - tic, time.perf_counter(), []
        record = {"step": completed, "loss": _finite_or_none(loss), "ppl": _finite_or_none(math.exp(min(loss, 50.0))),
                  "lr": scheduler.get_last_lr()[0], "tokens_per_second": tokens_per_step / elapsed}
        if grad_norm is not None:  # the global gradient norm before clipping
            grad_norms[completed] = float(grad_norm)
            record["grad_norm"] = _finite_or_none(float(grad_norm))
        if nonfinite and nonfinite[-1] == completed:
            record["nonfinite"] = True  # the update of this step was skipped
        losses[completed] = loss
        if cfg.report_to != "none":
            accelerator.log(record, step=completed)
        if rank == 0:  # (accelerate's is_main_process is True on every rank of a DeepSpeed launch on CPU)
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if stop:
            raise _nonfinite_error(cfg, nonfinite, first_bad, accelerator, applied)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", ppl=f"{record['ppl']:.2f}", tok_s=f"{record['tokens_per_second']:.0f}")
        if cfg.checkpointing_steps and completed % cfg.checkpointing_steps == 0:
            save_checkpoint(accelerator, cfg.output_dir, completed, keep=cfg.checkpoints_total_limit,
                            metadata={"settings": settings},
                            save_more=(lambda d: save_sharded(wrapper, optimizer, d)) if cfg.fsdp2 else None)
    bar.close()
    unwrapped = accelerator.unwrap_model(wrapper).model
    if completed >= cfg.max_train_steps and cfg.save_model:
        save_model(accelerator, wrapper, cfg, peft_model)
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
    except (FloatingPointError, CheckpointWriteError) as e:  # the same on every rank: said once
        if rank_world()[0] == 0:
            print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except CollectiveTimeout as e:  # said by every rank that waited (rank 0 may be the stuck one)
        print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        os._exit(1)  # the group is broken: tearing it down would wait on the stuck rank
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


__all__ = ["LOG_FILE", "CollectiveTimeout", "make_accelerator", "micro_batches", "train", "main"]
