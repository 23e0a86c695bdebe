"""Checkpoints and the final model: accelerate state (DeepSpeed's own under ZeRO-3) plus the optimizer step under
``<output-dir>/checkpoints/step_<k>``, finding the newest, and ``save_pretrained`` of the trained weights."""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings

import torch.distributed as dist

from ..utils import rank_world

CHECKPOINT_PREFIX = "step_"
STATE_FILE = "trainer_state.json"
LOG_FILE = "train_log.jsonl"


def _files(path: str) -> dict:
    """``{relative path: size}`` of every file under ``path``."""
    out = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            out[os.path.relpath(full, path)] = os.path.getsize(full)
    return out


def _steps(root: str) -> list[int]:
    """The steps of the ``step_<k>`` folders under ``root``, newest first (``.tmp`` folders are not checkpoints)."""
    names = os.listdir(root) if os.path.isdir(root) else []
    return sorted((int(m.group(1)) for d in names if (m := re.fullmatch(CHECKPOINT_PREFIX + r"(\d+)", d))), reverse=True)


def checkpoint_problem(path: str) -> str | None:
    """Why ``path`` is not a complete checkpoint (None: it is): no state file, or a file missing or of another size
    than when it was written."""
    try:
        with open(os.path.join(path, STATE_FILE)) as f:
            state = json.load(f)
        int(state["completed_steps"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"no valid {STATE_FILE} ({type(e).__name__})"
    for name, size in state.get("files", {}).items():
        full = os.path.join(path, name)
        if not os.path.isfile(full) or os.path.getsize(full) != size:
            return f"{name} is missing or truncated"
    return None


def latest_checkpoint(output_dir: str) -> str:
    """The newest complete checkpoint under ``output_dir/checkpoints`` (incomplete ones are skipped with a warning).

    Raises:
        FileNotFoundError: there is none.
    """
    root = os.path.join(output_dir, "checkpoints")
    for step in _steps(root):
        path = os.path.join(root, f"{CHECKPOINT_PREFIX}{step}")
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        warnings.warn(f"--resume-from-checkpoint latest: skipping incomplete checkpoint {path}: {problem}")
    raise FileNotFoundError(f"--resume-from-checkpoint latest: no complete checkpoint under {root}")


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


def save_checkpoint(accelerator, output_dir: str, step: int, keep: int | None = None) -> str:
    """accelerate state (+ DeepSpeed's) and the optimizer step, under ``output_dir/checkpoints/step_<step>``.

    Atomic: everything is written under ``step_<step>.tmp``; rank 0 then writes the state file (the step and every
    file's size) and renames the folder. A run killed while saving leaves only a ``.tmp`` folder, which resuming
    never reads, and the previous checkpoint intact.
    """
    path = os.path.join(output_dir, "checkpoints", f"{CHECKPOINT_PREFIX}{step}")
    tmp = path + ".tmp"
    rank0 = rank_world()[0] == 0
    if rank0 and os.path.exists(tmp):
        shutil.rmtree(tmp)  # a save that was killed earlier
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(tmp)
        accelerator.wait_for_everyone()
        if rank0:
            files = _files(tmp)
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump({"completed_steps": step, "files": files}, f)
                f.flush()
                os.fsync(f.fileno())
            if os.path.exists(path):
                shutil.rmtree(path)
            os.replace(tmp, path)
    except OSError as e:
        raise OSError(f"saving the checkpoint of step {step} to {tmp} failed ({e}); the earlier checkpoints are "
                      "intact: free space and resume with --resume-from-checkpoint latest") from e
    if rank0 and keep:
        root = os.path.dirname(path)
        for old in _steps(root)[keep:]:
            shutil.rmtree(os.path.join(root, f"{CHECKPOINT_PREFIX}{old}"), ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def save_model(accelerator, wrapper, cfg) -> None:
    """``save_pretrained`` into ``--output-dir`` (ZeRO-3 weights gathered); the tokenizer of ``--model`` if any."""
    accelerator.wait_for_everyone()
    state = accelerator.get_state_dict(wrapper)  # collective under ZeRO-3
    model = accelerator.unwrap_model(wrapper).model
    if rank_world()[0] == 0 and state is not None:  # ZeRO-3 gathers the full state on global rank 0
        # the wrapper's keys are "model.<causal LM key>"; the attention choice is not saved (reloads as sdpa)
        model.save_pretrained(cfg.output_dir, state_dict={k.removeprefix("model."): v for k, v in state.items()})
        if not cfg.init_random:
            try:
                from transformers import AutoTokenizer

                AutoTokenizer.from_pretrained(cfg.model).save_pretrained(cfg.output_dir)
            except (OSError, ValueError):
                pass  # a model without a tokenizer: nothing to copy
    accelerator.wait_for_everyone()
    accelerator.print(f"saved the model to {cfg.output_dir}")


__all__ = ["CHECKPOINT_PREFIX", "STATE_FILE", "LOG_FILE", "prepare_output_dir", "checkpoint_problem", "latest_checkpoint", "save_checkpoint", "save_model"]
