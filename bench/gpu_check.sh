#!/usr/bin/env bash
# Full-scale code paths on one CUDA GPU in at most 8 minutes (issue "Full-scale paths"):
#   1. env                      torch / CUDA / nvidia-smi facts
#   2. data                     a generated CIFAR-style 32x32 long-tailed dataset (hub parquet layout)
#   3. teacher_bf16_ddp         train_teacher.py, ResNet-32 LDAM + SAM, bf16, accelerate DDP (1 process)
#   4. teacher_fp16_ddp         the same in fp16
#   5. student_bf16_ddp         train_student.py, DeiT-B/16 at 224 distilled from the teacher of 3, bf16, DDP
#   6. student_fp16_ddp         the same in fp16
#   7. student_bf16_fsdp        the same in bf16 through accelerate FSDP (the student only)
#   8. student_bf16_compile_ddp the bf16 DDP student with model.compile=true
#   9. evaluate_compiled        evaluate.py --ckpt <8>/checkpoint.pth
#  10. train_step               bench/train_step.py: img/s and peak memory, fp32 eager vs bf16 vs bf16 + compile
# Every step runs under `timeout` (a global deadline keeps the whole run under 8 minutes) and
# is independent: a failing step is recorded (rc, tail of stderr) and the next one runs.
# Everything goes into one JSON, rewritten after every step; the exit code is 0 only if every
# step passed.
#
#   bash bench/gpu_check.sh [--out bench/results/gpu_check.json] [--work-dir output/gpu_check]
#                           [--data ../shared/data/cifar10-jpeg]
#   bash bench/gpu_check.sh --dry-run      # the same steps on CPU, tiny sizes (~10 min on 2 cores);
#                                          # JSON in output/gpu_check_dry/gpu_check.json
#
# --data PATH uses a local CIFAR-10 copy in the hub's layout (data.dataset=cifar10_lt) instead
# of the generated data; the generated data (no network, no hub) are the default.
# On CPU (--dry-run) accelerate cannot run FSDP and runs fp16 as fp32: the FSDP step then runs
# through the DDP path and the fp16 steps run in fp32, each with a "note" saying so.
# PYTHON=... picks the interpreter (default .venv/bin/python if present, else python3).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

DRY=0
JSON=""
WORK=""
DATA=""
usage() { sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) JSON=${2:?--out needs a path}; shift ;;
        --out=*) JSON=${1#--out=} ;;
        --work-dir) WORK=${2:?--work-dir needs a path}; shift ;;
        --work-dir=*) WORK=${1#--work-dir=} ;;
        --data) DATA=${2:?--data needs a path}; shift ;;
        --data=*) DATA=${1#--data=} ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1

if [ "$DRY" = 1 ]; then
    MODE=dry-run
    WORK=${WORK:-output/gpu_check_dry}
    JSON=${JSON:-$WORK/gpu_check.json}
    export CUDA_VISIBLE_DEVICES=""           # a dry run is the CPU run, whatever the machine
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    BUDGET=840                               # whole run (s); caps below are per step
    FLOOR=20                                 # seconds kept back for each later step
    COUNTS_TRAIN=40,28,20,14,10,8,6,5,4,3    # 138 images (tests/test_train.py's profile)
    COUNTS_TEST=5,5,5,5,5,5,5,5,4,4          # 48: whole eval batches of 16 (no recompiles)
    WORKERS=0
    T_BATCH=16; T_STEPS=3
    S_BATCH=8; S_ACCUM=2; S_STEPS=3
    S_MODEL=(model.name=deit_tiny_distilled_patch4_32 model.depth=1 model.embed_dim=48 model.num_heads=3
             data.input_size=32 aug.train_crop=pad_crop train.eval_batch_size=16)
    BENCH=(--steps 2 --repeats 2 --warmup 1 --threads 1 train.batch_size=8)
    CAP_ENV=60; CAP_DATA=60; CAP_TEACHER=90; CAP_STUDENT=90; CAP_COMPILE=240; CAP_EVAL=60; CAP_BENCH=240
else
    MODE=gpu
    WORK=${WORK:-output/gpu_check}
    JSON=${JSON:-bench/results/gpu_check.json}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}   # main process only; loader workers use 1 each
    BUDGET=470                               # 8 minutes less the summary
    FLOOR=20
    # 4062 train images, 1000 down to 100 per class (IF 0.1); 1024 test images: whole eval
    # batches of 128 (a compiled model then never sees a ragged batch).
    COUNTS_TRAIN=1000,774,599,464,359,278,215,167,129,100
    COUNTS_TEST=103,103,103,103,102,102,102,102,102,102
    WORKERS=$(( $(nproc) > 12 ? 10 : $(nproc) - 2 ))
    [ "$WORKERS" -lt 1 ] && WORKERS=1
    T_BATCH=128; T_STEPS=30
    S_BATCH=64; S_ACCUM=2; S_STEPS=20                 # 20 optimiser steps x 2 micro-batches of 64
    S_MODEL=(model.name=deit_base_distilled_patch16_224 data.input_size=224)
    BENCH=(--steps 10 --repeats 3 --warmup 2 train.batch_size=64)
    CAP_ENV=30; CAP_DATA=40; CAP_TEACHER=50; CAP_STUDENT=75; CAP_COMPILE=150; CAP_EVAL=50; CAP_BENCH=130
