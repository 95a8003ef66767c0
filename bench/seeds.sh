#!/usr/bin/env bash
# DeiT-LT's claim over several training seeds on CIFAR-10-LT IF100 (CPU): one shared teacher,
# then for each seed the DeiT-LT student and the no-teacher ViT with the same schedule, each
# evaluated by evaluate.py; bench/seeds_summary.py writes mean and standard deviation of every
# reported number to bench/results/<NAME>.json and .md.
#   bash bench/seeds.sh                        # seeds 0 1 2, the main job's schedule
#   SEEDS="0 1 2 3 4" bash bench/seeds.sh      # more seeds: finished runs are skipped
# Only train.seed changes between seeds (weights, augmentation, mixup, drop path); the
# long-tailed subset (data.subset_seed) and the teacher stay fixed. Every finished step is
# skipped on a rerun, so the script can be stopped and restarted at any time (a run that was
# killed mid-epoch resumes from its state). Schedule: the main job's (Makefile MAIN_*_ARGS);
# about 25 minutes for three seed pairs on 2 quiet cores. Arguments before `--` go to the
# teacher, after it to every student.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cifar10-jpeg}
OUT=${OUT:-output/bench_seeds}
NAME=${NAME:-cifar10_lt_cpu_seeds}
SEEDS=${SEEDS:-0 1 2}
PY=${PY:-.venv/bin/python}
TEACHER=(train.epochs=5 train.max_steps_per_epoch=50 sched.warmup_epochs=1 loss.drw_epoch=3 "sched.milestones=[4]")
STUDENT=(train.epochs=8 train.max_steps_per_epoch=40 sched.warmup_epochs=1 distill.drw_epoch=4)
teacher_args=() student_args=() seen_sep=0
for a in "$@"; do
    if [ "$a" = "--" ] && [ $seen_sep = 0 ]; then seen_sep=1; continue; fi
    if [ $seen_sep = 0 ]; then teacher_args+=("$a"); else student_args+=("$a"); fi
done
DATA_ARG=data.path="$(realpath "$DATA")"
COMMON=("$DATA_ARG" log.progress=false)
start=$(date +%s)
mkdir -p "$OUT"
evaluate() {  # run folder, extra evaluate.py arguments
    local run=$1; shift
    [ -f "$OUT/$run/eval.json" ] || $PY evaluate.py --ckpt "$OUT/$run/checkpoint.pth" "$DATA_ARG" "$@" \
        --json "$OUT/$run/eval.json" --out-dir "$OUT/$run/eval"
}
[ -f "$OUT/teacher/eval.json" ] || {  # a finished or interrupted run resumes where it stopped
    $PY train_teacher.py --config configs/teachers/cifar10_lt_cpu.yaml "${COMMON[@]}" \
        train.output_dir="$OUT/teacher" "${TEACHER[@]}" ${teacher_args[@]+"${teacher_args[@]}"}
    evaluate teacher
}
for seed in $SEEDS; do
    [ -f "$OUT/deitlt_s$seed/eval.json" ] || {
        $PY train_student.py --config configs/cifar10_lt_cpu.yaml "${COMMON[@]}" train.seed="$seed" \
            train.output_dir="$OUT/deitlt_s$seed" distill.teacher_ckpt="$OUT/teacher/checkpoint.pth" \
            "${STUDENT[@]}" ${student_args[@]+"${student_args[@]}"}
        evaluate "deitlt_s$seed"
    }
    [ -f "$OUT/baseline_s$seed/eval.json" ] || {
        $PY train_student.py --config configs/cifar10_lt_cpu.yaml "${COMMON[@]}" train.seed="$seed" \
            train.output_dir="$OUT/baseline_s$seed" distill.type=none distill.teacher_ckpt=null \
            "${STUDENT[@]}" ${student_args[@]+"${student_args[@]}"}
        evaluate "baseline_s$seed"
    }
done
$PY bench/seeds_summary.py --out "$OUT" --name "$NAME" --seeds $SEEDS \
    --seconds $(( $(date +%s) - start )) \
    --command "OUT=$OUT SEEDS=\"$SEEDS\" bash bench/seeds.sh $*" \
    --schedule "teacher: ${TEACHER[*]} ${teacher_args[*]+${teacher_args[*]}}; students: ${STUDENT[*]} ${student_args[*]+${student_args[*]}}"
