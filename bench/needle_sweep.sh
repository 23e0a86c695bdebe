#!/usr/bin/env bash
# Several bench/needle_probe.py settings side by side on the GPUs of one machine (PER_GPU processes each), to pick
# the needle demo's warm-up before spending a whole demo run on it. One JSON line per evaluation in
# $OUT_DIR/<name>.jsonl; a summary line per setting at the end: its parameters, the first step with accuracy >= 0.9,
# the last accuracy.
#   SECONDS_EACH=300 OUT_DIR=$OUT bash bench/needle_sweep.sh "name:probe flags" "name:probe flags" ...
set -uo pipefail
cd "$(dirname "$0")/.."
: "${SECONDS_EACH:=300}" "${OUT_DIR:=runs/needle_sweep}" "${PER_GPU:=4}"
gpus=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
mkdir -p "$OUT_DIR"
i=0
for spec in "$@"; do
    name=${spec%%:*}
    # shellcheck disable=SC2086  # the flags are meant to split
    CUDA_VISIBLE_DEVICES=$((i % gpus)) OMP_NUM_THREADS=2 \
        python bench/needle_probe.py --seconds "$SECONDS_EACH" ${spec#*:} \
        > "$OUT_DIR/$name.jsonl" 2> "$OUT_DIR/$name.err" &
    i=$((i + 1))
    if (( i % (gpus * PER_GPU) == 0 )); then wait; fi
done
wait
python - "$OUT_DIR" "$@" <<'PY'
import json, sys
for spec in sys.argv[2:]:
    name = spec.split(":")[0]
    rows = [json.loads(line) for line in open(f"{sys.argv[1]}/{name}.jsonl")]
    evals = [r for r in rows if "accuracy" in r]
    first = next((r["step"] for r in evals if r["accuracy"] >= 0.9), None)
    print(json.dumps({"name": name, "parameters": rows[0].get("parameters") if rows else None, "first_0.9": first,
                      "last": evals[-1] if evals else None}))
PY