fi
KILL_AFTER=15      # SIGTERM first (the scripts save and exit), SIGKILL this much later
MIN_STEP=10        # a step with less time than this left is recorded as skipped

RUNS=$WORK/runs
LOGS=$WORK/logs
rm -rf "$RUNS" "$LOGS"      # fresh runs: the scripts would otherwise resume a finished run
mkdir -p "$RUNS" "$LOGS" "$(dirname "$JSON")"
export HF_DATASETS_CACHE=${HF_DATASETS_CACHE:-$WORK/hf_datasets_cache}

STEPS=(env data teacher_bf16_ddp teacher_fp16_ddp student_bf16_ddp student_fp16_ddp student_bf16_fsdp
       student_bf16_compile_ddp evaluate_compiled train_step)
START=$(date +%s)
DEADLINE=$(( START + BUDGET ))
FINISHED=0
SKIP_ALL=""

finish() {
    [ "$FINISHED" = 1 ] && return
    FINISHED=1
    local IFS=,
    "$PY" bench/gpu_check.py finish --json "$JSON" --wall $(( $(date +%s) - START )) --expected "${STEPS[*]}"
}
trap 'finish; exit 130' INT TERM

"$PY" bench/gpu_check.py init --json "$JSON" --mode "$MODE" --meta \
    "command=bash bench/gpu_check.sh $([ $DRY = 1 ] && echo --dry-run) --out $JSON --work-dir $WORK${DATA:+ --data $DATA}" \
    "work_dir=$WORK" "python=$PY" "budget_s=$BUDGET" "omp_num_threads=$OMP_NUM_THREADS" \
    || { echo "gpu_check.sh: cannot write $JSON with $PY" >&2; exit 2; }

