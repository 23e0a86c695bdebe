"""easy_context against its peers on the same GPUs, in one run, on the same data: PyTorch's context parallel
(``torch.distributed.tensor.experimental.context_parallel``) and DeepSpeed ALST (``UlyssesSPAttentionHF``).

    # (a)+(c) per-rank causal attention, Llama-2-7B heads, bf16, every method (estimated 4-5 min on 2 x H200)
    PYTHONUNBUFFERED=1 torchrun --nproc_per_node 2 bench/peers.py attn --seqs 65536 131072 262144
    #         GQA (32 query / 8 kv heads; ~1 min)
    PYTHONUNBUFFERED=1 torchrun --nproc_per_node 2 bench/peers.py attn --seqs 131072 --kv-heads 8
    # (b)+(c) one training step of a 4-layer Llama-2-7B-shaped model, every method (estimated 3-4 min)
    PYTHONUNBUFFERED=1 torchrun --nproc_per_node 2 bench/peers.py step --seqs 65536 131072 --layers 4
    #         256K with memory features: easy_context's mode grammar; DeepSpeed gets TiledMLP (auto, from "tile")
    PYTHONUNBUFFERED=1 torchrun --nproc_per_node 2 bench/peers.py step --seqs 262144 --ec-mode ec+norm+tile+keep \
        --methods ec_zigzag ec_ulysses ec_usp torch_cp_alltoall_cudnn ds_alst
    #         the step bench/comm_model.py --step --layers 4 --keep predicts (compare s/step)
    PYTHONUNBUFFERED=1 torchrun --nproc_per_node 2 bench/peers.py step --seqs 262144 --ec-mode ec+keep \
        --methods ec_zigzag ec_ulysses --step-ref none
    # the same step on packed rows vs one document per row (issue 15; the one-GPU reference would materialise a
    # document mask, so: --step-ref none, or consensus over several ec methods)
    PYTHONUNBUFFERED=1 torchrun --nproc_per_node 2 bench/peers.py step --seqs 131072 --layers 8 --ec-mode ec+keep \
        --methods ec_zigzag ec_ulysses --step-ref consensus --packed 1024:65536
    # the script itself on CPU (gloo, 2 processes spawned here, tiny shapes; timings mean nothing)
    python bench/peers.py attn step --cpu-smoke

Methods (``--methods``; default all that apply to the part):
  single: attention only, rank 0: F.scaled_dot_product_attention over the whole sequence (``--sdpa-backend``,
      default cuDNN), the baseline of the efficiency column.
  ec_zigzag, ec_ulysses, ec_usp: easy_context through its public API. attn: ``get_attn_func(algo)`` on
      ``shard_sequence(algo, ...)`` shards (``--ec-backend``, default cudnn; ``--usp-ring-degree``). step:
      ``apply_seq_parallel_monkey_patch(algo, model)`` + ``prepare_seq_parallel_inputs`` +
      ``easy_context.loss.sharded_cross_entropy`` on ``model.model(...)``'s hidden states, memory features from
      ``--ec-mode`` (bench/modes.py grammar: ec, ec+keep, ec+norm+tile=16384+off, ...).
  torch_cp_<rotate>_<sdpa>: rotate allgather / alltoall (``set_rotate_method``), sdpa cudnn / flash (``sdpa_kernel``):
      ``context_parallel(mesh, buffers=..., buffer_seq_dims=...)`` with its head-tail load balancing (rank r holds
      chunks r and 2W-1-r: asserted equal to easy_context's zigzag shards), F.scaled_dot_product_attention on
      (B, H, S/W, D) inside. step: the block wraps forward and backward; the model attends through transformers'
      ``sdpa_attention_forward`` under a registered name with no mask (the head-tail position ids would otherwise
      look like packed documents to transformers); loss: the model's own (``labels``/``shift_labels``, full local
      logits) with ``num_items_in_batch`` = global valid targets / W.
  ds_ulysses: attention: ``UlyssesSPAttentionHF(attn=transformers' sdpa_attention_forward, ...)`` called as
      transformers calls an attention function, contiguous shards, SDPA backend ``--sdpa-backend``.
  ds_alst: step: ``UlyssesSPAttentionHF.register_with_transformers(model, "sdpa", W, B)`` (once per process; its
      override of "sdpa" is removed after the method), batches sharded by ``UlyssesSPDataLoaderAdapter``, loss per
      the ALST recipe: Liger's fused linear cross-entropy when installed (CUDA) else DeepSpeed's
      ``sequence_tiled_compute`` over ``--loss-chunk`` tokens, then the token-weighted differentiable all_gather over
      the SP ranks. ``--ds-features`` (default: mirror ``--ec-mode``: tile -> DeepSpeed's ``TiledMLP`` on every MLP,
      off -> ``get_checkpoint_hidden_states_offloading_ctx_manager``). No DeepSpeed engine: like the other methods,
      forward + backward without an optimizer.
  A peer that is not importable (deepspeed absent) or needs CUDA (torch context parallel on CPU) is a
  ``skipped`` row; a method that fails records ``error`` (``OOM: ...`` for out-of-memory) and the run goes on. A
  failure on one rank only can leave the other in a collective until ``--pg-timeout``.

Formulas. Attention (batch B, global length S, H query heads, head dim D, W ranks): causal forward FLOPs
F = 2*B*S^2*H*D (half of 4*B*S^2*H*D), backward 2.5*F, forward+backward 3.5*F (as bench/attention.py). Per-rank
TFLOP/s = FLOPs / W / t, t = the slowest rank's mean time over ``--reps`` CUDA-event-timed calls (forward alone under
no_grad; forward+backward with the same dout). Efficiency = (t_single / W) / t, t_single = ``single``'s time over the
whole sequence on one GPU. Peak extra memory = the rank's max allocated during the timed calls minus what was
allocated before the method made its inputs.
Step (N parameters, T = B*S tokens, L layers, hidden d = H*D): model FLOPs = 6*N*T + 3.5*L*2*B*S^2*d (causal attention
forward + backward; the checkpoint recompute is not counted); s/step = slowest rank's mean over ``--reps`` steps after
``--warmup``; tokens/s = T / s; MFU = FLOPs / W / s / ``--peak-tflops`` (989, H100/H200 dense bf16). Peak memory = max
allocated per rank during the timed steps (weights and gradients included).

Correctness (c). Attention: one exact reference per length, built on every rank from the same full-sequence inputs
on ``--ref-heads`` query heads (whole kv groups): float32 F.sdpa with the memory-efficient kernel on CUDA, float64
on CPU. The yardstick is F.sdpa in the run's dtype (``--sdpa-backend``) on the same heads against that reference;
each method's out/dq/dk/dv (its own layout, those heads) get rel_l2 = ||x - ref|| / ||ref|| over the whole sequence.
A row is WRONG when any of the four exceeds 2x the yardstick's (floor 1e-5 for float32, whose yardstick is ~1e-7).
GQA through SDPA (single, torch CP) uses ``enable_gqa=True``; a backend that refuses it gets K/V repeated to the query
heads inside the call, and the row says ``gqa: repeat``.
Step: ``--step-ref single`` (default) runs the same model on the whole sequence on rank 0 (transformers' sdpa,
easy_context's chunked cross-entropy in float32, no liger; when it fails, e.g. out of memory, the median of the
methods instead); ``consensus`` takes the median of the methods; ``none`` checks nothing. Every
method reports the global token-mean loss and gnorm = ||sum over ranks of d(rank loss)/d(layers[0].q_proj.weight)|| / W
(each method's rank losses are scaled so that this is the gradient of the global mean). A row is WRONG when its loss
differs from the reference by more than 1e-3 relative or its gnorm by more than ``--gnorm-tol`` (2e-2) relative.
A WRONG row never counts as the best peer.

Output: one JSON line per row, appended as it comes, to ``$OUT/peers_attn.jsonl`` / ``$OUT/peers_step.jsonl``
(``--out-dir``; default ``$OUT``, else bench/results/, with ``--cpu-smoke`` a temporary folder), the first line of each
run a ``kind: env`` row; then a markdown table per part with a "vs best peer" column (best peer's time / this row's:
above 1 = faster than every correct peer). ``--cpu-smoke``: gloo, tiny shapes, easy_context's math kernel; spawns its
2 processes itself unless started by torchrun.

Code: this file is the command line (flags, one worker per rank, the output files); the parts are in bench/_peers/:
``common.py`` (method names, ``Env``, shared helpers), ``attn_methods.py`` + ``attn.py`` (attention: the methods;
inputs, reference, verdict, runner), ``step_methods.py`` + ``step.py`` (the step: the methods; model, batch,
reference, verdict, runner), ``tables.py``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)  # bench/_peers/ and the modules it imports (modes.py, _profile.py)
sys.path.insert(1, os.path.dirname(BENCH))  # the checkout's easy_context when it is not installed

from _peers.attn import attn_verdict, checked_heads, run_attn  # noqa: E402,F401 - tests and callers use these names
from _peers.attn_methods import sdpa_case  # noqa: E402,F401
from _peers.common import ATTN_METHODS, DTYPES, EC_ALGOS, LOSS_RTOL, STEP_METHODS, TORCH_CP, Env  # noqa: E402,F401
from _peers.step import run_step, step_verdict  # noqa: E402,F401
from _peers.tables import attn_table, best_peer, step_table  # noqa: E402,F401


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="easy_context vs torch context parallel vs DeepSpeed ALST, same run "
                                "(the module docstring has the commands and formulas)")
    p.add_argument("parts", nargs="+", choices=["attn", "step"], help="attention (a), training step (b), or both")
    p.add_argument("--seqs", type=int, nargs="+", help="global lengths (default attn 64K 128K 256K, step 64K 128K)")
    p.add_argument("--methods", nargs="+", help=f"attn: {' '.join(ATTN_METHODS)}; step: {' '.join(STEP_METHODS)}")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=None, help="GQA kv heads (default: --heads, Llama-2-7B)")
    p.add_argument("--head-dim", type=int, default=128, help="attn; the step's is hidden / heads")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--reps", type=int, default=None, help="timed calls / steps (default attn 3, step 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed fwd+bwd calls / steps before timing")
    p.add_argument("--sdpa-backend", default=None, choices=["cudnn", "flash", "efficient", "math", "auto"],
                   help="single, the yardstick, ds_ulysses / ds_alst, the step reference (default cudnn; CPU auto)")
    p.add_argument("--ec-backend", default=None, help="easy_context kernel backend (default cudnn; CPU math)")
    p.add_argument("--ec-no-check", action="store_true", help="attn: easy_context check=False (no shape all-gather)")
    p.add_argument("--usp-ring-degree", type=int, default=None, help="ec_usp's ring degree (library default if unset)")
    p.add_argument("--ref-heads", type=int, default=4, help="attn: query heads the exact check covers (0: none)")
    p.add_argument("--profile", action="store_true", help="attn: one more fwd+bwd per method under torch.profiler: "
                   "compute/NCCL/idle time in the row, the op table in <out-dir>/profile_rank<r>.txt")
    # step
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--ec-mode", default="ec", help="ec[+norm][+fuse][+tile[=N]][+keep[=N]][+off[=N]] (bench/modes.py)")
    p.add_argument("--ds-features", nargs="+", default=["auto"], choices=["auto", "none", "tiled_mlp", "offload"],
                   help="ds_alst memory features (auto: DeepSpeed's counterparts of --ec-mode's tile and off)")
    p.add_argument("--ds-loss", default="auto", choices=["auto", "liger", "tiled"],
                   help="ds_alst native loss (auto: liger when installed on CUDA, else sequence_tiled_compute)")
    p.add_argument("--loss", default="native", choices=["native", "common"],
                   help="native: each framework's own loss; common: easy_context's chunked CE (no liger) for all")
    p.add_argument("--loss-chunk", type=int, default=4096, help="tokens per loss chunk / tile")
    p.add_argument("--packed", metavar="MIN:MAX", default=None,
                   help="step: packed rows of documents log-uniform in MIN..MAX tokens (easy_context methods only, "
                        "documents balanced as train.py does; MFU counts in-document attention)")
    p.add_argument("--step-ref", default="single", choices=["single", "consensus", "none"])
    p.add_argument("--gnorm-tol", type=float, default=2e-2, help="step: relative gnorm difference that is WRONG")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU for MFU")
    # run
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pg-timeout", type=int, default=900, help="seconds before a stuck collective aborts")
    p.add_argument("--out-dir", default=None, help="default $OUT, else bench/results (--cpu-smoke: a temp folder)")
    p.add_argument("--verbose-errors", action="store_true", help="print tracebacks of failing methods")
    p.add_argument("--cpu-smoke", action="store_true", help="gloo + tiny shapes on CPU: checks the script only")
    a = p.parse_args(argv)
    cuda = not a.cpu_smoke
    if a.cpu_smoke:  # tiny shapes unless given
        a.heads = 4 if a.heads == 32 else a.heads
        a.head_dim, a.hidden, a.intermediate, a.vocab = 16, 64, 128, 256
        a.layers = min(a.layers, 2)
        a.reps, a.warmup = a.reps or 1, 0
        a.loss_chunk = min(a.loss_chunk, 48)
    a.kv_heads = a.kv_heads or a.heads
    a.sdpa_backend = a.sdpa_backend or ("cudnn" if cuda else "auto")
    a.ec_backend = a.ec_backend or ("cudnn" if cuda else "math")
    if "step" in a.parts and a.hidden % a.heads:
        p.error(f"--hidden {a.hidden} is not a multiple of --heads {a.heads}")
    known = set(ATTN_METHODS) | set(STEP_METHODS)
    for m in a.methods or []:
        if m not in known:
            p.error(f"unknown method {m!r}; attn: {' '.join(ATTN_METHODS)}; step: {' '.join(STEP_METHODS)}")
    return a


def part_args(a, part: str):
    """The options of one part: its default lengths, reps and methods."""
    b = argparse.Namespace(**vars(a))
    smoke = a.cpu_smoke
    b.seqs = a.seqs or ({"attn": [64, 128], "step": [128]} if smoke else
                        {"attn": [65536, 131072, 262144], "step": [65536, 131072]})[part]
    b.reps = a.reps or {"attn": 3, "step": 2}[part]
    allowed = ATTN_METHODS if part == "attn" else STEP_METHODS
    b.methods = [m for m in (a.methods or allowed) if m in allowed]
    if part == "step":
        b.head_dim = a.hidden // a.heads
    return b


def _worker(rank: int | None, a, init_method: str | None):
    """One rank: join the group (torchrun's env, or the file rendezvous of --cpu-smoke's spawn) and run the parts."""
    timeout = datetime.timedelta(seconds=a.pg_timeout)
    if a.cpu_smoke:
        torch.set_num_threads(1)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        dev = torch.device("cpu")
        kw = dict(init_method=init_method, rank=rank, world_size=2) if init_method else {}
        dist.init_process_group("gloo", timeout=timeout, **kw)
    else:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", timeout=timeout, device_id=dev)
    from torch.distributed.device_mesh import init_device_mesh

    env = Env(dev, dist.get_rank(), dist.get_world_size(),
              init_device_mesh(dev.type, (dist.get_world_size(),), mesh_dim_names=("cp",)))
    out_dir = a.out_dir
    files = {part: os.path.join(out_dir, f"peers_{part}.jsonl") for part in ("attn", "step")}
    run_id = datetime.datetime.now().isoformat(timespec="seconds")

    def write(part: str, row: dict):
        if env.rank == 0:
            line = json.dumps(dict(row, run=run_id))
            print(line, flush=True)
            with open(files[part], "a") as f:
                f.write(line + "\n")

    info = dict(kind="env", world=env.world, device=str(dev), torch=torch.__version__, argv=sys.argv[1:])
    if env.cuda:
        info.update(gpu=torch.cuda.get_device_name(dev), cudnn=torch.backends.cudnn.version())
    for mod in ("transformers", "deepspeed", "liger_kernel", "easy_context"):
        try:
            info[mod] = getattr(__import__(mod), "__version__", "installed")
        except Exception as e:  # noqa: BLE001
            info[mod] = f"unavailable: {e!r}"[:160]
    try:
        for part in a.parts:
            b = part_args(a, part)
            write(part, dict(info, part=part, methods=b.methods, seqs=b.seqs))
            rows = run_attn(env, b, write) if part == "attn" else run_step(env, b, write)
            if env.rank == 0:
                print("\n" + (attn_table(rows) if part == "attn" else step_table(rows)) + "\n", flush=True)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv=None):
    a = parse_args(argv)
    if a.out_dir is None:
        a.out_dir = os.environ.get("OUT") or (tempfile.mkdtemp(prefix="peers_smoke_") if a.cpu_smoke else
                                              os.path.join(BENCH, "results"))
    os.makedirs(a.out_dir, exist_ok=True)
    if a.cpu_smoke and "RANK" not in os.environ:  # not under torchrun: start the 2 gloo ranks here
        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(_worker, args=(a, f"file://{tmp}/rendezvous"), nprocs=2, start_method="spawn")
    else:
        _worker(None, a, None)
    print(f"rows in {a.out_dir}/peers_{{attn,step}}.jsonl", flush=True)


if __name__ == "__main__":
    main()
