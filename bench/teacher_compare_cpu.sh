#!/usr/bin/env bash
# PaCo + SAM against LDAM-DRW + SAM as DeiT-LT teachers at an equal short CPU budget (issue
# "PaCo + SAM"): on CIFAR-10-LT IF100 from a local copy, train each CPU teacher for the same
# 10 epochs (configs/teachers/cifar10_lt_cpu.yaml, configs/teachers/cifar10_lt_paco_sam_cpu.yaml),
# distil the same DeiT-LT student from each (configs/cifar10_lt_cpu.yaml), evaluate all four
# and write bench/results/teacher_compare_cpu.{json,md}.
#   bash bench/teacher_compare_cpu.sh                  # DATA=../shared/data/cifar10-jpeg
#   LDAM_DIR=output/bench_t10 bash bench/teacher_compare_cpu.sh
#       # reuse an LDAM teacher and student trained with these configs as they are, e.g. by
#       # OUT=output/bench_t10 bash bench/cifar10_lt_cpu.sh train.epochs=10 loss.drw_epoch=7 \
#       #     "sched.milestones=[7,9]" -- train.epochs=12 distill.drw_epoch=9
# A step whose eval.json exists is skipped, so an interrupted run continues where it stopped.
# About 100 minutes on 2 CPU cores from scratch (about 50 reusing the LDAM runs).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cifar10-jpeg}
OUT=${OUT:-output/bench_teacher_compare_cpu}
LDAM_DIR=${LDAM_DIR:-$OUT/ldam}
PACO_DIR=${PACO_DIR:-$OUT/paco}
PY=${PY:-.venv/bin/python}
COMMON=(data.path="$DATA" log.progress=false)
start=$(date +%s)
for pair in "$LDAM_DIR configs/teachers/cifar10_lt_cpu.yaml" "$PACO_DIR configs/teachers/cifar10_lt_paco_sam_cpu.yaml"; do
    read -r dir teacher_cfg <<<"$pair"
    if [ ! -f "$dir/teacher/eval.json" ]; then
        $PY train_teacher.py --config "$teacher_cfg" "${COMMON[@]}" train.output_dir="$dir/teacher"
        $PY evaluate.py --ckpt "$dir/teacher/checkpoint.pth" data.path="$DATA" \
            --json "$dir/teacher/eval.json" --out-dir "$dir/teacher/eval"
    fi
    if [ ! -f "$dir/deitlt/eval.json" ]; then
        $PY train_student.py --config configs/cifar10_lt_cpu.yaml "${COMMON[@]}" \
            train.output_dir="$dir/deitlt" distill.teacher_ckpt="$dir/teacher/checkpoint.pth"
        $PY evaluate.py --ckpt "$dir/deitlt/checkpoint.pth" data.path="$DATA" \
            --teacher "$dir/teacher/checkpoint.pth" --json "$dir/deitlt/eval.json" --out-dir "$dir/deitlt/eval"
    fi
done
$PY bench/compare_teachers.py --run "LDAM-DRW + SAM=$LDAM_DIR" --run "PaCo + SAM=$PACO_DIR" \
    --name teacher_compare_cpu --seconds $(( $(date +%s) - start )) \
    --command "LDAM_DIR=$LDAM_DIR bash bench/teacher_compare_cpu.sh"
