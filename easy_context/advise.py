"""Pick a parallel mode and memory features for a model, a sequence length and a set of GPUs.

    python -m easy_context.advise --model-config llama-2-7b --seq-length 524288 --gpus 1 --host-mem-gib 128
    python -m easy_context.advise --model-config tiny-llama --seq-length 4096 --gpus 2 --host-mem-gib 16

A first-order memory model of one training step per GPU (bf16 weights; on several GPUs DeepSpeed ZeRO-3 shards;
gradient checkpointing per decoder layer), in units of ``U = tokens per GPU x hidden x 2 bytes`` (one layer
input), calibrated on the one-H200 Llama-2-7B measurements in bench/RESULTS.md:

* start of backward (the usual peak): weights + checkpoints kept on the GPU (U per layer not offloaded)
  + attention outputs kept by attention-preserving checkpointing (U per preserving layer)
  + ``OTHER_UNITS`` (embedding output, final norm, loss input) + ``WORK_UNITS`` (one layer's recompute and
  backward in flight);
* during backward: the start, plus the parameter gradients that pile up while backward passes top layers that
  free nothing on the GPU (offloaded and not preserving);
* end of backward: weights + gradients + the same working set (short sequences peak here).

It recommends, fastest first: attention preservation on as many layers as fit (each skips one attention forward),
the MLP untiled only when every layer can preserve its attention anyway, and checkpoints offloaded to host
memory only as far as needed (the first N layers). A planning aid, not a guarantee: the allocator needs slack
(``BUDGET``), more when tensors are large.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field

from .attention.registry import get_algorithm
from .integrations.models import PRESETS as MODEL_PRESETS
from .integrations.models import SHAPE_PRESETS

# Ulysses runs its all-to-all inside one node: at most this many GPUs per Ulysses group.
ULYSSES_MAX_DEGREE = 8

GIB = 2**30

# One layer's backward working set, in U, with the low-memory RMSNorm and the tiled MLP: 4-layer Llama-2-7B-width
# run at 256K on the H200, every checkpoint offloaded (bench/results/s2_run2_diag256_4layers_progress.jsonl: peak
# 31.9 GiB - 6.4 GiB allocated when the last layer's backward began = 25.5 GiB = 12.6 U of 2 GiB; the 6.4 GiB
# less 2.0 GiB of weights = 2.2 U held outside the layers; bench/pick_offload.py does this arithmetic).
WORK_UNITS = 12.6
PLAIN_NORM_UNITS = 8.0   # plain RMSNorm keeps float32 copies: 20.6 U measured the same way (s2_run1_diag256)
UNTILED_MLP_UNITS = 9.7  # (batch, seq, intermediate) activations of an untiled MLP: 128K run, s2_run3 ec+norm+keep
OTHER_UNITS = 2.2        # held outside the layers when backward starts (same 4-layer runs)
# Attention's backward over more than one GPU holds more than a ring of one: float32 dq/dk/dv and output
# accumulators, dK/dV travelling in float32 and their receive buffers. 2 x H200, ZeRO-3, 512K, tiled MLP, 12 layers
# preserving, 17 offloaded (bench/results/s6_run3_zero3_step_512k.jsonl): 107.0 GiB measured, 16.7 GiB = 8.4 U
# above this model without it. It is a peak of the attention phase, so an untiled MLP's larger peak (9.7 U) covers
# it (2-GPU 128K/256K untiled runs, s4_run5: no excess). Ulysses / USP are assumed alike (not measured).
MULTI_GPU_ATTENTION_UNITS = 8.4
# Host bytes per parameter under ZeRO-3 with parameters and Adam offloaded (accelerate_configs/zero3_offload.json):
# float32 master weights, Adam moments and gradients, pinned bf16 parameters, DeepSpeed's buffers. 2 x H200 node,
# Llama-2-7B: 160.7 GiB in use before a step (s6_run1_zero3_step.jsonl) = 25.6 B per parameter with the processes
# and the OS; 16 (the optimizer states alone) under-counted it and advised a 512K plan the host could not hold.
ZERO_OFFLOAD_HOST_BYTES = 24.0
# Fraction of the GPU the model may fill: tiled runs fitted at 0.95 of the H200 by this model (512K), an untiled
# 256K run (5.4 GiB MLP tensors) failed at 0.90: large blocks fragment the caching allocator.
BUDGET = {True: 0.95, False: 0.85}
# Measured per-rank attention efficiency of the zigzag ring vs single-GPU cuDNN (bench/RESULTS.md):
# >= 0.95 once each rank holds >= 16K tokens; below ~4K per rank launch overheads dominate.
RING_EFFICIENT_TOKENS = 16384

@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, c) -> "ModelShape":
        """The shape of a transformers config (its text part)."""
        c = c.get_text_config()
        return cls(c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
                   getattr(c, "num_key_value_heads", None) or c.num_attention_heads, c.intermediate_size, c.vocab_size)

    @classmethod
    def from_preset(cls, kw: dict) -> "ModelShape":
        """The shape of an entry of the preset table (``easy_context.integrations.models.PRESETS``)."""
        return cls(kw["hidden_size"], kw["num_hidden_layers"], kw["num_attention_heads"],
                   kw.get("num_key_value_heads") or kw["num_attention_heads"], kw["intermediate_size"],
                   kw["vocab_size"])

    @property
    def params(self) -> int:
        h, kv = self.hidden, self.hidden * self.kv_heads // self.heads
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * self.intermediate + 2 * h
        return self.layers * per_layer + 2 * self.vocab * h + h


def load_shape(name_or_path: str) -> ModelShape:
    """The shape of a model: a name of the preset table (:data:`easy_context.integrations.models.PRESETS`: the
    full-size :data:`PRESETS` and train.py's built-in ``--model-config`` names ``tiny-llama``, ``small-llama``), a
    config JSON file, a model folder or a hub id (what ``train.py --model-config`` takes).

    Raises:
        FileNotFoundError: a local-looking path that does not exist. ValueError: a JSON file without model_type.
    """
    if name_or_path in MODEL_PRESETS:
        return ModelShape.from_preset(MODEL_PRESETS[name_or_path])
    from .integrations.models import load_config

    return ModelShape.from_config(load_config(name_or_path))


# The full-size presets as shapes: {name: ModelShape fields} (bench/ builds ModelShape(**PRESETS[name])).
PRESETS = {name: asdict(ModelShape.from_preset(MODEL_PRESETS[name])) for name in SHAPE_PRESETS}


@dataclass(frozen=True)
class Features:
    """Memory features of a run: what bench/train_step.py modes and train.py flags switch on."""
    tiled_mlp: bool = True
    low_memory_rmsnorm: bool = True
    keep_layers: int = 0     # attention-preserving checkpointing on the first N layers
    offload_layers: int = 0  # checkpoints of the first N layers in host memory
    tile_size: int | None = None  # tokens per MLP tile (None: enable_tiled_mlp's default)
    fused_kernels: bool = False  # speed; its memory saving (SwiGLU keeps 2 of 3 intermediates) is not modelled


def _gradient_pileup(m: ModelShape, f: Features, unit: float, grads_per_layer: float) -> float:
    """Bytes of parameter gradients that backward has produced beyond what it has freed, at its worst.

    Backward runs the layers top-down; each frees its checkpoint if it kept it on the GPU and its attention output if
    it preserved one, and adds its parameters' gradients. Layers that hold nothing on the GPU (offloaded, not
    preserving: the top ones when only the first N preserve) free nothing while their gradients pile up
    (384K run, 10 such layers: +3.4 GiB over the start-of-backward peak, s3_run6_384k_progress.jsonl).
    """
    worst = freed = 0.0
    for k, i in enumerate(reversed(range(m.layers))):  # layer i is the (k+1)-th through backward
        worst = max(worst, k * grads_per_layer - freed)
        freed += unit * ((i >= f.offload_layers) + (i < f.keep_layers))
    return worst


def predict_gib(m: ModelShape, tokens_per_gpu: int, gpus: int, f: Features) -> tuple[float, float]:
    """(peak GPU GiB, host GiB for offloaded checkpoints) of one forward+backward."""
    unit = tokens_per_gpu * m.hidden * 2
    # bf16 weights (and as many bf16 gradients): ZeRO-3 shards plus one gathered layer; on one GPU all of them
    weights = 2 * m.params if gpus == 1 else 2 * m.params / gpus + 2 * m.params / m.layers
    grads_per_layer = 2 * m.params / m.layers / gpus
    phase = max(0 if f.tiled_mlp else UNTILED_MLP_UNITS, MULTI_GPU_ATTENTION_UNITS if gpus > 1 else 0)
    work = (WORK_UNITS + OTHER_UNITS + (0 if f.low_memory_rmsnorm else PLAIN_NORM_UNITS) + phase) * unit
    start = weights + (m.layers - f.offload_layers + f.keep_layers) * unit + work
    during = start + _gradient_pileup(m, f, unit, grads_per_layer)
    end = 2 * weights + work
    return max(during, end) / GIB, f.offload_layers * unit / GIB


@dataclass
class Plan:
    seq_algo: str
    sp_size: int
    ring_degree: int | None
    features: Features | None  # None: does not fit
    gpu_gib: float
    host_gib: float
    layers: int
    notes: list = field(default_factory=list)

    def flags(self) -> str:
        """train.py's memory flags for this plan."""
        f = self.features
        if f is None:
            return "(does not fit)"
        out = ["--gradient-checkpointing", "--fused-kernels" if f.fused_kernels else "--low-memory-rmsnorm"]
        out += ["--tiled-mlp"] if f.tiled_mlp else []
        for flag, n in (("--attn-preserving-checkpointing", f.keep_layers),
                        ("--offload-checkpointing", f.offload_layers)):
            if n:
                out.append(flag if n == self.layers else f"{flag} {n}")
        return " ".join(out)


