#!/usr/bin/env bash
# Long context on ONE GPU: no sequence parallelism (data_parallel on 1 process), so every activation-memory
# feature is on: DeepSpeed ZeRO-3 offloads parameters and optimizer state to CPU, checkpointed layer inputs go to
# host memory, the recompute reuses attention outputs, the MLP runs in sequence tiles, and the LM head + loss run
# in chunks (never full-vocabulary logits). Example: Llama-3.1-8B at 128K tokens on one 80-140 GB GPU.
#   bash train_scripts/single_gpu_long_context.sh [extra train.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
MODEL=${MODEL:-meta-llama/Llama-3.1-8B}
DATA=${DATA:?set DATA to a packed input_ids dataset with rows of >= 131072 tokens (prepare_data.py)}
accelerate launch --config_file accelerate_configs/single_node.yaml --num_processes 1 train.py \
    --parallel_mode data_parallel \
    --model "$MODEL" --dataset "$DATA" \
    --seq-length 131072 --rope-theta 4000000 \
    --batch-size 1 --gradient-accumulate-every 8 \
    --learning-rate 2e-5 --max-train-steps 200 \
    --gradient-checkpointing --offload-checkpointing --attn-preserving-checkpointing --tiled-mlp \
    --checkpointing-steps 50 \
    --output-dir output/single_gpu_128K \
    "$@"
