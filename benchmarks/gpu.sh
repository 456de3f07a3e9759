#!/usr/bin/env bash
# One prepared GPU check (meant to fit one 8-minute call on one H100/H200): the tests marked `cuda`
# (pytest -m cuda), `vaqkd bench --device cuda`, a short timed training on real CIFAR-100 -- an FP32 teacher,
# then QKD and VA-QKD logit students from it -- and a small table (QKD and VA-QKD logit, 2 seeds) packed onto
# the one GPU (Ray tasks where Ray is installed, else 4 local processes) against the same cells one at a time;
# every figure written under $OUT_DIR. Each stage runs under its own time limit and a failing stage does not
# stop the next: stages.txt says how each ended, and summary.json holds what the stages that ran produced.
# Goals on an H100: FP32 epoch over 50k images <= 2 s, W2A2 VA-QKD epoch <= 4 s.
#
#   DATA=/path/holding/cifar-100-python DEVICE=cuda OUT_DIR=results/gpu bash benchmarks/gpu.sh
#   DATA=... DEVICE=cpu SMALL=1 bash benchmarks/gpu.sh      # the same path on a CPU, tiny (a correctness check)
#
# DATA may hold a class-balanced part of CIFAR-100 (scripts/cifar_part.py): epoch times are then scaled to
# 50k images in summary.json (per_50k_epoch_s) and the accuracies are those of the smaller training set.
# PYTHON (default python3) runs everything; VAQKD defaults to "$PYTHON -m vaqkd", so an uninstalled checkout
# runs with PYTHONPATH=src.
set -uo pipefail
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-${VAQKD_DATA:-data}}
OUT_DIR=${OUT_DIR:-results/gpu}
PYTHON=${PYTHON:-python3}
VAQKD=${VAQKD:-$PYTHON -m vaqkd}
mkdir -p "$OUT_DIR"
# a rerun into the same folder starts clean: old figures must not pass for this run's (and `vaqkd table` would
# reuse the old cells)
rm -rf "$OUT_DIR"/bench.json "$OUT_DIR"/summary.json "$OUT_DIR"/table_packed "$OUT_DIR"/table_one_at_a_time \
  "$OUT_DIR"/table_*.seconds "$OUT_DIR"/runs
if [ "${SMALL:-0}" = 1 ]; then
  BENCH=(--quick); T_EPOCHS=1; S_EPOCHS=1; BATCH=64; WARMUP=0; CPUS=1; GPUS=0
  SUBSET=(--set data.subset_per_class=2 --set data.test_subset_per_class=2); TABLE_SUBSET=2; LIMIT=300
else
  BENCH=(--batch 256); T_EPOCHS=15; S_EPOCHS=5; BATCH=512; WARMUP=1; CPUS=2; GPUS=0.25
  SUBSET=(); TABLE_SUBSET=${TABLE_SUBSET:-100}; LIMIT=${STAGE_LIMIT:-240}
fi
if $PYTHON -c "import ray" 2> /dev/null; then
  PACK=(--launcher ray --cpus-per-run $CPUS --gpus-per-run $GPUS); PACKED_BY="ray"
else
  PACK=(--launcher local --jobs 4); PACKED_BY="local processes (Ray is not installed)"
fi
COMMON=(--data-root "$DATA" --no-progress --set train.device="$DEVICE" --set data.batch_size=$BATCH
        --set data.eval_batch_size=1000 --set train.channels_last=true ${SUBSET[@]+"${SUBSET[@]}"})

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true; } > "$OUT_DIR/device.txt"
git rev-parse HEAD > "$OUT_DIR/git_sha.txt" 2>/dev/null || true
echo "$0 DEVICE=$DEVICE SMALL=${SMALL:-0} DATA=$DATA PACKED_BY=$PACKED_BY" > "$OUT_DIR/command.txt"
$PYTHON -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda)" \
  > "$OUT_DIR/versions.txt" 2>&1
: > "$OUT_DIR/stages.txt"

stage() {  # stage NAME LIMIT_S CMD...: run CMD under a time limit, log its output, record how it ended
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s.%N)
  timeout -k 30 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$(awk "BEGIN{print $(date +%s.%N) - $t0}")" | tee -a "$OUT_DIR/stages.txt"
  return $rc
}