def choose_features(m: ModelShape, tokens_per_gpu: int, gpus: int, gpu_mem_gib: float,
                    host_gib: float) -> tuple[Features | None, float, float]:
    """The fastest features that fit: (features or None, GPU GiB, host GiB).

    Fastest first: the MLP untiled (only worth it when every layer preserves its attention), then as many
    preserving layers as fit, each with as few offloaded layers as needed (an offloaded checkpoint costs a copy
    to the host and back; a layer that does not preserve costs an attention forward).
    """
    unit = tokens_per_gpu * m.hidden * 2 / GIB
    max_offload = min(m.layers, int(host_gib // unit)) if unit > 0 else m.layers
    for tiled in (False, True):
        budget = BUDGET[tiled] * gpu_mem_gib
        for keep in range(m.layers, -1 if tiled else m.layers - 1, -1):
            for offload in range(max_offload + 1):
                f = Features(tiled_mlp=tiled, keep_layers=keep, offload_layers=offload, fused_kernels=True)
                gpu, host = predict_gib(m, tokens_per_gpu, gpus, f)
                if gpu <= budget:
                    return f, gpu, host
    return (None, *predict_gib(m, tokens_per_gpu, gpus, Features(offload_layers=max_offload)))


def _splits_heads(algo: str, m: ModelShape, degree: int, **options) -> bool:
    """Whether the registry's head rule of ``algo`` accepts ``m``'s heads over ``degree`` ranks."""
    check = get_algorithm(algo).check_heads
    try:
        check is None or check(m.heads, m.kv_heads, degree, **options)
    except ValueError:
        return False
    return True


def ulysses_degree(m: ModelShape, gpus: int) -> int:
    """The largest Ulysses degree (one node: at most :data:`ULYSSES_MAX_DEGREE`) that divides ``gpus`` and whose
    head split the registry accepts (``ulysses_attn``'s head rule; 1: none)."""
    return max(d for d in range(1, min(gpus, ULYSSES_MAX_DEGREE) + 1)
               if gpus % d == 0 and (d == 1 or _splits_heads("ulysses_attn", m, d)))


def advise(m: ModelShape, seq_length: int, gpus: int, gpu_mem_gib: float, host_mem_gib: float, *,
           optimizer_host_bytes: float = ZERO_OFFLOAD_HOST_BYTES) -> Plan:
    """Plan for ``seq_length`` tokens on ``gpus`` GPUs of ``gpu_mem_gib`` each; ``host_mem_gib`` per GPU.

    ``optimizer_host_bytes`` per parameter are reserved in host memory first (24: ZeRO-offloaded Adam's float32
    master weights, moments and gradients; 0 for an optimizer on the GPU or plain SGD).
    """
    notes = []
    uly = ulysses_degree(m, gpus)
    if gpus == 1:
        algo, ring = "zigzag_ring_attn", None
        notes.append("one GPU: a ring of one is plain cuDNN attention through easy_context's kernels, which is "
                     "what attention-preserving checkpointing needs; the memory features do the work")
    elif uly == gpus:
        algo, ring = "ulysses_attn", None
        notes.append(f"heads ({m.heads}) divide by {gpus}: Ulysses all-to-all inside the node")
    elif uly > 1:
        algo, ring = "usp_attn", gpus // uly
        notes.append(f"Ulysses {uly} x ring {gpus // uly}: heads limit Ulysses to {uly}")
    else:
        algo, ring = "zigzag_ring_attn", None
    per_gpu = seq_length // gpus
    if algo == "zigzag_ring_attn" and gpus > 1 and per_gpu < RING_EFFICIENT_TOKENS:
        notes.append(f"only {per_gpu} tokens per rank: ring steps are short, expect < 95% attention efficiency")
    optimizer_gib = optimizer_host_bytes * m.params / gpus / GIB
    host_free = max(0.0, 0.8 * host_mem_gib - optimizer_gib)  # pinned pages: leave the OS and the process room
    f, gpu, host = choose_features(m, per_gpu, gpus, gpu_mem_gib, host_free)
    if f is None:
        notes.append(f"does not fit even with every feature on ({gpu:.0f} GiB GPU with {host:.0f} GiB offloaded; "
                     f"{host_free:.0f} GiB of host memory left after the optimizer's {optimizer_gib:.0f} GiB): use "
                     "more GPUs, more host memory or a shorter sequence")
    elif f.offload_layers:
        notes.append(f"host memory: {host:.0f} GiB of offloaded checkpoints + {optimizer_gib:.0f} GiB optimizer state")
    return Plan(algo, gpus, ring, f, gpu, host + optimizer_gib, m.layers, notes)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m easy_context.advise``."""
    from .integrations.models import BUILTIN_CONFIGS
    from .utils import HelpFormatter

    p = argparse.ArgumentParser(
        prog="python -m easy_context.advise", formatter_class=HelpFormatter,
        description="Pick train.py's --seq-algo and memory flags for a model, a sequence length and a set of GPUs, "
                    "from a memory model calibrated on H200 runs (bench/RESULTS.md section 6; a planning aid: leave "
                    "the allocator slack).",
        epilog="example: python -m easy_context.advise --model-config llama-2-7b --seq-length 524288 --gpus 1 "
               "--host-mem-gib 128 --optimizer-host-bytes 0")
    p.add_argument("--model-config", required=True, metavar="NAME|PATH",
                   help=f"a preset ({', '.join(PRESETS)}), a train.py built-in ({', '.join(BUILTIN_CONFIGS)}), a "
                        "config JSON file, a model folder or a hub id")
    p.add_argument("--seq-length", type=int, required=True, help="tokens per training sequence")
    p.add_argument("--gpus", type=int, required=True, help="GPUs the sequence is split over")
    p.add_argument("--host-mem-gib", type=float, required=True, help="host memory of the node (all GPUs), GiB")
    p.add_argument("--gpu-mem-gib", type=float, default=139.0, help="usable memory of one GPU, GiB (H200: 139)")
    p.add_argument("--optimizer-host-bytes", type=float, default=ZERO_OFFLOAD_HOST_BYTES,
                   help=f"host bytes per parameter for the optimizer ({ZERO_OFFLOAD_HOST_BYTES:g}: ZeRO-3 with "
                        "parameters and Adam offloaded, as measured; 0: on GPU / SGD)")
    return p


def main(argv=None):
    """Print the plan for the command line ``argv`` (None: ``sys.argv``); bad arguments are a usage error."""
    p = build_parser()
    a = p.parse_args(argv)
    for flag, value in (("--seq-length", a.seq_length), ("--gpus", a.gpus), ("--host-mem-gib", a.host_mem_gib),
                        ("--gpu-mem-gib", a.gpu_mem_gib)):
        if value <= 0:
            p.error(f"{flag} must be positive, got {value:g}")
    if a.optimizer_host_bytes < 0:
        p.error(f"--optimizer-host-bytes must be >= 0, got {a.optimizer_host_bytes:g}")
    try:
        m = load_shape(a.model_config)
    except (OSError, ValueError) as e:  # FileNotFoundError, a hub id that does not resolve, a bad config file
        message = str(e)
        p.error(message if message.startswith("--model-config") else f"--model-config {a.model_config}: {message}")
    plan = advise(m, a.seq_length, a.gpus, a.gpu_mem_gib, a.host_mem_gib / a.gpus,
                  optimizer_host_bytes=a.optimizer_host_bytes)
    params = f"{m.params / 1e9:.2f} B" if m.params >= 1e8 else f"{m.params / 1e6:.2f} M"
    gib = lambda x: f"{x:.1f}" if x >= 1 else f"{x:.3f}"  # noqa: E731 - tiny models
    print(f"model: {a.model_config} ({params} params), {a.seq_length} tokens on {a.gpus} GPU(s)")
    print(f"  --seq-algo {plan.seq_algo}" + (f" --ring-degree {plan.ring_degree}" if plan.ring_degree else ""))
    print(f"  memory: {plan.flags()}")
    print(f"  predicted peak: {gib(plan.gpu_gib)} GiB per GPU, {gib(plan.host_gib)} GiB host per GPU")
    for n in plan.notes:
        print(f"  note: {n}")
    return plan


if __name__ == "__main__":
    main()
