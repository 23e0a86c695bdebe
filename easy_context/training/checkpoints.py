"""Checkpoints and the final model: accelerate state (DeepSpeed's own under ZeRO-3) plus the optimizer step under
``<output-dir>/checkpoints/step_<k>``, sealed (every file fsynced and sha256-hashed into ``trainer_state.json``, written
last) and verified (:func:`checkpoint_problem`, :func:`latest_checkpoint`), and ``save_pretrained`` of the trained
weights. Resuming a run (which checkpoint, with which settings and data) is :mod:`resume`'s.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings

import torch
import torch.distributed as dist

from ..utils import rank_world

CHECKPOINT_PREFIX = "step_"
STATE_FILE = "trainer_state.json"
LOG_FILE = "train_log.jsonl"
RETIRED = ".retired-"
HASH_CHUNK = 8 << 20  # bytes read at a time when hashing: memory stays flat for any checkpoint size
FINGERPRINT_ROWS = 16  # rows of the dataset (evenly spaced, first and last included) in its fingerprint

def _sha256(path: str, *, fsync: bool = False) -> str:
    """sha256 of a file, read in chunks of :data:`HASH_CHUNK`; ``fsync``: also flush it to disk (the pages are
    read anyway, and a checkpoint must be on disk before its state file says it is complete)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def fsync_dir(path: str) -> None:
    """Make a folder's entries (created, renamed files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256_all(paths: list[str], *, fsync: bool = False) -> list[str]:
    """:func:`_sha256` of each path, several files at a time (hashlib releases the GIL: a ZeRO-3 checkpoint's
    per-rank shards hash in parallel)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1, len(paths)))) as pool:
        return list(pool.map(lambda p: _sha256(p, fsync=fsync), paths))


def _seal(path: str) -> dict:
    """``{relative path: {"size", "sha256"}}`` of every file under ``path``, each fsynced on the way, then every
    folder under it."""
    files, folders = [], []
    for root, dirs, names in os.walk(path):
        dirs.sort()
        files += [os.path.join(root, name) for name in sorted(names)]
        folders.append(root)
    hashes = _sha256_all(files, fsync=True)
    for root in folders:
        fsync_dir(root)
    return {os.path.relpath(f, path): {"size": os.path.getsize(f), "sha256": h} for f, h in zip(files, hashes)}


def checkpoint_steps(root: str) -> list[int]:
    """The steps of the ``step_<k>`` folders under ``root``, newest first (``.tmp`` and ``.retired-*`` folders are not
    checkpoints)."""
    names = os.listdir(root) if os.path.isdir(root) else []
    steps = (int(m.group(1)) for d in names if (m := re.fullmatch(CHECKPOINT_PREFIX + r"(\d+)", d)))
    return sorted(steps, reverse=True)


def _safetensors_problem(path: str) -> str | None:
    """Why the header of a safetensors file cannot be read (None: it can): 8 bytes of length, then JSON."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= os.path.getsize(path) - 8:
                return f"header length {n} does not fit the file"
            json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"unreadable header ({type(e).__name__})"
    return None


def read_state(path: str) -> dict:
    """The state file of checkpoint ``path``.

    Raises:
        ValueError: it is missing or not a checkpoint's state (the message says which).
    """
    try:
        with open(os.path.join(path, STATE_FILE)) as f:
            state = json.load(f)
        int(state["completed_steps"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"no valid {STATE_FILE} ({type(e).__name__})") from None
    return state


def checkpoint_problem(path: str, *, hashes: bool = True) -> str | None:
    """Why ``path`` is not a complete, undamaged checkpoint (None: it is): no state file, a file missing or of
    another size than when it was written, a safetensors header that cannot be read, or (``hashes``) a file whose
    sha256 differs. Sizes and headers are checked for every file before any file is hashed."""
    try:
        files = read_state(path).get("files", {})
    except ValueError as e:
        return str(e)
    for name, rec in files.items():
        size = rec["size"] if isinstance(rec, dict) else rec  # checkpoints before hashes recorded sizes only
        full = os.path.join(path, name)
        if not os.path.isfile(full) or os.path.getsize(full) != size:
            return f"{name} is missing or truncated"
        if name.endswith(".safetensors") and (problem := _safetensors_problem(full)):
            return f"{name}: {problem}"
    if hashes:
        hashed = {name: rec["sha256"] for name, rec in files.items() if isinstance(rec, dict)}
        for name, got in zip(hashed, _sha256_all([os.path.join(path, n) for n in hashed])):
            if got != hashed[name]:
                return f"{name} does not match its sha256 (the file was changed or damaged after it was written)"
    return None


def latest_checkpoint(output_dir: str) -> str:
    """The newest complete, undamaged checkpoint under ``output_dir/checkpoints`` (others are skipped with a warning
    naming them).

    Raises:
        FileNotFoundError: there is none.
    """
    root = os.path.join(output_dir, "checkpoints")
    for step in checkpoint_steps(root):
        path = os.path.join(root, f"{CHECKPOINT_PREFIX}{step}")
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        warnings.warn(f"--resume-from-checkpoint latest: skipping damaged or incomplete checkpoint {path}: "
                      f"{problem}; using the previous one")
    raise FileNotFoundError(f"--resume-from-checkpoint latest: no complete checkpoint under {root}")




class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a quota, an I/O error); the earlier ones are intact."""