if [ "$DEVICE" = cuda ]; then  # the GPU path's tests first: a failure here explains any later one
  stage cuda_tests $((LIMIT + 60)) $PYTHON -m pytest -m cuda -p no:cacheprovider -q tests/test_cuda.py
fi
stage bench "$LIMIT" $VAQKD bench --device "$DEVICE" "${BENCH[@]}" --json --out "$OUT_DIR/bench.json"

RUNS="$OUT_DIR/runs"
stage teacher "$LIMIT" $VAQKD train configs/cifar100/teacher_resnet32.toml --out "$RUNS/teacher" "${COMMON[@]}" \
  --set optim.epochs=$T_EPOCHS --set optim.lr=0.2 --set optim.schedule=onecycle --set optim.warmup_epochs=$WARMUP
if [ -f "$RUNS/teacher/final.json" ]; then
  for row in qkd_logit vaqkd_logit; do
    stage "$row" "$LIMIT" $VAQKD train "configs/cifar100/$row.toml" --out "$RUNS/$row" "${COMMON[@]}" \
      --set distill.teacher="$RUNS/teacher" --set model.init="$RUNS/teacher" \
      --set optim.epochs=$S_EPOCHS --set optim.lr=0.04 --set optim.schedule=cosine --set optim.milestones=[]
  done
  # a small table: packed onto the device, then the same cells one at a time
  TABLE=(--preset quick --rows qkd_logit vaqkd_logit --seeds 2 --data-root "$DATA" --teacher "$RUNS/teacher"
         --set train.device="$DEVICE" --set optim.epochs=2 --set data.subset_per_class=$TABLE_SUBSET)
  for how in packed one_at_a_time; do
    LAUNCH=("${PACK[@]}"); [ "$how" = one_at_a_time ] && LAUNCH=()
    start=$(date +%s.%N)
    stage "table_$how" "$LIMIT" $VAQKD table "${TABLE[@]}" ${LAUNCH[@]+"${LAUNCH[@]}"} \
      --runs-dir "$OUT_DIR/table_$how/run_dirs" --out "$OUT_DIR/table_$how" \
      && echo "$start $(date +%s.%N)" > "$OUT_DIR/table_$how.seconds"
  done
fi

$PYTHON - "$OUT_DIR" "$PACKED_BY" <<'PY'
import json, sys
from pathlib import Path
out, packed_by = Path(sys.argv[1]), sys.argv[2]
summary = {"stages": (out / "stages.txt").read_text().splitlines(), "packed_by": packed_by}
for run in ("teacher", "qkd_logit", "vaqkd_logit"):
    if not (out / "runs" / run / "final.json").exists():
        continue
    rows = [json.loads(x) for x in (out / "runs" / run / "metrics.jsonl").read_text().splitlines()]
    final = json.loads((out / "runs" / run / "final.json").read_text())
    median = sorted(r["epoch_seconds"] for r in rows)[len(rows) // 2]
    summary[run] = {"top1_last": final["top1_last"], "epochs": final["epochs"], "train_images": final["train_images"],
                    "median_epoch_s": median, "per_50k_epoch_s": median * 50000 / final["train_images"],
                    "train_seconds": final["train_seconds"], "device": final["device"]}
if (out / "bench.json").exists():
    summary["bench_ratios"] = json.loads((out / "bench.json").read_text())["ratios"]
secs = {}
for h in ("packed", "one_at_a_time"):
    if (out / f"table_{h}.seconds").exists():
        t0, t1 = map(float, (out / f"table_{h}.seconds").read_text().split())
        secs[h] = t1 - t0
if len(secs) == 2:
    secs["packed_speedup"] = secs["one_at_a_time"] / secs["packed"]
summary["table_4_cells_seconds"] = secs
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
PY
summary_rc=$?
if grep -v ' rc=0 ' "$OUT_DIR/stages.txt" | grep -q . || [ $summary_rc != 0 ]; then
  echo "gpu.sh: a stage or the summary failed (see $OUT_DIR/stages.txt and the logs there)" >&2
  exit 1
fi
