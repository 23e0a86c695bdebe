"""Resuming a run safely: which checkpoint, whether it continues the same training, and the output folder.

A checkpoint's ``trainer_state.json`` (:mod:`checkpoints` writes it last, after every data file has been fsynced)
records the step, every file's size and sha256, the run's result-changing settings (:func:`run_settings`) and a
fingerprint of its data (:func:`data_fingerprint`). Resuming (:func:`find_resume_checkpoint`, on rank 0, its answer
broadcast) checks all of them before any weights are loaded:

- a damaged checkpoint (a file missing, of another size or hash, or an unreadable safetensors header) is skipped
  with a warning under ``latest`` (the previous good one is used) and refused by name;
- a changed setting is refused, listing each one (old -> new) and the fix;
- a torn last line of ``train_log.jsonl`` (a kill while it was written) is dropped with a warning, a damaged line
  before the last is refused.

After the state is loaded (:func:`finish_resume`), the checkpoints of later steps are *retired*: renamed
``step_<k>.retired-<UTC time>``, which ``latest`` never picks, so a resumed run's chain is the one ``latest``
continues, and the abandoned run's checkpoints are kept.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings

import torch
import torch.distributed as dist

from ..utils import rank_world
from .checkpoints import (
    CHECKPOINT_PREFIX,
    LOG_FILE,
    RETIRED,
    checkpoint_problem,
    checkpoint_steps,
    fsync_dir,
    latest_checkpoint,
    read_state,
)

FINGERPRINT_ROWS = 16  # rows of the dataset (evenly spaced, first and last included) in its fingerprint
_RESUME_FIX = ("restore the flag(s), or start afresh with --overwrite-output-dir (its log and checkpoints are "
               "deleted) or another --output-dir")


def data_fingerprint(dataset) -> str:
    """sha256 of a dataset's row count, column names and :data:`FINGERPRINT_ROWS` evenly spaced rows (the first and
    last included): cheap at any size, and another dataset, another tokenisation or another number of rows (the
    synthetic dataset's size follows --max-train-steps) changes it."""
    h = hashlib.sha256(json.dumps([len(dataset), sorted(dataset.column_names)]).encode())
    n = len(dataset)
    for i in sorted({(n - 1) * j // (FINGERPRINT_ROWS - 1) for j in range(FINGERPRINT_ROWS)} if n else ()):
        row = dataset[i]
        for column in sorted(row):
            h.update(torch.as_tensor(row[column], dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def run_settings(cfg, *, replicas: int, packed: bool, dtype, mixed_precision: str, fingerprint: str) -> dict:
    """The settings that change a run's results, as a checkpoint records them and a resume compares them.

    Not here, because changing them is exact (the loss curve stays the same up to summation order, tested): the
    number of processes as long as the rows per micro-batch stay the same, the sequence-parallel algorithm
    (data_parallel included: it trains the same rows), ``--sp-size`` / ``--ring-degree`` at the same rows,
    ``--attn-backend``, ``--loss-chunk-size`` and the memory features. Nor the run's bookkeeping (checkpoint
    interval and limit, logs, ``--stop-after-steps``, ``--collective-timeout``, ``--max-nonfinite-steps``).
    """
    settings = {
        "--model": cfg.model, "--model-config": cfg.model_config, "--vocab-size": cfg.vocab_size,
        "--rope-theta": cfg.rope_theta, "--dtype": str(dtype).removeprefix("torch."),
        "--mixed-precision": mixed_precision, "--seq-length": cfg.seq_length,
        "--packing (documents used)": packed, "--seed": cfg.seed,
        # data order: each micro-batch is batch_size rows of each of the data-parallel replicas
        "rows per micro-batch (--batch-size x data-parallel replicas)": cfg.batch_size * replicas,
        "--gradient-accumulate-every": cfg.gradient_accumulate_every, "--learning-rate": cfg.learning_rate,
        "--lr-schedule": cfg.lr_schedule, "--warmup-steps": cfg.warmup_steps, "--max-train-steps": cfg.max_train_steps,
        "--weight-decay": cfg.weight_decay, "--adam-betas": list(cfg.adam_betas), "--adam-eps": cfg.adam_eps,
        "--max-grad-norm": cfg.max_grad_norm, "data (--dataset; fingerprint)": f"{cfg.dataset} [{fingerprint[:16]}]",
    }
    # recorded only when on, so checkpoints written before these flags existed still resume
    if cfg.fsdp2:
        settings["--fsdp2"] = True
    if cfg.lora_r is not None:  # another adapter is another model
        settings.update({"--lora-r": cfg.lora_r, "--lora-alpha": cfg.lora_alpha, "--lora-dropout": cfg.lora_dropout,
                         "--lora-target-modules": cfg.lora_target_modules})
    return json.loads(json.dumps(settings))  # as the state file will hold them (tuples -> lists)


def settings_changes(old: dict, new: dict) -> list[str]:
    """``"<setting>: old -> new"`` for each setting that differs; the dataset's path may change if its content
    (fingerprint) does not."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "(not recorded)"), new.get(key, "(not recorded)")
        if key.startswith("data ") and isinstance(a, str) and isinstance(b, str):
            if a.rsplit(" ", 1)[-1] == b.rsplit(" ", 1)[-1]:
                continue
        elif a == b:
            continue
        changes.append(f"{key}: {a} -> {b}")
    return changes


def read_log(path: str) -> list[tuple[str, dict]]:
    """The records of ``train_log.jsonl`` (``(line, record)``). A torn last line (the run was killed while writing
    it) is dropped with a warning naming the file.

    Raises:
        ValueError: a line before the last is not a record (naming the file and line, and the fix).
    """
    with open(path, "rb") as f:
        lines = f.read().decode("utf-8", errors="replace").splitlines(keepends=True)
    out = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
            int(record["step"])
        except (ValueError, KeyError, TypeError) as e:
            if i == len(lines) - 1:
                warnings.warn(f"{path}: dropping its torn last line {i + 1} (the run was killed while writing it)")
                break
            raise ValueError(f"{path} line {i + 1} is not a log record ({type(e).__name__}: {e}): repair or delete "
                             "that line (the log of steps done again after the resume is rewritten anyway), or "
                             "start afresh with --overwrite-output-dir") from None
        out.append((line if line.endswith("\n") else line + "\n", record))
    return out


def _on_rank0(fn):
    """``fn()`` on rank 0 only, its result (or its ValueError / FileNotFoundError) broadcast to every rank: the
    ranks agree on one answer, and expensive checks (hashing a checkpoint) run once."""
    if not (dist.is_available() and dist.is_initialized()):
        return fn()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except (ValueError, FileNotFoundError) as e:
            box[0] = (type(e).__name__, str(e))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "ok":
        return value
    raise (FileNotFoundError if kind == "FileNotFoundError" else ValueError)(value)


def find_resume_checkpoint(cfg, settings: dict) -> tuple[str, int]:
    """The checkpoint ``--resume-from-checkpoint`` names (or ``latest``'s newest good one) and its step, after
    checking its files (sizes, safetensors headers, sha256), that it was written with ``settings``, and that the
    run's log can be continued. Runs on rank 0; every rank gets the same answer.

    Raises:
        ValueError: a damaged checkpoint named by path, a changed setting (each listed, old -> new), a damaged log;
            each message names the fix. FileNotFoundError: no checkpoint.
    """
    def check():
        if cfg.resume_from_checkpoint == "latest":
            path = latest_checkpoint(cfg.output_dir)
        else:
            path = cfg.resume_from_checkpoint
            problem = checkpoint_problem(path)
            if problem is not None:
                raise ValueError(f"--resume-from-checkpoint {path}: the checkpoint is damaged or incomplete: "
                                 f"{problem}; resume another one (--resume-from-checkpoint latest picks the newest "
                                 "good one of --output-dir)")
        state = read_state(path)
        if "settings" not in state:
            warnings.warn(f"{path} records no settings (written by an earlier easy_context): they are not checked")
        elif changes := settings_changes(state["settings"], settings):
            raise ValueError(f"--resume-from-checkpoint {path} was written with other settings; a resumed run "
                             "would not continue the same training:\n  " + "\n  ".join(changes) + f"\n{_RESUME_FIX}")
        log = os.path.join(cfg.output_dir, LOG_FILE)
        if os.path.exists(log):
            read_log(log)
        return path, int(state["completed_steps"])

    return _on_rank0(check)


def _retire(root: str, after: int) -> list[str]:
    """Rename the checkpoints under ``root`` of steps after ``after`` to ``step_<k>.retired-<UTC time>``; their new
    paths."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = []
    for step in sorted(s for s in checkpoint_steps(root) if s > after):
        old = os.path.join(root, f"{CHECKPOINT_PREFIX}{step}")
        new, n = f"{old}{RETIRED}{stamp}", 1
        while os.path.exists(new):
            new, n = f"{old}{RETIRED}{stamp}-{n}", n + 1
        os.replace(old, new)
        out.append(new)
    if out:
        fsync_dir(root)
    return out


def finish_resume(cfg, path: str, completed: int) -> None:
    """After the state of ``path`` (step ``completed``) is loaded: retire the checkpoints of later steps (kept, under
    a name ``latest`` never picks, and said) and drop the later steps from the log (they are done again)."""
    if rank_world()[0] != 0:
        return
    retired = _retire(os.path.join(cfg.output_dir, "checkpoints"), completed)
    if retired:
        print(f"resumed at step {completed}: retired the {len(retired)} later checkpoint(s) of the abandoned run "
              f"(kept; --resume-from-checkpoint latest now continues this run): {', '.join(retired)}", flush=True)
    log = os.path.join(cfg.output_dir, LOG_FILE)
    if os.path.exists(log):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # said by find_resume_checkpoint already
            kept = [line for line, record in read_log(log) if record["step"] <= completed]
        with open(log + ".tmp", "w") as f:  # a kill while rewriting leaves the old log whole
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(log + ".tmp", log)


def tensorboard_events(output_dir: str) -> list[str]:
    """The TensorBoard event files (``events.out.tfevents.*``) of earlier runs in ``output_dir`` or one folder down:
    accelerate's tracker writes them to ``<output-dir>/<project-name>/``, whatever the project name was."""
    if not os.path.isdir(output_dir):
        return []
    folders = [output_dir] + [os.path.join(output_dir, d) for d in sorted(os.listdir(output_dir))
                              if os.path.isdir(os.path.join(output_dir, d))]
    return [os.path.join(folder, n) for folder in folders for n in sorted(os.listdir(folder))
            if n.startswith("events.out.tfevents.") and os.path.isfile(os.path.join(folder, n))]


def prepare_output_dir(cfg) -> None:
    """Create ``--output-dir``, refusing one that holds an earlier run (its log, checkpoints or saved model) unless
    the run is resumed (``--resume-from-checkpoint``) or ``--overwrite-output-dir`` deletes them first: otherwise a
    later ``--resume-from-checkpoint latest`` would continue the old run and the log would mix both.

    Raises:
        ValueError: a used folder without either flag. FileNotFoundError: a resume whose checkpoint does not exist.
    """
    out = cfg.output_dir
    earlier = [n for n in (LOG_FILE, "checkpoints", "config.json") if os.path.exists(os.path.join(out, n))]
    events = tensorboard_events(out)
    earlier += ["TensorBoard events"] if events else []
    if cfg.resume_from_checkpoint:
        if cfg.resume_from_checkpoint != "latest" and not os.path.isdir(cfg.resume_from_checkpoint):
            raise FileNotFoundError(f"--resume-from-checkpoint {cfg.resume_from_checkpoint}: no such folder")
    elif earlier and not cfg.overwrite_output_dir:
        raise ValueError(f"--output-dir {out} holds an earlier run ({', '.join(earlier)}): pass "
                         "--resume-from-checkpoint latest to continue it, --overwrite-output-dir to start afresh "
                         "(its log, checkpoints and TensorBoard events are deleted), or another --output-dir")
    barrier = dist.barrier if dist.is_available() and dist.is_initialized() else (lambda: None)
    barrier()  # every rank has looked before rank 0 deletes anything
    if rank_world()[0] == 0:
        if earlier and cfg.overwrite_output_dir and not cfg.resume_from_checkpoint:
            for name in (LOG_FILE, "checkpoints"):
                path = os.path.join(out, name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
            for path in events:  # only the event files: anything else in their folder stays
                os.remove(path)
                if os.path.dirname(path) != out and not os.listdir(os.path.dirname(path)):
                    os.rmdir(os.path.dirname(path))
        os.makedirs(out, exist_ok=True)
    barrier()




__all__ = ["prepare_output_dir", "read_log", "data_fingerprint", "run_settings", "settings_changes",
           "find_resume_checkpoint", "finish_resume", "tensorboard_events"]
