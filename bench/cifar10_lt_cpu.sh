#!/usr/bin/env bash
# DeiT-LT's central claim measured on CPU: on CIFAR-10-LT IF100 from a local copy, train the
# CPU teacher (ResNet-32 LDAM-DRW + SAM), the DeiT-LT student distilled from it, and the same
# student without a teacher for the same epochs and DRW schedule; evaluate all three and write
# bench/results/<NAME>.{json,md} plus the experts plot, and the student's post-hoc rows (logit
# adjustment, expert combinations, calibration, test priors) as <NAME>_posthoc.json with its
# reliability diagram.
#   bash bench/cifar10_lt_cpu.sh                 # the README's result; DATA=../shared/data/cifar10-jpeg
#   bash bench/cifar10_lt_cpu.sh train.epochs=10 -- distill.drw_epoch=9
#       # arguments before `--` go to the teacher, after it to both students; they are applied
#       # after the schedule below (TEACHER / STUDENT), so a later value wins
#   OUT=... BASELINE=<a finished no-teacher run with the same student schedule> bash ...
#       # reuses that baseline (it does not depend on the teacher)
# The schedule on top of configs/teachers/cifar10_lt_cpu.yaml and configs/cifar10_lt_cpu.yaml
# was found by measurement (bench/results/cifar10_lt_cpu_schedules.md). Evaluation during
# training is thinned out (it does not change what is trained); the final checkpoint is what
# evaluate.py scores. A run whose eval.json exists is skipped, so an interrupted benchmark
# continues where it stopped. About 80-90 minutes on 2 quiet CPU cores (134 min measured on a
# host half as fast: bench/results/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cifar10-jpeg}
OUT=${OUT:-output/bench_cifar10_lt_cpu}
NAME=${NAME:-cifar10_lt_cpu}
BASELINE=${BASELINE:-$OUT/baseline}
PY=${PY:-.venv/bin/python}
TEACHER=(train.epochs=25 loss.drw_epoch=18 "sched.milestones=[18,23]" train.eval_every=5)
STUDENT=(train.epochs=20 distill.drw_epoch=12 train.eval_every=4)
teacher_args=() student_args=() seen_sep=0
for a in "$@"; do
    if [ "$a" = "--" ] && [ $seen_sep = 0 ]; then seen_sep=1; continue; fi
    if [ $seen_sep = 0 ]; then teacher_args+=("$a"); else student_args+=("$a"); fi
done
COMMON=(data.path="$DATA" log.progress=false)
start=$(date +%s)
mkdir -p "$OUT"
if [ "$BASELINE" != "$OUT/baseline" ]; then
    ln -sfn "$(realpath "$BASELINE")" "$OUT/baseline"
fi
[ -f "$OUT/teacher/eval.json" ] || $PY train_teacher.py --config configs/teachers/cifar10_lt_cpu.yaml \
    "${COMMON[@]}" train.output_dir="$OUT/teacher" "${TEACHER[@]}" ${teacher_args[@]+"${teacher_args[@]}"}
[ -f "$OUT/deitlt/eval.json" ] || $PY train_student.py --config configs/cifar10_lt_cpu.yaml "${COMMON[@]}" \
    train.output_dir="$OUT/deitlt" distill.teacher_ckpt="$OUT/teacher/checkpoint.pth" \
    "${STUDENT[@]}" ${student_args[@]+"${student_args[@]}"}
[ -f "$OUT/baseline/eval.json" ] || $PY train_student.py --config configs/cifar10_lt_cpu.yaml "${COMMON[@]}" \
    train.output_dir="$OUT/baseline" distill.type=none distill.teacher_ckpt=null \
    "${STUDENT[@]}" ${student_args[@]+"${student_args[@]}"}
for run in teacher deitlt baseline; do
    [ -f "$OUT/$run/eval.json" ] && continue
    extra=()
    [ "$run" = deitlt ] && extra=(--teacher "$OUT/teacher/checkpoint.pth")
    $PY evaluate.py --ckpt "$OUT/$run/checkpoint.pth" data.path="$DATA" "${extra[@]}" \
        --json "$OUT/$run/eval.json" --out-dir "$OUT/$run/eval"
done
$PY bench/summarize.py --out "$OUT" --seconds $(( $(date +%s) - start )) --name "$NAME" \
    --command "OUT=$OUT NAME=$NAME BASELINE=$BASELINE bash bench/cifar10_lt_cpu.sh $*" \
    --schedule "teacher: ${TEACHER[*]} ${teacher_args[*]+${teacher_args[*]}}; students: ${STUDENT[*]} ${student_args[*]+${student_args[*]}}"
