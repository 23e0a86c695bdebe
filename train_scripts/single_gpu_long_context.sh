#!/usr/bin/env bash
# Long context on ONE GPU: a ring of one (easy_context's cuDNN attention, which attention-preserving
# checkpointing builds on), DeepSpeed ZeRO-3 offloading the optimizer state to CPU, the recompute reusing every
# layer's attention output, fused RMSNorm/SwiGLU/RoPE kernels, and the LM head + loss in chunks (never
# full-vocabulary logits). Example: Llama-3.1-8B at 128K tokens on one 141 GB H200, the setup measured fastest
# for Llama-2-7B (1.25x stock HF, bench/RESULTS.md 7a). Other GPUs, models or lengths: take the memory flags that
#   python -m easy_context.advise --model-config <config> --seq-length <N> --gpus 1 --host-mem-gib <host RAM>
# prints (at 256K-512K it adds --tiled-mlp and a partial --offload-checkpointing N).
#   bash train_scripts/single_gpu_long_context.sh [extra train.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
MODEL=${MODEL:-meta-llama/Llama-3.1-8B}
DATA=${DATA:?set DATA to a packed input_ids dataset with rows of >= 131072 tokens (prepare_data.py)}
accelerate launch --config_file accelerate_configs/single_node.yaml --num_processes 1 train.py \
    --seq-algo zigzag_ring_attn \
    --model "$MODEL" --dataset "$DATA" \
    --seq-length 131072 --rope-theta 4000000 \
    --batch-size 1 --gradient-accumulate-every 8 \
    --learning-rate 2e-5 --max-train-steps 200 \
    --gradient-checkpointing --fused-kernels --attn-preserving-checkpointing \
    --checkpointing-steps 50 \
    --output-dir output/single_gpu_128K \
    "$@"
