#!/usr/bin/env bash
# The 2-GPU acceptance suite (tests/gpu, pytest marker `gpu`), for the lent nvidia-h200-x2 machine, in two device calls
# made back to back (the second reuses the first's one-GPU reference runs when the machine is still the same):
#
#   bash bench/gpu_acceptance.sh 1    # kernels on 1 GPU, every algorithm x option x dtype x backend over NCCL (dense
#                                     # rows and packed documents),
#                                     # train.py DDP matrix, one-GPU references (DDP and ZeRO-3)
#   bash bench/gpu_acceptance.sh 2    # train.py ZeRO-3 matrix, save -> reload, eval_ppl / eval_needle under ZeRO-3
#   bash bench/gpu_acceptance.sh all  # all of tests/gpu in one run (~15 min: longer than one device call; on the
#                                     # lent machines use 1, 2 and onetrain)
#   bash bench/gpu_acceptance.sh one  # what one GPU can run: the kernels (fa4 among them; its windows, soft-capping
#                                     # and sinks too) and every algorithm in a
#                                     # simulated multi-rank world, the patched Llama at W=1 with fa4
#   bash bench/gpu_acceptance.sh onetrain  # a call of its own (~6 min on one GPU; with 2 GPUs also FSDP2 on 2
#                                     # ranks): train.py --fsdp2 / --lora-r / ZeRO-3 and the Trainer under FSDP2,
#                                     # ZeRO-3 and LoRA, each vs DDP
#
# Prints one PASS/FAIL/SKIP line per check (with its measured errors) and a summary line last. Logs go to $OUT
# (the device machine's returned folder) or bench/results/. Wheels the machine lacks (deepspeed, ...) are installed
# from .whl/ when it is there (see ../shared/device-wheels/README.md). Run it after any change to kernels, algorithms,
# the HF integration, memory features or training, and record its output in bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-all}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ] && ! python3 -c "import deepspeed" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "FAIL installing .whl/"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# FlashAttention-4 unpacked by ../shared/device-wheels/fa4 (the lent machine): on the path, so backend fa4 is tested
if [ -d /tmp/site/flash_attn/cute ]; then
  export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
logdir=${OUT:-bench/results}
mkdir -p "$logdir"
export EASY_CONTEXT_GPU_WORK=/tmp/easy_context_acceptance
case $part in
  1|all) rm -rf "$EASY_CONTEXT_GPU_WORK" ;;
esac
mkdir -p "$EASY_CONTEXT_GPU_WORK"
case $part in
  one) sel=(tests/test_memory.py tests/gpu/test_kernels_gpu.py tests/gpu/test_fa4_gpu.py tests/gpu/test_families_gpu.py) ;;
  onetrain) sel=(tests/gpu/test_sharding_gpu.py tests/gpu/test_trainer_gpu.py) ;;  # ~6 min on one H200
  1) sel=(tests/test_memory.py tests/gpu/test_kernels_gpu.py tests/gpu/test_fa4_gpu.py tests/gpu/test_families_gpu.py tests/gpu/test_attention_nccl.py tests/gpu/test_packed_nccl.py tests/gpu/test_train_gpu.py -k "not zero3 and not reload and not eval") ;;
  2) sel=(tests/gpu/test_train_gpu.py -k "zero3 or reload or eval") ;;
  kernels) sel=(tests/test_memory.py tests/gpu/test_kernels_gpu.py tests/gpu/test_fa4_gpu.py tests/gpu/test_families_gpu.py tests/gpu/test_attention_nccl.py tests/gpu/test_packed_nccl.py) ;;  # part 1 less training
  all) sel=(tests/test_memory.py tests/gpu) ;;
  *) echo "usage: $0 1|2|all|kernels|one|onetrain"; exit 2 ;;
esac
checks="$logdir/acceptance_part${part}_checks.txt"
: > "$checks"
export EASY_CONTEXT_ACCEPTANCE_LOG=$PWD/$checks
[ "${checks#/}" != "$checks" ] && export EASY_CONTEXT_ACCEPTANCE_LOG=$checks
{
  echo "# easy_context GPU acceptance, part $part, $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version(), 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
  python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>/dev/null || echo "deepspeed not installed"
  python3 -c "from importlib.metadata import version as v; print('flash-attn-4', v('flash-attn-4'), 'nvidia-cutlass-dsl', v('nvidia-cutlass-dsl'))" 2>/dev/null || echo "flash-attn-4 not installed: fa4 cases skip"
} > "$logdir/acceptance_part${part}.log" 2>&1
start=$(date +%s)
python3 -m pytest -m gpu -p no:cacheprovider -q -rfE "${sel[@]}" >> "$logdir/acceptance_part${part}.log" 2>&1
rc=$?
head -3 "$logdir/acceptance_part${part}.log"
cat "$checks"
pass=$(grep -c '^PASS' "$checks"); fail=$(grep -c '^FAIL' "$checks"); skip=$(grep -c '^SKIP' "$checks")
[ "$rc" -ne 0 ] && [ "$fail" -eq 0 ] && { tail -30 "$logdir/acceptance_part${part}.log"; fail=1; }
echo "SUMMARY part $part: $pass passed, $fail failed, $skip skipped in $(( $(date +%s) - start )) s (pytest exit $rc)"
[ "$fail" -eq 0 ]
