#!/usr/bin/env bash
# The progressive long-context recipe (the seed's EasyContext-1M-Llama-2-7B, stages merged to 32K -> 64K -> 256K
# -> 512K): Llama-2-7B on one node of 8 80GB GPUs, DeepSpeed ZeRO-3 with parameter + optimizer offload, lr 2e-5,
# RoPE base raised with the length, each stage starting from the previous stage's saved model.
# Short stages fit one GPU's sequence (data_parallel); 256K+ shard the sequence over the 8 GPUs (zigzag ring).
# The step counts are the seed's (chosen by its author to fit a schedule, not tuned). Host RAM: the offloaded
# optimizer state (~16 bytes per parameter, ~108 GB for 7B) and parameters; under a ZeRO-3 launch transformers
# builds the model inside deepspeed.zero.Init, so each process holds only its partition of the weights.
#   bash train_scripts/progressive_llama2_7b.sh
# Datasets: packed input_ids rows at least as long as the stage's --seq-length (the seed's hub sets by default;
# make your own with prepare_data.py). Add --report-to wandb (WANDB_MODE=offline works) to follow the loss.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
BASE=${BASE:-meta-llama/Llama-2-7b-hf}
DATA_64K=${DATA_64K:-yaofu/slimpajama-per-source-length-upsample}
DATA_256K=${DATA_256K:-PY007/slimpajama_llama_tokenized_upsample_4096_chunk_256K}
DATA_1M=${DATA_1M:-PY007/slimpajama_llama_tokenized_upsample_4096_chunk_1M}
OUT=${OUT:-output}

stage() {  # stage <model> <out> <seq> <rope theta> <steps> <grad accum> <seed> <mode> <dataset>
    accelerate launch --config_file accelerate_configs/single_node.yaml train.py \
        --model "$1" --output-dir "$2" --seq-length "$3" --rope-theta "$4" --max-train-steps "$5" \
        --gradient-accumulate-every "$6" --seed "$7" --seq-algo "$8" --dataset "$9" \
        --batch-size 1 --learning-rate 2e-5 --gradient-checkpointing --checkpointing-steps 100 \
        --fused-kernels --attn-preserving-checkpointing  # fits every stage (python -m easy_context.advise)
}

stage "$BASE"                 "$OUT/7B_32K_rope_1M"    32768  1000000   1000 4 2022 data_parallel    "$DATA_64K"
stage "$OUT/7B_32K_rope_1M"   "$OUT/7B_64K_rope_5M"    65536  5000000   1000 2 2023 data_parallel    "$DATA_64K"
stage "$OUT/7B_64K_rope_5M"   "$OUT/7B_256K_rope_25M"  256000 25000000  500  4 2024 zigzag_ring_attn "$DATA_256K"
stage "$OUT/7B_256K_rope_25M" "$OUT/7B_512K_rope_100M" 512000 100000000 300  2 2025 zigzag_ring_attn "$DATA_1M"
# The seed finally set rope_theta in the last stage's config.json to 1e9 for evaluation beyond 512K.
# A killed stage continues with the same data order and loss curve: rerun its line with
#   --resume-from-checkpoint latest
