#!/usr/bin/env bash
# One prepared GPU check (meant to fit one 8-minute call on one H100/H200): the tests marked `cuda`
# (pytest -m cuda), `vaqkd bench --device cuda`, a short timed training on real CIFAR-100 -- an FP32 teacher,
# then QKD and VA-QKD logit students from it -- and a small table (QKD and VA-QKD logit, 2 seeds) packed onto
# the one GPU as Ray tasks against the same cells one at a time; every figure written under $OUT_DIR.
# Goals on an H100: FP32 epoch over 50k images <= 2 s, W2A2 VA-QKD epoch <= 4 s.
#
#   DATA=/path/holding/cifar-100-python DEVICE=cuda OUT_DIR=results/gpu bash benchmarks/gpu.sh
#   DATA=... DEVICE=cpu SMALL=1 bash benchmarks/gpu.sh      # the same path on a CPU, tiny (a correctness check)
set -euo pipefail
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-data}
OUT_DIR=${OUT_DIR:-results/gpu}
VAQKD=${VAQKD:-vaqkd}
mkdir -p "$OUT_DIR"
if [ "${SMALL:-0}" = 1 ]; then
  BENCH=(--quick); T_EPOCHS=1; S_EPOCHS=1; BATCH=64; WARMUP=0
  SUBSET=(--set data.subset_per_class=2 --set data.test_subset_per_class=2)
  PACK=(--launcher ray --cpus-per-run 1); TABLE_SUBSET=2
else
  BENCH=(--batch 256); T_EPOCHS=15; S_EPOCHS=5; BATCH=512; WARMUP=1; SUBSET=()
  PACK=(--launcher ray --cpus-per-run 2 --gpus-per-run 0.25); TABLE_SUBSET=100
fi
COMMON=(--data-root "$DATA" --no-progress --set train.device="$DEVICE" --set data.batch_size=$BATCH
        --set data.eval_batch_size=1000 --set train.channels_last=true "${SUBSET[@]}")

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true; } > "$OUT_DIR/device.txt"
git rev-parse HEAD > "$OUT_DIR/git_sha.txt" 2>/dev/null || true
echo "$0 DEVICE=$DEVICE SMALL=${SMALL:-0}" > "$OUT_DIR/command.txt"

if [ "$DEVICE" = cuda ]; then  # the GPU path's tests first: a failure here explains any later one
  ${PYTHON:-python} -m pytest -m cuda -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT_DIR/cuda_tests.txt" || true
fi

$VAQKD bench --device "$DEVICE" "${BENCH[@]}" --json --out "$OUT_DIR/bench.json" > /dev/null

RUNS="$OUT_DIR/runs"
rm -rf "$RUNS"
$VAQKD train configs/cifar100/teacher_resnet32.toml --out "$RUNS/teacher" "${COMMON[@]}" \
  --set optim.epochs=$T_EPOCHS --set optim.lr=0.2 --set optim.schedule=onecycle --set optim.warmup_epochs=$WARMUP \
  | tee "$OUT_DIR/teacher.log"
for row in qkd_logit vaqkd_logit; do
  $VAQKD train "configs/cifar100/$row.toml" --out "$RUNS/$row" "${COMMON[@]}" \
    --set distill.teacher="$RUNS/teacher" --set model.init="$RUNS/teacher" \
    --set optim.epochs=$S_EPOCHS --set optim.lr=0.04 --set optim.schedule=cosine --set optim.milestones=[] \
    | tee "$OUT_DIR/$row.log"
done

# a small table: packed onto the device as Ray tasks, then the same cells one at a time
TABLE=(--preset quick --rows qkd_logit vaqkd_logit --seeds 2 --data-root "$DATA" --teacher "$RUNS/teacher"
       --set train.device="$DEVICE" --set optim.epochs=2 --set data.subset_per_class=$TABLE_SUBSET)
for how in packed one_at_a_time; do
  LAUNCH=("${PACK[@]}"); [ "$how" = one_at_a_time ] && LAUNCH=()
  start=$(date +%s.%N)
  $VAQKD table "${TABLE[@]}" "${LAUNCH[@]}" --runs-dir "$OUT_DIR/table_$how/run_dirs" --out "$OUT_DIR/table_$how" \
    > "$OUT_DIR/table_$how.log" 2>&1
  echo "$start $(date +%s.%N)" > "$OUT_DIR/table_$how.seconds"
done

${PYTHON:-python} - "$OUT_DIR" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
summary = {}
for run in ("teacher", "qkd_logit", "vaqkd_logit"):
    rows = [json.loads(x) for x in (out / "runs" / run / "metrics.jsonl").read_text().splitlines()]
    final = json.loads((out / "runs" / run / "final.json").read_text())
    summary[run] = {"top1_last": final["top1_last"], "epochs": final["epochs"], "train_images": final["train_images"],
                    "median_epoch_s": sorted(r["epoch_seconds"] for r in rows)[len(rows) // 2],
                    "train_seconds": final["train_seconds"], "device": final["device"]}
summary["bench_ratios"] = json.loads((out / "bench.json").read_text())["ratios"]
secs = {}
for h in ("packed", "one_at_a_time"):
    t0, t1 = map(float, (out / f"table_{h}.seconds").read_text().split())
    secs[h] = t1 - t0
summary["table_4_cells_seconds"] = {**secs, "packed_speedup": secs["one_at_a_time"] / secs["packed"]}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
PY
