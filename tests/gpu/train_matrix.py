"""Runs train.py's loop for a list of configurations in one launched process group; writes each one's losses.

    accelerate launch --config_file accelerate_configs/<cfg>.yaml --num_processes N tests/gpu/train_matrix.py \
        --suite ddp|zero3|reference --work DIR --out RESULTS.json

Each configuration is exactly ``train.py``'s ``main(argv)`` (``easy_context.training.train``) with accelerate's
process-wide state reset in between, so one launch (one NCCL group, one DeepSpeed CPU-Adam build) serves them all:
launching each of the 11 configurations of a suite separately would cost ~20 s of start-up apiece.
``--suite zero3`` also trains one configuration with the model saved and records its loss on a fixed batch
(``SAVED_EVAL``) as the trained (patched, partitioned) model computes it, for the reload check.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from easy_context import SEQ_ALGOS, prepare_seq_parallel_inputs, training  # noqa: E402

SEQ, STEPS, EVAL_SEED = 8192, 2, 99
MODEL = dict(model_type="llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=SEQ, tie_word_embeddings=False)
MEMORY = ["--gradient-checkpointing", "--offload-checkpointing", "--attn-preserving-checkpointing", "--tiled-mlp",
          "--tiled-mlp-tile-size", "1024", "--low-memory-rmsnorm", "--fused-kernels"]
# float32 weights under bf16 autocast: attention then gets float32 q/k and a bf16 v (the needle demo's recipe)
AUTOCAST = ["--dtype", "float32", "--mixed-precision", "bf16"]


def common(work: str, name: str, *extra: str, seq: int = SEQ) -> list[str]:
    return ["--model_config", os.path.join(work, "config.json"), "--init_random", "--dataset", "synthetic",
            "--seq-length", str(seq), "--max-train-steps", str(STEPS), "--learning-rate", "3e-4", "--seed", "11",
            "--report-to", "none", "--no-save-model", "--output-dir", os.path.join(work, name), *extra]


def packed_dataset(work: str, seq: int = SEQ) -> str:
    """A dataset of packed rows (documents log-uniform in 64..seq/2 tokens, positions restarting per document), the
    same content in every process (seeded); each process writes its own copy (no cross-process wait)."""
    import math

    from datasets import Dataset

    from easy_context.data import synthetic_dataset

    path = os.path.join(work, f"packed_data_rank{os.environ.get('RANK', '0')}")
    if os.path.exists(path):
        return path
    rows = synthetic_dataset(8, seq, MODEL["vocab_size"], seed=5)["input_ids"]
    gen = torch.Generator().manual_seed(6)
    positions = []
    for _ in rows:
        pos = []
        while len(pos) < seq:
            n = int(math.exp(math.log(64) + torch.rand((), generator=gen).item() * math.log(seq / 128)))
            pos += list(range(n))
        positions.append(pos[:seq])
    Dataset.from_dict({"input_ids": rows, "position_ids": positions}).save_to_disk(path)
    return path


def suite(name: str, work: str, seq: int = SEQ) -> dict[str, list[str]]:
    packed = ["--dataset", os.path.join(work, f"packed_data_rank{os.environ.get('RANK', '0')}")]
    if name == "reference":  # one GPU: what every SP mode (batch 1) and 2-replica data_parallel (batch 2) must give
        return {"batch1": common(work, "ref_b1", "--parallel_mode", "data_parallel", seq=seq),
                "batch2": common(work, "ref_b2", "--parallel_mode", "data_parallel", "--batch-size", "2", seq=seq),
                # transformers' own attention masks the documents of packed rows (data_parallel, one GPU)
                "packed": common(work, "ref_packed", "--parallel_mode", "data_parallel", *packed, seq=seq),
                "autocast": common(work, "ref_autocast", "--parallel_mode", "data_parallel", *AUTOCAST, seq=seq)}
    runs = {}
    # packed documents (the dataset's position_ids): every algorithm that takes them, plain and with memory features
    for mode, flags in (("zigzag_ring_attn", []), ("ulysses_attn", []), ("usp_attn", []),
                        ("zigzag_ring_attn", MEMORY)):
        runs[f"{mode} {'memory' if flags else 'plain'} packed"] = common(
            work, f"{mode}_{'memory' if flags else 'plain'}_packed", "--parallel_mode", mode, *flags, *packed,
            seq=seq)
    for mode in (m for m in SEQ_ALGOS if m != "data_parallel"):
        runs[f"{mode} autocast"] = common(work, f"{mode}_autocast", "--parallel_mode", mode, *AUTOCAST, seq=seq)
    for features, flags in (("plain", []), ("memory", MEMORY)):  # plain first: --fused-kernels swaps RoPE globally
        for mode in SEQ_ALGOS:
            runs[f"{mode} {features}"] = common(work, f"{mode}_{features}", "--parallel_mode", mode, *flags, seq=seq)
        runs[f"usp_attn ring_degree=1 {features}"] = common(work, f"usp_r1_{features}", "--parallel_mode", "usp_attn",
                                                            "--ring-degree", "1", *flags, seq=seq)
    if name == "zero3":
        runs["save"] = [x for x in common(work, "zero3_saved", "--parallel_mode", "zigzag_ring_attn", seq=seq)
                        if x != "--no-save-model"]
    return runs


def eval_batch(vocab: int, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(EVAL_SEED))


@torch.no_grad()
def sp_loss(model, seq_algo: str, ids: torch.Tensor) -> float:
    """Token-mean next-token loss of ``ids`` through the trained model's own (sequence-parallel) forward."""
    import torch.distributed as dist

    from easy_context.data import shift_targets

    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    p = prepare_seq_parallel_inputs(seq_algo, ids, None, shift_targets(ids), rank, world, device)
    logits = model(input_ids=p["local_input_ids"], position_ids=p["local_position_ids"]).logits.float()
    tgt = p["local_target_ids"]
    total = torch.stack([torch.nn.functional.cross_entropy(logits[0], tgt[0], reduction="sum", ignore_index=-100),
                         (tgt != -100).sum().float()])
    dist.all_reduce(total)
    return (total[0] / total[1]).item()


def main() -> None:
    from accelerate.state import AcceleratorState, GradientState

    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", choices=("ddp", "zero3", "reference"), required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seq", type=int, default=SEQ, help="tokens per sequence (a CPU dry run of the driver: 256)")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    with open(os.path.join(a.work, "config.json"), "w") as f:
        json.dump(MODEL, f)
    packed_dataset(a.work, a.seq)
    runs = suite(a.suite, a.work, a.seq)
    results = {}
    for name, argv in runs.items():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        try:
            out = training.train(training.build_parser().parse_args(argv))
        except Exception as e:  # noqa: BLE001 - recorded for the test of this configuration; the others go on
            import traceback

            results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        else:
            results[name] = {"losses": [out["losses"][s] for s in sorted(out["losses"])],
                             "grad_norms": [out["grad_norms"].get(s) for s in sorted(out["losses"])]}
            if name == "save":
                results[name]["saved_dir"] = os.path.join(a.work, "zero3_saved")
                results[name]["eval_loss"] = sp_loss(out["model"], "zigzag_ring_attn",
                                                     eval_batch(MODEL["vocab_size"], a.seq))
                results[name]["eval_seq"] = a.seq
            del out
        print(f"[train_matrix] {name}: {results[name]}", flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if int(os.environ.get("RANK", "0")) == 0:  # after every configuration: a launch cut short keeps the rest
            with open(a.out, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
