#!/usr/bin/env bash
# The speed measurements issues 15 and 16 are judged by, in one device call on nvidia-h200-x2 (at most ~9.5 minutes):
# run it before and after a lever (git checkout the branch; the acceptance suite, bench/gpu_acceptance.sh, is separate)
# and record both in bench/RESULTS.md.
#
#   bash bench/speed_set.sh            # everything below, raw files under $OUT (or bench/results/speed_set)
#   PARTS="attn packed" bash bench/speed_set.sh
#
#   attn     bench/peers.py attn at 64K / 128K / 256K: easy_context's three algorithms, the best peers of each kind
#            (torch context parallel cuDNN all-to-all rotate, DeepSpeed Ulysses) and the single-GPU baseline
#   packed   bench/packed_attn.py: 128K (cudnn, auto; profiled) and 512K (cudnn) rows of 1K-64K documents, and a
#            128K row of 128-2K documents (cudnn, auto)
#   step     bench/peers.py step, Llama-2-7B shape with 8 layers at 128K, ec zigzag and ulysses, one document per
#            row and packed rows of 1K-64K documents (issue 15's packed vs unpacked step)
#
# Each part has its own time limit (ATTN_S; P128_S, P512_S, PSFT_S for the three packed rows; STEP_S) so that one slow
# part cannot take the call's 10 minutes; a part that runs out is reported, and the next one starts. Measured
# 2026-11-30 (RESULTS 13, 14b): packed 128K 28 s, the step halves 84 s and 60 s; 512K needed more than 55 s; attn
# more than 140 s (it ended before the 256K peers).
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ! python3 -c "import deepspeed" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "FAIL installing .whl/"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
: "${PARTS:=attn packed step}" "${ATTN_S:=185}" "${P128_S:=40}" "${P512_S:=90}" "${PSFT_S:=70}" "${STEP_S:=155}"
# 540 s: inside one 600-s call
root=${OUT:-bench/results/speed_set}
mkdir -p "$root"
echo "# speed set, $(date -u +%Y-%m-%dT%H:%MZ), commit ${EASY_CONTEXT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo '?')}"
# (EASY_CONTEXT_COMMIT first, as run.json does: a lent GPU's copy of the tree can carry a stale .git)

part() {  # name, seconds, command...: run it with a time limit, its output in $root/<name>.log
  local name=$1 secs=$2
  shift 2
  local t0=$SECONDS
  timeout "$secs" "$@" > "$root/$name.log" 2>&1
  local rc=$?
  echo "## $name: exit $rc in $((SECONDS - t0)) s$([ $rc -eq 124 ] && echo " (time limit $secs s)")"
}

for p in $PARTS; do
  case $p in
    attn)
      part attn "$ATTN_S" torchrun --nproc_per_node 2 bench/peers.py attn --seqs 65536 131072 262144 \
        --methods single ec_zigzag ec_ulysses ec_usp torch_cp_alltoall_cudnn ds_ulysses --out-dir "$root"
      grep "^| " "$root/attn.log" ;;
    packed)
      mkdir -p "$root/packed_128k" "$root/packed_512k" "$root/packed_sft"
      part packed_128k "$P128_S" env OUT="$root/packed_128k" python bench/packed_attn.py --seqs 131072 \
        --backends cudnn auto --profile
      part packed_512k "$P512_S" env OUT="$root/packed_512k" python bench/packed_attn.py --seqs 524288 \
        --backends cudnn
      part packed_sft "$PSFT_S" env OUT="$root/packed_sft" python bench/packed_attn.py --seqs 131072 \
        --min-doc 128 --max-doc 2048 --backends cudnn auto
      python3 - "$root" <<'PY'
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("packed_*/packed_attn.jsonl")):
    rows = [json.loads(line) for line in f.open()]
    dense = {r["S"]: r["TFLOPs"] for r in rows if r["kind"] == "dense_cudnn_1gpu"}
    for r in rows:
        if r["kind"] == "packed" and "TFLOPs_per_rank" in r:
            print(f"{f.parent.name:12s} {r['algo']:17s} {r['backend']:6s} docs {r['docs']:4d} warm {r['warm_s']:.4f} s"
                  f"  {r['TFLOPs_per_rank']:6.1f} TFLOP/s per rank = {r['TFLOPs_per_rank'] / dense[r['S']]:.3f} of"
                  f" dense  cold {r['cold_s']:.2f} s")
        elif r["kind"] == "packed":
            print(f"{f.parent.name:12s} {r['algo']:17s} {r['backend']:6s} ERROR {r.get('error', '')[:100]}")
PY
      ;;
    step)
      part step_dense "$((STEP_S / 2))" torchrun --nproc_per_node 2 bench/peers.py step --seqs 131072 --layers 8 \
        --ec-mode ec+keep --methods ec_zigzag ec_ulysses --step-ref consensus --out-dir "$root/step_dense"
      part step_packed "$((STEP_S / 2))" torchrun --nproc_per_node 2 bench/peers.py step --seqs 131072 --layers 8 \
        --ec-mode ec+keep --methods ec_zigzag ec_ulysses --step-ref consensus --packed 1024:65536 \
        --out-dir "$root/step_packed"
      grep -h "^| " "$root/step_dense.log" "$root/step_packed.log" ;;
    *) echo "unknown part $p (attn, packed, step)"; exit 2 ;;
  esac
done