later_steps() {  # how many steps of STEPS come after $1
    local i
    for i in "${!STEPS[@]}"; do
        [ "${STEPS[$i]}" = "$1" ] && { echo $(( ${#STEPS[@]} - i - 1 )); return; }
    done
    echo 0
}

# step NAME KIND CAP [--note S] [--out-dir D] [--embed KEY=FILE] [--compare-log D] [--skip WHY] -- COMMAND...
# Runs COMMAND under `timeout` (at most CAP seconds, less when the global deadline, minus
# FLOOR seconds for every later step, is nearer) and records it in the JSON.
step() {
    local name=$1 kind=$2 cap=$3
    shift 3
    local rec=(--json "$JSON" --name "$name" --kind "$kind") skip=""
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do
        case "$1" in
            --note) rec+=(--note "$2") ;;
            --out-dir) rec+=(--output-dir "$2") ;;
            --embed) rec+=(--embed "$2") ;;
            --compare-log) rec+=(--compare-log "$2") ;;
            --skip) skip=$2 ;;
        esac
        shift 2
    done
    shift  # --
    [ -z "$skip" ] && [ -n "$SKIP_ALL" ] && skip=$SKIP_ALL
    local dir=$LOGS/$name
    mkdir -p "$dir"
    local cmd
    cmd=$(printf '%q ' "$@")
    rec+=(--cmd "${cmd% }" --stdout "$dir/stdout.txt" --stderr "$dir/stderr.txt")
    local left=$(( DEADLINE - $(date +%s) - $(later_steps "$name") * FLOOR - KILL_AFTER ))
    local t=$cap
    [ "$left" -lt "$t" ] && t=$left
    if [ -z "$skip" ] && [ "$t" -lt "$MIN_STEP" ]; then
        skip="global time budget exhausted (${left} s left for this step, ${MIN_STEP} s needed)"
    fi
    if [ -n "$skip" ]; then
        "$PY" bench/gpu_check.py record "${rec[@]}" --skipped "$skip"
        return
    fi
    echo "[gpu_check] $name (timeout ${t} s): $cmd" >&2
    local sampler=""
    if [ "$MODE" = gpu ] && command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 >"$dir/gpu_mem.txt" 2>/dev/null &
        sampler=$!
        rec+=(--gpu-mem-file "$dir/gpu_mem.txt")
    fi
    local t0 t1 rc
    t0=$(date +%s.%N)
    timeout --kill-after="$KILL_AFTER" "$t" "$@" >"$dir/stdout.txt" 2>"$dir/stderr.txt" </dev/null
    rc=$?
    t1=$(date +%s.%N)
    if [ -n "$sampler" ]; then kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null; fi
    "$PY" bench/gpu_check.py record "${rec[@]}" --rc "$rc" --timeout "$t" \
        --wall "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')"
}

# ------------------------------------------------------------------------------ the runs
PORT=$(( 29400 + RANDOM % 500 ))
launch() {  # accelerate launch on port PORT (callers bump it): launch CONFIG PRECISION
    echo "$PY -m accelerate.commands.launch --config_file $1 --num_processes 1 --num_machines 1 --mixed_precision $2 --main_process_port $PORT"
}
DDP_CFG=configs/accelerate/ddp_1gpu.yaml
FSDP_CFG=configs/accelerate/fsdp_1gpu_bf16.yaml

step env setup "$CAP_ENV" --embed "device_info=$LOGS/env/env.json" -- \
    "$PY" bench/gpu_check.py env --out "$LOGS/env/env.json"
if [ "$MODE" = gpu ] && ! grep -q '"cuda_available": true' "$LOGS/env/env.json" 2>/dev/null; then
    SKIP_ALL="no CUDA device visible to torch (see the env step); on CPU use --dry-run"
    echo "[gpu_check] $SKIP_ALL: the other steps are recorded as skipped" >&2
fi

if [ -n "$DATA" ]; then
    DATA_ARGS=(data.dataset=cifar10_lt "data.path=$DATA")
    step data setup "$CAP_DATA" --note "local copy $DATA (data.dataset=cifar10_lt, IF100 subset)" -- test -d "$DATA"
else
    DATA_ROOT=$WORK/data
    DATA_ARGS=(data.dataset=generic "data.path=$DATA_ROOT" data.image_column=img data.imb_factor=1.0)
    step data setup "$CAP_DATA" --note "generated: train counts $COUNTS_TRAIN, test counts $COUNTS_TEST, 32x32" -- \
        "$PY" bench/gpu_check.py make-data --root "$DATA_ROOT" --counts-train "$COUNTS_TRAIN" --counts-test "$COUNTS_TEST"
fi
COMMON=("${DATA_ARGS[@]}" "data.num_workers=$WORKERS" log.progress=false train.epochs=1)

CPU_FP16_NOTE="accelerate on CPU runs fp16 as fp32 (no autocast, no GradScaler): this step ran in fp32"
CPU_FSDP_NOTE="FSDP cannot run under accelerate on CPU (launched with $FSDP_CFG it stops with 'RuntimeError: There are currently no available devices found, must be one of XPU, CUDA, ...'): this step ran through the DDP path ($DDP_CFG), not FSDP"

