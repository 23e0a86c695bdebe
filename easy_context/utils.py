"""Helpers every layer shares: the process's rank and world, the sequence-parallel group size check, ZeRO-3
detection, the torch.compile switch of the fused kernels, and the one flag style of the scripts. Imports nothing of
easy_context."""
from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.distributed as dist

ENV_COMPILE = "EASY_CONTEXT_COMPILE"
_COMPILED: dict = {}


def rank_world(default: tuple[int, int] = (0, 1)) -> tuple[int, int]:
    """``(global rank, world size)`` of the default process group; ``default`` when torch.distributed is not
    initialised (a single process, or a launcher whose group does not exist yet)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return default


def check_sp_size(sp_size: int | None, world_size: int) -> int:
    """The sequence-parallel group size for ``sp_size`` (None = the whole world) over ``world_size`` ranks.

    Raises:
        ValueError: ``sp_size`` is not a positive divisor of ``world_size``.
    """
    if sp_size is None:
        return world_size
    if not isinstance(sp_size, int) or isinstance(sp_size, bool) or sp_size < 1 or world_size % sp_size:
        raise ValueError(f"sp_size={sp_size!r} must be a positive divisor of world_size={world_size}: the world "
                         f"splits into world/sp_size data-parallel replicas of sp_size sequence-parallel ranks "
                         f"(train.py: --sp-size)")
    return sp_size


def is_zero3(params) -> bool:
    """Whether any of ``params`` is a DeepSpeed ZeRO-3 partitioned parameter."""
    return any(hasattr(p, "ds_id") for p in params)


def compiled(fn, device: torch.device, env: str = ENV_COMPILE):
    """``fn`` itself on CPU (or when the environment variable ``env`` is "0"); on CUDA one cached
    ``torch.compile(fn, dynamic=True)``: every sequence length shares one compiled kernel, so a warm-up step at a
    short length leaves nothing to compile in the long step."""
    if device.type != "cuda" or os.environ.get(env, "1") == "0":
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


def check_source(source: str, what: str) -> None:
    """A path that looks local (absolute, ./, ../, ~, or whose first folder exists) must exist; hub ids pass.

    Raises:
        FileNotFoundError: naming the path and the flag (instead of a hub lookup error about an invalid repo id).
    """
    looks_local = source.startswith(("/", "./", "../", "~")) or (
        os.sep in source.rstrip(os.sep) and os.path.isdir(source.split(os.sep)[0]))
    if looks_local and not os.path.exists(os.path.expanduser(source)):
        raise FileNotFoundError(f"{what} {source}: no such file or folder")


def exit_with_parent() -> None:
    """End this process (SIGTERM) when its parent dies, e.g. the ``accelerate launch`` / torchrun process that
    started it was killed: workers must not go on training and writing checkpoints unseen (Linux; elsewhere
    nothing)."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    parent = os.getppid()
    libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def add_flag(parser, *names: str, **kwargs):
    """``parser.add_argument`` under each name and the underscore spelling of each ``--dash-name`` (the scripts'
    one style is dashes; the seed's ``--under_score`` spellings keep working). With :class:`HelpFormatter` the
    help lists the flag once, under its first name; the other spellings are accepted, unlisted."""
    spellings = [*names, *("--" + n[2:].replace("-", "_") for n in names if n.startswith("--"))]
    action = parser.add_argument(*dict.fromkeys(spellings), **kwargs)
    action.aliases_hidden = True
    return action


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """The scripts' ``--help``: a flag made by :func:`add_flag` under its first name only (its aliases work but are
    not listed), and the default after the help of every flag that has one (not for switches, nor None)."""

    def _format_action_invocation(self, action):
        if getattr(action, "aliases_hidden", False):
            action = copy.copy(action)
            action.option_strings = action.option_strings[:1]
        return super()._format_action_invocation(action)

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" in text or action.nargs == 0 or action.required
                or action.default is None or action.default is False or action.default == argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


__all__ = ["ENV_COMPILE", "rank_world", "check_sp_size", "is_zero3", "compiled", "check_source", "exit_with_parent",
           "add_flag", "HelpFormatter"]
