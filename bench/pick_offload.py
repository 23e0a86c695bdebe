"""How many decoder layers' checkpoints to keep on the GPU at a long length, from a short-depth run's progress log.

    python bench/pick_offload.py PROGRESS_JSONL MODE MEASURED_SEQ TARGET_SEQ [--layers 32] [--usable-gib 134]

The short run (bench/train_step.py --layers 4, every layer offloaded) gives, in units of its seq x hidden
bf16 tensors: the transient working set of one layer's backward (peak minus what was allocated when the last
layer's backward began) and the non-layer memory held then. Both scale with the sequence; the weights do
not. Prints the number of layers to offload (the rest keep their checkpoints on the GPU).
"""
import argparse
import json
import sys

from easy_context.advise import PRESETS, ModelShape

LLAMA = PRESETS["llama-2-7b"]
HIDDEN = LLAMA["hidden"]


def weights_gib(layers: int) -> float:
    """bf16 weights of a Llama-2-7B-width model with ``layers`` decoder layers."""
    return 2 * ModelShape(**dict(LLAMA, layers=layers)).params / 2**30


def main():
    p = argparse.ArgumentParser()
    p.add_argument("progress")
    p.add_argument("mode")
    p.add_argument("measured_seq", type=int)
    p.add_argument("target_seq", type=int)
    p.add_argument("--short-layers", type=int, default=4)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--usable-gib", type=float, default=134.0)
    p.add_argument("--max-host-layers", type=int, default=24, help="cap on offloaded layers (host RAM)")
    a = p.parse_args()
    rows = [r for r in map(json.loads, open(a.progress)) if r.get("mode") == a.mode and r.get("S") == a.measured_seq]
    last = a.short_layers - 1
    start = next(r for r in rows if r["at"] == "backward" and r["layer"] == last)
    unit = a.measured_seq * HIDDEN * 2 / 2**30
    weights = weights_gib(a.short_layers)
    work = (max(r["peak_GiB"] for r in rows) - start["alloc_GiB"]) / unit
    other = (start["alloc_GiB"] - weights) / unit
    target_unit = a.target_seq * HIDDEN * 2 / 2**30
    free = a.usable_gib - weights_gib(a.layers) - (work + other) * target_unit
    on_gpu = max(0, min(a.layers, int(free // target_unit)))
    offload = min(a.layers - on_gpu, a.max_host_layers)
    print(json.dumps(dict(work_units=round(work, 1), other_units=round(other, 1), on_gpu=a.layers - offload,
                          offload=offload)), file=sys.stderr)
    print(offload)


if __name__ == "__main__":
    main()