teacher_run() {  # teacher_run NAME PRECISION
    local out=$RUNS/$1 note=()
    [ "$DRY" = 1 ] && [ "$2" = fp16 ] && note=(--note "$CPU_FP16_NOTE")
    PORT=$(( PORT + 1 ))  # a rendezvous port per run
    # shellcheck disable=SC2046
    step "$1" train "$CAP_TEACHER" --out-dir "$out" "${note[@]}" -- $(launch "$DDP_CFG" "$2") \
        train_teacher.py --config configs/teachers/cifar10_lt_ldam_drw_sam.yaml "${COMMON[@]}" \
        optim.sam=true loss.drw_epoch=0 "sched.milestones=[]" \
        "train.batch_size=$T_BATCH" "train.max_steps_per_epoch=$T_STEPS" \
        "train.mixed_precision=$2" "train.output_dir=$out"
}
teacher_run teacher_bf16_ddp bf16
teacher_run teacher_fp16_ddp fp16

TEACHER_CKPT=""
for t in teacher_bf16_ddp teacher_fp16_ddp; do
    [ -f "$RUNS/$t/checkpoint.pth" ] && { TEACHER_CKPT=$RUNS/$t/checkpoint.pth; break; }
done
if [ -n "$TEACHER_CKPT" ]; then
    DISTILL=("distill.teacher_ckpt=$TEACHER_CKPT")
    TEACHER_NOTE=""
else
    DISTILL=(distill.type=none distill.teacher_ckpt=null)
    TEACHER_NOTE="no teacher checkpoint was written: distill.type=none (no distillation)"
fi

student_run() {  # student_run NAME KIND(ddp|fsdp|compile) PRECISION
    local out=$RUNS/$1 cfg=$DDP_CFG cap=$CAP_STUDENT notes=() extra=()
    [ -n "$TEACHER_NOTE" ] && notes+=("$TEACHER_NOTE")
    case $2 in
        fsdp) if [ "$DRY" = 1 ]; then notes+=("$CPU_FSDP_NOTE"); else cfg=$FSDP_CFG; fi ;;
        compile) extra=(model.compile=true); cap=$CAP_COMPILE ;;
    esac
    [ "$DRY" = 1 ] && [ "$3" = fp16 ] && notes+=("$CPU_FP16_NOTE")
    local note=() joined n
    PORT=$(( PORT + 1 ))
    if [ ${#notes[@]} -gt 0 ]; then
        joined=${notes[0]}
        for n in "${notes[@]:1}"; do joined="$joined; $n"; done
        note=(--note "$joined")
    fi
    # shellcheck disable=SC2046
    step "$1" train "$cap" --out-dir "$out" "${note[@]}" -- $(launch "$cfg" "$3") \
        train_student.py --config configs/cifar10_lt.yaml "${COMMON[@]}" "${S_MODEL[@]}" \
        "train.batch_size=$S_BATCH" "train.accum_steps=$S_ACCUM" train.recipe_processes=null "train.max_steps_per_epoch=$S_STEPS" \
        distill.drw_epoch=null "${DISTILL[@]}" "train.mixed_precision=$3" "${extra[@]}" \
        "train.output_dir=$out"
}
student_run student_bf16_ddp ddp bf16
student_run student_fp16_ddp ddp fp16
student_run student_bf16_fsdp fsdp bf16
student_run student_bf16_compile_ddp compile bf16

COMPILED=$RUNS/student_bf16_compile_ddp
skip=()
[ -f "$COMPILED/checkpoint.pth" ] || skip=(--skip "student_bf16_compile_ddp wrote no checkpoint.pth")
step evaluate_compiled eval "$CAP_EVAL" "${skip[@]}" --embed "eval=$COMPILED/eval.json" \
    --compare-log "$COMPILED" -- \
    "$PY" evaluate.py --ckpt "$COMPILED/checkpoint.pth" --json "$COMPILED/eval.json" \
    "data.num_workers=$WORKERS"

step train_step bench "$CAP_BENCH" --embed "train_step=$WORK/train_step.json" -- \
    "$PY" bench/train_step.py --config configs/cifar10_lt.yaml "${S_MODEL[@]}" "${BENCH[@]}" \
    --modes fp32,fast --compile --json "$WORK/train_step.json"

finish
status=$?
exit $status
