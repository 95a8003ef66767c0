#!/usr/bin/env bash
# DeiT-LT's central claim measured on CPU (issue "End to end"): on CIFAR-10-LT IF100 from a
# local copy, train the CPU teacher (ResNet-32 LDAM-DRW + SAM), the DeiT-LT student distilled
# from it, and the same student without a teacher for the same epochs; evaluate all three and
# write bench/results/<NAME>.{json,md} plus the experts plot.
#   bash bench/cifar10_lt_cpu.sh                 # DATA=../shared/data/cifar10-jpeg by default
#   OUT=output/t25 NAME=cifar10_lt_cpu_teacher25 BASELINE=output/bench_cifar10_lt_cpu/baseline \
#       bash bench/cifar10_lt_cpu.sh train.epochs=25 loss.drw_epoch=18 "sched.milestones=[18,23]"
#       # extra arguments go to the teacher; BASELINE reuses a finished no-teacher run (it does
#       # not depend on the teacher)
# A run whose eval.json exists is skipped, so an interrupted benchmark continues where it
# stopped. About 60-75 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cifar10-jpeg}
OUT=${OUT:-output/bench_cifar10_lt_cpu}
NAME=${NAME:-cifar10_lt_cpu}
BASELINE=${BASELINE:-$OUT/baseline}
PY=${PY:-.venv/bin/python}
COMMON=(data.path="$DATA" log.progress=false)
start=$(date +%s)
mkdir -p "$OUT"
if [ "$BASELINE" != "$OUT/baseline" ]; then
    ln -sfn "$(realpath "$BASELINE")" "$OUT/baseline"
fi
[ -f "$OUT/teacher/eval.json" ] || $PY train_teacher.py --config configs/teachers/cifar10_lt_cpu.yaml \
    "${COMMON[@]}" train.output_dir="$OUT/teacher" "$@"
[ -f "$OUT/deitlt/eval.json" ] || $PY train_student.py --config configs/cifar10_lt_cpu.yaml "${COMMON[@]}" \
    train.output_dir="$OUT/deitlt" distill.teacher_ckpt="$OUT/teacher/checkpoint.pth"
[ -f "$OUT/baseline/eval.json" ] || $PY train_student.py --config configs/cifar10_lt_cpu.yaml "${COMMON[@]}" \
    train.output_dir="$OUT/baseline" distill.type=none distill.teacher_ckpt=null
for run in teacher deitlt baseline; do
    [ -f "$OUT/$run/eval.json" ] && continue
    extra=()
    [ "$run" = deitlt ] && extra=(--teacher "$OUT/teacher/checkpoint.pth")
    $PY evaluate.py --ckpt "$OUT/$run/checkpoint.pth" data.path="$DATA" "${extra[@]}" \
        --json "$OUT/$run/eval.json" --out-dir "$OUT/$run/eval"
done
$PY bench/summarize.py --out "$OUT" --seconds $(( $(date +%s) - start )) \
    --command "OUT=$OUT NAME=$NAME BASELINE=$BASELINE bash bench/cifar10_lt_cpu.sh $*" --name "$NAME"
