"""Long-context full fine-tuning with exact sequence parallelism (the logic lives in easy_context/training/).

CPU demo, no downloads (2 gloo processes, tiny Llama, synthetic data; loss falls from ~5.5 within 20 steps):

    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml train.py --seq-algo zigzag_ring_attn \
        --model-config tiny-llama --init-random --dataset synthetic --seq-length 1024 --max-train-steps 20 \
        --learning-rate 3e-3 --output-dir output/cpu_demo

GPUs, DeepSpeed ZeRO-3 with parameter + optimizer offload, bf16 (recipes: train_scripts/):

    accelerate launch --config_file accelerate_configs/single_node.yaml train.py --seq-algo zigzag_ring_attn \
        --model meta-llama/Llama-2-7b-hf --dataset <packed input_ids dataset> --seq-length 65536 \
        --rope-theta 5000000 --learning-rate 2e-5 --max-train-steps 1000 --output-dir output/7B_64K

Algorithms (--seq-algo, or the seed's --parallel_mode): zigzag_ring_attn, dist_flash_attn, ulysses_attn, usp_attn
(--ring-degree), data_parallel; --sp-size splits the processes into data-parallel replicas of sp-size
sequence-parallel ranks. --checkpointing-steps N saves accelerate state to <output-dir>/checkpoints/step_<k>;
--resume-from-checkpoint latest continues with the same data order and loss curve (after checking the checkpoint's
sha256 hashes and the run's settings; later checkpoints are retired, not deleted). --max-nonfinite-steps N: inf/NaN
steps are skipped, N in a row stop the run; --collective-timeout S: a stuck rank fails the others after S s.
Logs: tensorboard (or wandb, offline with WANDB_MODE=offline) and <output-dir>/train_log.jsonl; the final model is a
save_pretrained folder in --output-dir. Every flag: python train.py --help.
"""
from easy_context.training import main

if __name__ == "__main__":
    main()
