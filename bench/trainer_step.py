"""transformers' Trainer + easy_context.prepare_trainer against train.py's own loop on the same settings, one GPU
(a one-rank process group, W=1 through the registered SP attention): the same losses per step, tokens/s within 5%.

    torchrun --nproc_per_node 1 bench/trainer_step.py --layers 4 --seq-length 65536 --steps 6

Model: the Llama-2-7B shape (hidden 4096, 32 heads, MLP 11008, vocab 32000), random init, ``--layers`` decoder
layers, bf16 weights, gradient checkpointing, AdamW (lr 2e-5, betas 0.9/0.95, no decay, clip 1.0, constant lr).
Data: one synthetic row repeated (the two runs' data orders cannot disagree). Each run writes its log under $OUT
(or a temporary folder); the last line is a JSON verdict: losses of both, median tokens/s over steps 2.., ratio.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's easy_context


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-length", type=int, default=65536)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seq-algo", default="zigzag_ring_attn")
    ap.add_argument("--features", default="", help="comma list of prepare_trainer memory options, e.g. fused_kernels")
    a = ap.parse_args()
    out = os.environ.get("OUT") or tempfile.mkdtemp()
    os.makedirs(out, exist_ok=True)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(0)
    from datasets import Dataset

    from easy_context import training
    from easy_context.data import load_train_dataset

    cfg_path = os.path.join(out, "model_config.json")
    shape = dict(model_type="llama", hidden_size=4096, num_hidden_layers=a.layers, num_attention_heads=32,
                 num_key_value_heads=32, intermediate_size=11008, vocab_size=32000,
                 max_position_embeddings=max(4096, a.seq_length), tie_word_embeddings=False)
    with open(cfg_path, "w") as f:
        json.dump(shape, f)
    row = load_train_dataset("synthetic", seq_length=a.seq_length, vocab_size=32000, num_samples=1, seed=1)[0]
    rows = Dataset.from_list([{"input_ids": row["input_ids"]}] * (a.steps + 1))
    data = os.path.join(out, "data")
    rows.save_to_disk(data)
    features = [f for f in a.features.split(",") if f]

    # 1. train.py's loop
    argv = ["--seq-algo", a.seq_algo, "--model-config", cfg_path, "--init-random", "--dataset", data,
            "--seq-length", str(a.seq_length), "--max-train-steps", str(a.steps), "--learning-rate", "2e-5",
            "--dtype", "bfloat16", "--gradient-checkpointing", "--report-to", "none", "--no-save-model",
            "--overwrite-output-dir",
            "--output-dir", os.path.join(out, "train_py"), *[f"--{f.replace('_', '-')}" for f in features]]
    training.train(training.build_parser().parse_args(argv))
    with open(os.path.join(out, "train_py", training.LOG_FILE)) as f:
        own = [json.loads(line) for line in f]
    torch.cuda.empty_cache()

    # 2. Trainer + prepare_trainer, the same model (same seed, same init), rows and optimizer
    from accelerate.utils import set_seed
    from transformers import Trainer, TrainingArguments

    import easy_context
    from easy_context.training.models import load_causal_lm, load_config

    config = load_config(cfg_path, min_positions=a.seq_length, what="--model-config")
    set_seed(42)  # train.py's --seed default, before the model is built
    model = load_causal_lm(None, config, torch.bfloat16, init_random=True)
    args = TrainingArguments(output_dir=os.path.join(out, "trainer"), per_device_train_batch_size=1, max_steps=a.steps,
                             learning_rate=2e-5, adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0,
                             lr_scheduler_type="constant", optim="adamw_torch", logging_steps=1, report_to=[],
                             save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=42,
                             gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer = Trainer(model=model, args=args, train_dataset=rows.map(lambda r: {"labels": r["input_ids"]}))
    easy_context.prepare_trainer(trainer, a.seq_algo, **{f: True for f in features})
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]

    def median_rate(records):
        return statistics.median(r["tokens_per_second"] for r in records[1:])

    verdict = {"train_py_losses": [r["loss"] for r in own], "trainer_losses": [r["loss"] for r in logs],
               "train_py_tokens_per_s": median_rate(own), "trainer_tokens_per_s": median_rate(logs),
               "max_loss_rel_diff": max(abs(x["loss"] - y["loss"]) / abs(y["loss"]) for x, y in zip(logs, own)),
               "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}
    verdict["speed_ratio"] = verdict["trainer_tokens_per_s"] / verdict["train_py_tokens_per_s"]
    verdict["pass"] = abs(verdict["speed_ratio"] - 1) <= 0.05 and verdict["max_loss_rel_diff"] <= 1e-2
    print(json.dumps(verdict), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
