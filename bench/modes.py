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
    from easy_context.memory import (enable_attention_preserving_checkpointing, enable_fused_kernels,
                                     enable_low_memory_rmsnorm, enable_offloaded_checkpointing, enable_tiled_mlp)

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


def check(path: str) -> list:
    """Predicted vs measured peak GiB for the easy_context rows of a bench/train_step.py JSON-lines file."""
    import json

    out = []
    for line in open(path):
        r = json.loads(line)
        if r.get("error") or "mode" not in r:
            continue
        m = ModelShape(**dict(PRESETS["llama-2-7b"], layers=r["layers"]))
        f = parse_mode(r["mode"], m.layers)
        if f is None:
            continue
        gpu, _ = predict_gib(m, r["S"], 1, f)
        measured = "OOM" if r.get("oom") else f"{r['peak_GiB']:6.1f} GiB"
        out.append((r["mode"], r["S"], r["layers"], gpu, None if r.get("oom") else r["peak_GiB"]))
        print(f"{r['mode']:28s} S={r['S']:>7d} L={r['layers']:>2d}: predicted {gpu:6.1f} GiB, measured {measured}")
    return out


if __name__ == "__main__":
    for path in sys.argv[1:]:
        check(path)
