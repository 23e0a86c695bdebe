"""One transformers ``Trainer`` + ``easy_context.prepare_trainer`` run on CUDA (bf16; float32 on CPU for a
smoke run), for tests/gpu/test_trainer_gpu.py;
writes its logged losses, gradient norms, tokens seen and evaluation loss as JSON, and saves the model.

    accelerate launch --config_file accelerate_configs/<cfg>.yaml --num_processes N tests/gpu/trainer_run.py \
        --case ddp|fsdp2|lora|lora_fsdp2|zero3 --out DIR [--init DDP_DIR/init]

Cases: ``ddp`` (the launch's own data parallelism, the reference), ``fsdp2`` (launched with fsdp2_trainer.yaml:
accelerate's FSDP2 plugin from the launch), ``lora`` (a peft LoRA model), ``lora_fsdp2`` (LoRA under FSDP2 asked for
in ``TrainingArguments(fsdp=..., fsdp_config={"version": 2})``), ``zero3`` (``TrainingArguments(deepspeed=...)``
ZeRO stage 3). Without ``--init`` the run draws the model's weights (seed 0) and saves them to DIR/init for the
others: under ZeRO-3 a model built after TrainingArguments is drawn inside ``deepspeed.zero.Init``, with other random
numbers. The model: a Llama of 4 layers, float32 weights under bf16 (autocast or FSDP2's mixed precision),
rows of 2048 tokens (64 distinct ids) with -100 prompts of varying length, gradient accumulation 2, AdamW, 3 steps.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

SEQ, ROWS, VOCAB = 2048, 12, 1024
ZERO3 = {"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}, "train_batch_size": "auto",
         "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}


def rows():
    from datasets import Dataset

    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(ROWS):
        ids = torch.randint(3, 67, (SEQ,), generator=g)  # 64 of the 1024 ids: 3 steps learn to narrow the logits
        labels = ids.clone()
        labels[:100 * (i + 1)] = -100  # the prompt: no loss
        out.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return Dataset.from_list(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", required=True, choices=["ddp", "fsdp2", "lora", "lora_fsdp2", "zero3"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seq-algo", default="zigzag_ring_attn")
    ap.add_argument("--init", help="start from this checkpoint (the ddp case's DIR/init) instead of a random init")
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

    import easy_context

    lora = a.case.startswith("lora")
    extra = {"lora_fsdp2": dict(fsdp="full_shard", fsdp_config={"version": 2}), "zero3": dict(deepspeed=ZERO3)}
    args = TrainingArguments(output_dir=a.out, per_device_train_batch_size=1, per_device_eval_batch_size=1,
                             gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-2 if lora else 3e-3,
                             lr_scheduler_type="constant", optim="adamw_torch", weight_decay=0.0,
                             bf16=torch.cuda.is_available(), logging_steps=1, report_to=[], save_strategy="no",
                             disable_tqdm=True, dataloader_num_workers=0, seed=7, include_num_input_tokens_seen=True,
                             **extra.get(a.case, {}))
    if a.init:  # after TrainingArguments: under ZeRO-3 loaded straight into partitions (deepspeed.zero.Init)
        model = AutoModelForCausalLM.from_pretrained(a.init, dtype=torch.float32, attn_implementation="sdpa")
    else:
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                          num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=SEQ,
                          tie_word_embeddings=False)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()
        if args.process_index == 0:
            model.save_pretrained(os.path.join(a.out, "init"))  # the other cases start from these weights
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)  # the adapters' init: the same in lora and lora_fsdp2
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    data = rows()
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data.select(range(4)))
    easy_context.prepare_trainer(trainer, a.seq_algo)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    result = {"case": a.case, "losses": [h["loss"] for h in logs], "grad_norms": [h["grad_norm"] for h in logs],
              "tokens_seen": [h["num_input_tokens_seen"] for h in logs],
              "tokens_per_second": [h.get("tokens_per_second") for h in logs],
              "fsdp": trainer.is_fsdp_enabled, "deepspeed": trainer.is_deepspeed_enabled,
              "eval_loss": trainer.evaluate()["eval_loss"]}
    trainer.save_model(os.path.join(a.out, "model"))
    if trainer.accelerator.is_main_process:
        with open(os.path.join(a.out, "result.json"), "w") as f:
            json.dump(result, f)
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