# torch.save reports a failed write as RuntimeError ("[enforce fail at inline_container.cc:...]", "PytorchStreamWriter
# failed writing file"), safetensors as SafetensorError ("IoError ... StorageFull"): neither is an OSError
_WRITE_FAILURE = ("inline_container", "PytorchStreamWriter", "file write failed", "No space left", "StorageFull",
                  "IoError", "Disk quota")


def _write_failure(e: BaseException) -> bool:
    return isinstance(e, OSError) or any(m in str(e) for m in _WRITE_FAILURE)


def _any_rank(flag: bool, accelerator) -> bool:
    """Whether ``flag`` is set on any rank (a collective: every rank calls it)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([int(flag)], device=accelerator.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def save_checkpoint(accelerator, output_dir: str, step: int, keep: int | None = None,
                    metadata: dict | None = None, save_more=None) -> str:
    """accelerate state (+ DeepSpeed's) and the optimizer step, under ``output_dir/checkpoints/step_<step>``;
    ``save_more(folder)`` (every rank) writes what accelerate does not hold (--fsdp2: sharding.save_sharded).

    Atomic and durable: everything is written under ``step_<step>.tmp``; rank 0 then hashes and fsyncs every file,
    writes the state file (the step, every file's size and sha256, and ``metadata``: the run's settings), fsyncs it
    and the folder, renames the folder and fsyncs its parent. A run killed while saving leaves only a ``.tmp``
    folder, which resuming never reads, and the previous checkpoint intact.

    Raises:
        CheckpointWriteError: on every rank when a write failed on any (a full disk: torch's RuntimeError,
            safetensors' error or an OSError); the partial ``.tmp`` is removed, and the message says to free space and
            resume.
    """
    path = os.path.join(output_dir, "checkpoints", f"{CHECKPOINT_PREFIX}{step}")
    tmp = path + ".tmp"
    rank0 = rank_world()[0] == 0
    if rank0 and os.path.exists(tmp):
        shutil.rmtree(tmp)  # a save that was killed earlier
    accelerator.wait_for_everyone()
    error = None
    try:
        accelerator.save_state(tmp)
        if save_more is not None:
            save_more(tmp)
    except Exception as e:  # noqa: BLE001 - only write failures are kept, see _write_failure
        if not _write_failure(e):
            raise
        error = e
    if not _any_rank(error is not None, accelerator) and rank0:
        try:
            state = {"completed_steps": step, "files": _seal(tmp), **(metadata or {})}
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump(state, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(tmp)
            if os.path.exists(path):
                shutil.rmtree(path)
            os.replace(tmp, path)
            fsync_dir(os.path.dirname(path))
        except OSError as e:
            error = e
    if _any_rank(error is not None, accelerator):
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        cause = f" ({type(error).__name__}: {error})" if error is not None else " on another rank"
        raise CheckpointWriteError(f"saving the checkpoint of step {step} to {tmp} failed{cause}; the partial "
                                   "checkpoint was removed and the earlier ones are intact: free space and resume "
                                   "with --resume-from-checkpoint latest") from error
    if rank0 and keep:
        root = os.path.dirname(path)
        for old in checkpoint_steps(root)[keep:]:
            shutil.rmtree(os.path.join(root, f"{CHECKPOINT_PREFIX}{old}"), ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def save_model(accelerator, wrapper, cfg, peft_model=None) -> None:
    """``save_pretrained`` into ``--output-dir`` (ZeRO-3 and FSDP2 weights gathered to rank 0); the tokenizer of
    ``--model`` if any. With LoRA (``peft_model``, the PEFT wrapper of the trained causal LM): the adapter only
    (``adapter_config.json`` + ``adapter_model.safetensors``, peft's ``save_pretrained``; load it with
    ``PeftModel.from_pretrained(base, dir)``)."""
    from .sharding import full_state_dict, is_fsdp2

    accelerator.wait_for_everyone()
    # collective under ZeRO-3 and FSDP2
    state = full_state_dict(wrapper) if is_fsdp2(wrapper) else accelerator.get_state_dict(wrapper)
    model = accelerator.unwrap_model(wrapper).model
    if rank_world()[0] == 0 and state is not None:  # ZeRO-3 / FSDP2 gather the full state on global rank 0
        # the wrapper's keys are "model.<causal LM key>"; the attention choice is not saved (reloads as sdpa)
        state = {k.removeprefix("model."): v for k, v in state.items()}
        if peft_model is not None:  # peft's own keys: "base_model.model.<causal LM key>"
            peft_model.save_pretrained(cfg.output_dir,
                                       state_dict={f"base_model.model.{k}": v for k, v in state.items()})
        else:
            model.save_pretrained(cfg.output_dir, state_dict=state)
        if not cfg.init_random:
            try:
                from transformers import AutoTokenizer

                AutoTokenizer.from_pretrained(cfg.model).save_pretrained(cfg.output_dir)
            except (OSError, ValueError):
                pass  # a model without a tokenizer: nothing to copy
    accelerator.wait_for_everyone()
    accelerator.print(f"saved the {'LoRA adapter' if peft_model is not None else 'model'} to {cfg.output_dir}")


__all__ = ["CHECKPOINT_PREFIX", "STATE_FILE", "LOG_FILE", "CheckpointWriteError", "checkpoint_problem",
           "latest_checkpoint", "read_state", "save_checkpoint", "save_model"]
