"""bench/train_step.py's mode grammar (``ec+norm+fuse+tile=16384+keep=20+off=12``) as easy_context.advise Features,
the switching of those features on a model (train_step.py and peers.py share it), and the check of advise's memory
model against the peaks that bench runs measured.

    python bench/modes.py bench/results/s3_run6_384k.jsonl   # predicted vs measured peak per run
"""
from __future__ import annotations

import sys

from easy_context.advise import PRESETS, Features, ModelShape, predict_gib


def parse_mode(mode: str, layers: int) -> Features | None:
    """bench/train_step.py's mode grammar (``ec+norm+fuse+tile=16384+keep=20+off=12``) -> Features; None for stock."""
    base, *parts = mode.split("+")
    if base not in ("stock", "ec") or (base == "stock" and parts):
        raise ValueError(f"mode {mode!r}: 'stock' or 'ec[+norm][+fuse][+tile[=N]][+keep[=N]][+off[=N]]'")
    if base == "stock":
        return None
    given = {}
    for part in parts:
        name, _, n = part.partition("=")
        if name not in ("norm", "fuse", "tile", "keep", "off"):
            raise ValueError(f"mode {mode!r}: unknown feature {name!r}")
        given[name] = int(n) if n else None
    count = (lambda name: 0 if name not in given else layers if given[name] is None else given[name])  # noqa: E731
    return Features(tiled_mlp="tile" in given, low_memory_rmsnorm="norm" in given, keep_layers=count("keep"),
                    offload_layers=count("off"), tile_size=given.get("tile"), fused_kernels="fuse" in given)


def apply_features(model, f: Features) -> dict:
    """Switch ``f``'s memory features on for ``model``, after the sequence-parallel patch and gradient checkpointing.

    The order matters: the checkpointing variants (keep, off) wrap the layers last. Returns the fused-kernel counts
    (empty without ``fuse``). ``fuse`` swaps the rotary function of the model's modeling module: process-wide.
    """
    from easy_context.integrations.memory import (
        enable_attention_preserving_checkpointing,
        enable_offloaded_checkpointing,
        enable_tiled_mlp,
    )
    from easy_context.integrations.patch import enable_fused_kernels, enable_low_memory_rmsnorm

    fused = {}
    if f.low_memory_rmsnorm:
        enable_low_memory_rmsnorm(model)
    if f.fused_kernels:
        fused = enable_fused_kernels(model)
    if f.tiled_mlp:
        enable_tiled_mlp(model, tile_size=f.tile_size)
    if f.keep_layers:
        enable_attention_preserving_checkpointing(model, layers=f.keep_layers)
    if f.offload_layers:
        enable_offloaded_checkpointing(model, layers=f.offload_layers)
    return fused


def parse_flags(flags: str, layers: int) -> Features:
    """train.py's memory flags (as bench/zero3_step.py records them) -> Features."""
    words = flags.split()

    def count(flag: str) -> int:
        if flag not in words:
            return 0
        nxt = words[words.index(flag) + 1:][:1]
        return int(nxt[0]) if nxt and nxt[0].isdigit() else layers

    return Features(tiled_mlp="--tiled-mlp" in words,
                    low_memory_rmsnorm="--low-memory-rmsnorm" in words or "--fused-kernels" in words,
                    keep_layers=count("--attn-preserving-checkpointing"),
                    offload_layers=count("--offload-checkpointing"),
                    fused_kernels="--fused-kernels" in words)


def check(path: str) -> list:
    """Predicted vs measured peak GiB per GPU for the easy_context rows of a bench/train_step.py JSON-lines file (one
    GPU, ``mode``) or of a bench/zero3_step.py one (``flags`` and ``gpus``, Llama-2-7B)."""
    import json

    out = []
    for line in open(path):
        r = json.loads(line)
        if r.get("error") or not ("mode" in r or "flags" in r):
            continue
        if "mode" in r:
            m = ModelShape(**dict(PRESETS["llama-2-7b"], layers=r["layers"]))
            name, gpus, f, peak = r["mode"], 1, parse_mode(r["mode"], m.layers), r.get("peak_GiB")
        else:
            m = ModelShape(**PRESETS["llama-2-7b"])
            name, gpus, peak = f"zero3 {r['flags']}", r["gpus"], r.get("gpu_peak_GiB")
            f = parse_flags(r["flags"], m.layers)
        if f is None:
            continue
        gpu, _ = predict_gib(m, r["S"] // gpus, gpus, f)
        measured = "OOM" if r.get("oom") else f"{peak:6.1f} GiB"
        out.append((name, r["S"], m.layers, gpu, None if r.get("oom") else peak))
        print(f"{name:28s} S={r['S']:>7d} L={m.layers:>2d} GPUs={gpus}: predicted {gpu:6.1f} GiB, measured {measured}")
    return out


if __name__ == "__main__":
    for path in sys.argv[1:]:
        check(path)
