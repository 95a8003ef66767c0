#!/usr/bin/env bash
# DeiT-LT's central claim measured on CPU (issue "End to end"): on CIFAR-10-LT IF100 from a
# local copy, train the CPU teacher (ResNet-32 LDAM-DRW + SAM), the DeiT-LT student distilled
# from it, and the same student without a teacher for the same epochs; evaluate all three and
# write bench/results/cifar10_lt_cpu.{json,md} plus the experts plot.
#   bash bench/cifar10_lt_cpu.sh                 # DATA=../shared/data/cifar10-jpeg by default
# About 60-75 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cifar10-jpeg}
OUT=${OUT:-output/bench_cifar10_lt_cpu}
PY=${PY:-.venv/bin/python}
COMMON=(data.path="$DATA" log.progress=false)
start=$(date +%s)
$PY train_teacher.py --config configs/teachers/cifar10_lt_cpu.yaml "${COMMON[@]}" \
    train.output_dir="$OUT/teacher" "$@"
$PY train_student.py --config configs/cifar10_lt_cpu.yaml "${COMMON[@]}" \
    train.output_dir="$OUT/deitlt" distill.teacher_ckpt="$OUT/teacher/checkpoint.pth"
$PY train_student.py --config configs/cifar10_lt_cpu.yaml "${COMMON[@]}" \
    train.output_dir="$OUT/baseline" distill.type=none distill.teacher_ckpt=null
for run in teacher deitlt baseline; do
    extra=()
    [ "$run" = deitlt ] && extra=(--teacher "$OUT/teacher/checkpoint.pth")
    $PY evaluate.py --ckpt "$OUT/$run/checkpoint.pth" data.path="$DATA" "${extra[@]}" \
        --json "$OUT/$run/eval.json" --out-dir "$OUT/$run/eval"
done
$PY bench/summarize.py --out "$OUT" --seconds $(( $(date +%s) - start )) \
    --command "bash bench/cifar10_lt_cpu.sh $*" --name cifar10_lt_cpu
