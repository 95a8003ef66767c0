#!/usr/bin/env bash
# The project's GPU code paths on one CUDA GPU, in one command of at most 8 minutes.
#
# On a GPU machine (one GPU lent once, no network; see README "Launch configurations"):
#   1. here, with PyPI:   bash bench/gpu_prepare.sh
#      downloads the wheels the GPU image lacks (datasets and its missing dependencies, Pillow
#      and timm at our pins) into the git-ignored .whl/, checks them, and prints the one-line
#      device command and the paths to carry (.whl).
#   2. there, in the repository root, run that command: it installs .whl/ with
#      `pip install --no-index --no-deps --target`, puts that folder first on PYTHONPATH, checks
#      versions and imports (one line and exit 4 on a mismatch), then runs
#      `bash bench/gpu_check.sh --out $OUT/gpu_check.json --logs-tar $OUT/gpu_check_logs.tgz`.
#   3. what comes back (under $OUT): preflight.json (versions, imports), gpu_check.json (every
#      step's status, figures and log tails), gpu_check_logs.tgz (logs, run folders without
#      weights); the summary is the command's last output lines.
# NCCL with several GPUs stays untested: one GPU at most is lent (the FSDP and DDP steps run
# one process; 2-process gloo runs on CPU are in the tests).
#
# Steps, in this order (`--plan` prints them with their time caps as JSON):
#   env                       torch / CUDA / nvidia-smi facts, achieved bf16 matmul TFLOP/s
#   data                      a generated CIFAR-style 32x32 long-tailed dataset (hub parquet layout)
#   train_step                bench/train_step.py, DeiT-B/16 at 224: img/s and peak memory,
#                             fp32 eager vs bf16 vs bf16 + torch.compile
#   teacher_bf16_ddp          train_teacher.py, ResNet-32 LDAM + SAM, bf16, accelerate DDP (1 process)
#   teacher_fp16_ddp          the same in fp16 (GradScaler)
#   student_bf16_ddp          train_student.py, DeiT-B/16 at 224 distilled from that teacher, bf16
#   student_fp16_ddp          the same in fp16
#   student_bf16_fsdp         the same in bf16 through accelerate FSDP2 (fp32 gradient reduction)
#   student_bf16_compile_ddp  the bf16 DDP student with model.compile=true
#   evaluate_compiled         evaluate.py --ckpt <the compiled run>/checkpoint.pth
#   host_syncs                host syncs per optimiser step (torch.cuda.set_sync_debug_mode),
#                             teacher and student, bf16 and fp16
# Each step runs under `timeout` (its cap, less when the budget's deadline is nearer) and is
# independent: a failed step records why (rc, error line, log tails) and the next one runs. One
# JSON, rewritten after every step; the exit code is 0 only if every step passed. nvidia-smi's
# memory.used is sampled every 250 ms during each step.
#
#   bash bench/gpu_check.sh [--out F] [--logs-tar F.tgz] [--work-dir D] [--data DIR] [--budget S]
#   bash bench/gpu_check.sh --plan [--dry-run] [--budget S]   # the steps and caps as JSON
#   bash bench/gpu_check.sh --device-command                  # the command to run on the GPU machine
#   bash bench/gpu_check.sh --dry-run      # the same steps on CPU, tiny sizes; JSON in
#                                          # output/gpu_check_dry/gpu_check.json
#   bash bench/gpu_check.sh --rehearse [--out F] [--budget S]   # on a CPU machine with PyPI: the device command
#        as closely as this machine allows, about 15 min on 2 cores; exit 0 only if all passed.
#        Python 3.11 and the local torch (a cp312 torch cannot run here); the image is imitated
#        by a Python that does not see datasets, dill, multiprocess, xxhash, Pillow or timm; the
#        cp311 wheels of exactly the versions in .whl/ are installed by the device command's own
#        pip line, then the dry run; and every wheel in .whl/ must resolve for the device's tags
#        (pip install --dry-run ... --python-version 3.12 --platform manylinux_2_28_x86_64).
#        Runs bench/gpu_prepare.sh first when .whl/ is missing. Report: output/gpu_rehearse/rehearse.json
#
# --out defaults to $OUT/gpu_check.json when $OUT is set, else bench/results/gpu_check.json.
# --budget S (default 480 on a GPU, 720 for --dry-run and --rehearse): the whole run's seconds;
# the caps scale with it (a loaded CPU machine rehearses with a larger one). --data PATH uses a local CIFAR-10 copy in the hub's layout (data.dataset=
# cifar10_lt) instead of the generated data. On CPU (--dry-run) accelerate cannot run FSDP and
# runs fp16 as fp32: those steps run through the DDP path / in fp32, each with a "note".
# PYTHON=... picks the interpreter (default .venv/bin/python if present, else python3).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

DRY=0
ACTION=run
JSON=""
WORK=""
DATA=""
BUDGET_ARG=""
LOGS_TAR=""
usage() { sed -n '2,57p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --plan) ACTION=plan ;;
        --rehearse) ACTION=rehearse ;;
        --device-command) ACTION=device-command ;;
        --out) JSON=${2:?--out needs a path}; shift ;;
        --out=*) JSON=${1#--out=} ;;
        --logs-tar) LOGS_TAR=${2:?--logs-tar needs a path}; shift ;;
        --logs-tar=*) LOGS_TAR=${1#--logs-tar=} ;;
        --work-dir) WORK=${2:?--work-dir needs a path}; shift ;;
        --work-dir=*) WORK=${1#--work-dir=} ;;
        --data) DATA=${2:?--data needs a path}; shift ;;
        --data=*) DATA=${1#--data=} ;;
        --budget) BUDGET_ARG=${2:?--budget needs seconds}; shift ;;
        --budget=*) BUDGET_ARG=${1#--budget=} ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ -n "$BUDGET_ARG" ] && ! [[ "$BUDGET_ARG" =~ ^[0-9]+$ ]]; then
    echo "gpu_check.sh: --budget needs whole seconds, got $BUDGET_ARG" >&2; exit 2
fi

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi

# ------------------------------------------------------------------------------ the device command
# device_command PYTHON WHEELS SITE [CHECK ARGS...]: the one line bench/gpu_prepare.sh prints
# (PYTHON=python3, WHEELS=.whl) and --rehearse runs (its own Python, cp311 wheels, --dry-run).
device_command() {
    local py=$1 whl=$2 site=$3
    shift 3
    echo "export PYTHONUNBUFFERED=1; $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir" \
         "--upgrade --target $site $whl/*.whl || { echo 'gpu_check: pip could not install $whl/'; exit 3; };" \
         "export PYTHONPATH=$site\${PYTHONPATH:+:\$PYTHONPATH};" \
         "$py bench/gpu_check.py preflight --wheels $whl --out \$OUT/preflight.json || exit 4;" \
         "PYTHON=$py bash bench/gpu_check.sh --out \$OUT/gpu_check.json --logs-tar \$OUT/gpu_check_logs.tgz${*:+ $*}"
}
if [ "$ACTION" = device-command ]; then
    device_command python3 .whl /tmp/deit_lt/site-packages
    exit 0
fi

# ------------------------------------------------------------------------------ the plan
STEPS=(env data train_step teacher_bf16_ddp teacher_fp16_ddp student_bf16_ddp student_fp16_ddp
       student_bf16_fsdp student_bf16_compile_ddp evaluate_compiled host_syncs)
if [ "$DRY" = 1 ]; then
    DEFAULT_BUDGET=720
    #     env data train_step t_bf16 t_fp16 s_bf16 s_fp16 s_fsdp s_compile eval syncs
    CAPS=(50  25   110        60     60     60     55     55     130       40   50)
else
    DEFAULT_BUDGET=480
    CAPS=(20  30   110        35     25     45     35     45     75        25   25)
fi
BUDGET=${BUDGET_ARG:-$DEFAULT_BUDGET}
if [ "$BUDGET" != "$DEFAULT_BUDGET" ]; then  # another budget scales every cap alike
    for i in "${!CAPS[@]}"; do CAPS[$i]=$(( CAPS[i] * BUDGET / DEFAULT_BUDGET )); done
fi
cap() {  # cap STEP: its seconds
    local i
    for i in "${!STEPS[@]}"; do [ "${STEPS[$i]}" = "$1" ] && { echo "${CAPS[$i]}"; return; }; done
    echo 0
}
if [ "$ACTION" = plan ]; then
    printf '{"mode": "%s", "budget_s": %s, "steps": [' "$([ $DRY = 1 ] && echo dry-run || echo gpu)" "$BUDGET"
    for i in "${!STEPS[@]}"; do
        [ "$i" -gt 0 ] && printf ', '
        printf '{"name": "%s", "cap_s": %s}' "${STEPS[$i]}" "${CAPS[$i]}"
    done
    printf ']}\n'
    exit 0
fi

# ------------------------------------------------------------------------------ the rehearsal
rehearse() {
    local reh=${WORK:-output/gpu_rehearse} t0 rc=0 names
    local report=${JSON:-$reh/rehearse.json}
    t0=$(date +%s)
    mkdir -p "$reh"
    reh=$(cd "$reh" && pwd)
    local log=$reh/rehearse.log
    : >"$log"
    say() { echo "[rehearse] $*" | tee -a "$log" >&2; }
    fail() { say "FAILED: $*"; rc=1; }
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        say ".whl/ is missing: bash bench/gpu_prepare.sh"
        PYTHON=$PY bash bench/gpu_prepare.sh >>"$log" 2>&1 || { fail "gpu_prepare.sh"; return 1; }
    fi
    # 1. every wheel resolves for the device's tags
    say "pip install --dry-run of .whl/ for CPython 3.12 manylinux_2_28_x86_64"
    "$PY" -m pip install --dry-run --no-index --no-deps --target "$reh/dry_target" --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --only-binary=:all: .whl/*.whl >>"$log" 2>&1 \
        || fail "a wheel in .whl/ does not resolve for cp312 manylinux_2_28_x86_64 (see $log)"
    # 2. the cp311 wheels of exactly those versions
    names=$(for f in .whl/*.whl; do b=$(basename "$f"); echo "${b%%-*}==$(echo "$b" | cut -d- -f2)"; done)
    mkdir -p "$reh/whl311"
    rm -f "$reh"/whl311/*.whl
    say "pip download (this machine's Python) of $(echo $names)"
    # shellcheck disable=SC2086
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$reh/whl311" $names >>"$log" 2>&1 \
        || fail "pip download of the cp311 wheels"
    [ "$(ls "$reh"/whl311/*.whl 2>/dev/null | wc -l)" = "$(ls .whl/*.whl | wc -l)" ] \
        || fail "not one cp311 wheel per wheel of .whl/"
    # 3. an interpreter that sees this Python's packages except those the image lacks or pins
    #    otherwise (a venv whose one .pth adds a folder of links to the packages kept). Both
    #    folders' paths contain "site-packages", as on the image: dill (datasets' hashing)
    #    pickles classes of modules elsewhere by value, and fails on pyarrow's.
    local farm=$reh/image/site-packages venv=$reh/image_python site_dir
    rm -rf "$reh/image" "$venv" "$reh/site" "$reh/out"
    mkdir -p "$farm" "$reh/out"
    site_dir=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    for entry in "$site_dir"/*; do
        case "$(basename "$entry" | tr 'A-Z' 'a-z')" in
            datasets|datasets-*|dill|dill-*|multiprocess|multiprocess-*|_multiprocess|xxhash|xxhash-*|\
            pil|pillow-*|pillow.libs|timm|timm-*) continue ;;
        esac
        ln -s "$entry" "$farm/"
    done
    "$PY" -m venv --without-pip "$venv" >>"$log" 2>&1 || fail "python -m venv"
    local venv_site
    venv_site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    echo "import site; site.addsitedir('$farm')" >"$venv_site/image_site.pth"
    if "$venv/bin/python" -c "import datasets" >/dev/null 2>&1; then
        fail "datasets is importable before the wheels are installed: the rehearsal proves nothing"
    else
        say "datasets is not importable before the install (as on the GPU image)"
    fi
    # 4. the device command, with this machine's Python, the cp311 wheels and --dry-run
    local cmd
    cmd=$(device_command "$venv/bin/python" "$reh/whl311" "$reh/site/site-packages" --dry-run \
          --work-dir "$reh/work" ${BUDGET_ARG:+--budget $BUDGET_ARG})
    say "device command: $cmd"
    OUT=$reh/out bash -c "$cmd" >>"$log" 2>&1
    local crc=$?
    [ "$crc" = 0 ] || fail "the device command exited $crc (see $log)"
    [ -f "$reh/out/preflight.json" ] || fail "no preflight.json"
    [ -f "$reh/out/gpu_check_logs.tgz" ] || fail "no gpu_check_logs.tgz"
    "$PY" - "$reh/out/gpu_check.json" <<'EOF' >>"$log" 2>&1 || fail "gpu_check.json: not every step passed"
import json, sys
s = json.load(open(sys.argv[1]))["summary"]
print(json.dumps(s))
sys.exit(0 if s["all_passed"] else 1)
EOF
    local wall=$(( $(date +%s) - t0 ))
    "$PY" - "$report" "$reh" "$wall" "$rc" <<'EOF'
import json, pathlib, sys
report, reh, wall, rc = sys.argv[1], pathlib.Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
out = reh / "out"
def load(p):
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None
check = load(out / "gpu_check.json") or {}
data = {"passed": rc == 0, "wall_s": wall, "log": str(reh / "rehearse.log"),
        "wheels_cp311": sorted(p.name for p in (reh / "whl311").glob("*.whl")),
        "preflight_problem": (load(out / "preflight.json") or {}).get("problem", "no preflight.json"),
        "summary": check.get("summary"),
        "steps": [{k: s.get(k) for k in ("name", "status", "wall_s", "timeout_s", "error")}
                  for s in check.get("steps", [])]}
pathlib.Path(report).parent.mkdir(parents=True, exist_ok=True)
pathlib.Path(report).write_text(json.dumps(data, indent=2) + "\n")
EOF
    tail -n 16 "$log" | grep -v '^\[rehearse\]' >&2
    say "$([ $rc = 0 ] && echo passed || echo FAILED) in ${wall} s; report $report, log $log"
    return $rc
}
if [ "$ACTION" = rehearse ]; then
    rehearse
    exit $?
fi

# ------------------------------------------------------------------------------ the check
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1

if [ -z "$JSON" ] && [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    JSON=$OUT/gpu_check.json  # only $OUT comes back from the GPU machine
fi
if [ "$DRY" = 1 ]; then
    MODE=dry-run
    WORK=${WORK:-output/gpu_check_dry}
    JSON=${JSON:-$WORK/gpu_check.json}
    export CUDA_VISIBLE_DEVICES=""           # a dry run is the CPU run, whatever the machine
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    FLOOR=20                                 # seconds kept back for each later step
    COUNTS_TRAIN=40,28,20,14,10,8,6,5,4,3    # 138 images (tests/test_train.py's profile)
    COUNTS_TEST=5,5,5,5,5,5,5,5,4,4          # 48: whole eval batches of 16 (no recompiles)
    WORKERS=0
    T_BATCH=16; T_STEPS=3
    S_BATCH=8; S_ACCUM=2; S_STEPS=3
    S_MODEL=(model.name=deit_tiny_distilled_patch4_32 model.depth=1 model.embed_dim=48 model.num_heads=3
             data.input_size=32 aug.train_crop=pad_crop train.eval_batch_size=16)
    BENCH=(--steps 2 --repeats 2 --warmup 1 --threads 1 train.batch_size=8)
    SYNC_PRECISIONS=bf16                     # fp16 runs as fp32 on a CPU
else
    MODE=gpu
    WORK=${WORK:-output/gpu_check}
    JSON=${JSON:-bench/results/gpu_check.json}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}   # main process only; loader workers use 1 each
    FLOOR=15
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
    SYNC_PRECISIONS=bf16,fp16
fi
KILL_AFTER=15      # SIGTERM first (the scripts save and exit), SIGKILL this much later
MIN_STEP=10        # a step with less time than this left is recorded as skipped

RUNS=$WORK/runs
LOGS=$WORK/logs
rm -rf "$RUNS" "$LOGS"      # fresh runs: the scripts would otherwise resume a finished run
mkdir -p "$RUNS" "$LOGS" "$(dirname "$JSON")"
export HF_DATASETS_CACHE=${HF_DATASETS_CACHE:-$WORK/hf_datasets_cache}

START=$(date +%s)
DEADLINE=$(( START + BUDGET ))
FINISHED=0
SKIP_ALL=""

pack_logs() {  # the logs and run folders without weights or resume state, under 16 MiB
    [ -z "$LOGS_TAR" ] && return 0
    mkdir -p "$(dirname "$LOGS_TAR")"
    tar czf "$LOGS_TAR" -C "$WORK" --exclude='*.pth' --exclude='*.safetensors' --exclude='*.bin' \
        --exclude='state' --exclude='state.*' logs runs 2>/dev/null
    if [ "$(stat -c %s "$LOGS_TAR" 2>/dev/null || echo 0)" -gt $(( 15 * 1024 * 1024 )) ]; then
        tar czf "$LOGS_TAR" -C "$WORK" logs  # the run folders made it too large
    fi
    echo "[gpu_check] logs packed into $LOGS_TAR ($(du -h "$LOGS_TAR" | cut -f1))" >&2
}

finish() {
    [ "$FINISHED" = 1 ] && return
    FINISHED=1
    local IFS=, status
    "$PY" bench/gpu_check.py finish --json "$JSON" --wall $(( $(date +%s) - START )) --expected "${STEPS[*]}"
    status=$?
    pack_logs
    return $status
}
trap 'finish; exit 130' INT TERM

"$PY" bench/gpu_check.py init --json "$JSON" --mode "$MODE" --meta \
    "command=bash bench/gpu_check.sh $([ $DRY = 1 ] && echo --dry-run) --out $JSON --work-dir $WORK --budget $BUDGET${DATA:+ --data $DATA}" \
    "work_dir=$WORK" "python=$PY" "budget_s=$BUDGET" "omp_num_threads=$OMP_NUM_THREADS" \
    "plan=$(IFS=,; echo "${STEPS[*]}")" "caps_s=$(IFS=,; echo "${CAPS[*]}")" \
    || { echo "gpu_check.sh: cannot write $JSON with $PY" >&2; exit 2; }

later_steps() {  # how many steps of STEPS come after $1
    local i
    for i in "${!STEPS[@]}"; do
        [ "${STEPS[$i]}" = "$1" ] && { echo $(( ${#STEPS[@]} - i - 1 )); return; }
    done
    echo 0
}

# step NAME KIND [--note S] [--out-dir D] [--embed KEY=FILE] [--compare-log D] [--skip WHY] -- COMMAND...
# Runs COMMAND under `timeout` (at most the step's cap, less when the global deadline, minus
# FLOOR seconds for every later step, is nearer) and records it in the JSON.
step() {
    local name=$1 kind=$2
    shift 2
    local rec=(--json "$JSON" --name "$name" --kind "$kind") skip="" cap
    cap=$(cap "$name")
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

step env setup --embed "device_info=$LOGS/env/env.json" -- \
    "$PY" bench/gpu_check.py env --out "$LOGS/env/env.json"
if [ "$MODE" = gpu ] && ! grep -q '"cuda_available": true' "$LOGS/env/env.json" 2>/dev/null; then
    SKIP_ALL="no CUDA device visible to torch (see the env step); on CPU use --dry-run"
    echo "[gpu_check] $SKIP_ALL: the other steps are recorded as skipped" >&2
fi

if [ -n "$DATA" ]; then
    DATA_ARGS=(data.dataset=cifar10_lt "data.path=$DATA")
    step data setup --note "local copy $DATA (data.dataset=cifar10_lt, IF100 subset)" -- test -d "$DATA"
else
    DATA_ROOT=$WORK/data
    DATA_ARGS=(data.dataset=generic "data.path=$DATA_ROOT" data.image_column=img data.imb_factor=1.0)
    step data setup --note "generated: train counts $COUNTS_TRAIN, test counts $COUNTS_TEST, 32x32" -- \
        "$PY" bench/gpu_check.py make-data --root "$DATA_ROOT" --counts-train "$COUNTS_TRAIN" --counts-test "$COUNTS_TEST"
fi
COMMON=("${DATA_ARGS[@]}" "data.num_workers=$WORKERS" log.progress=false train.epochs=1)

# First after the set-up: the only throughput and memory figures, so a later failure or the
# budget running out never costs them.
step train_step bench --embed "train_step=$WORK/train_step.json" -- \
    "$PY" bench/train_step.py --config configs/cifar10_lt.yaml "${S_MODEL[@]}" "${BENCH[@]}" \
    --modes fp32,fast --compile --json "$WORK/train_step.json"

CPU_FP16_NOTE="accelerate on CPU runs fp16 as fp32 (no autocast, no GradScaler): this step ran in fp32"
CPU_FSDP_NOTE="FSDP cannot run under accelerate on CPU (launched with $FSDP_CFG it stops with 'RuntimeError: There are currently no available devices found, must be one of XPU, CUDA, ...'): this step ran through the DDP path ($DDP_CFG), not FSDP"

teacher_run() {  # teacher_run NAME PRECISION
    local out=$RUNS/$1 note=()
    [ "$DRY" = 1 ] && [ "$2" = fp16 ] && note=(--note "$CPU_FP16_NOTE")
    PORT=$(( PORT + 1 ))  # a rendezvous port per run
    # shellcheck disable=SC2046
    step "$1" train --out-dir "$out" "${note[@]}" -- $(launch "$DDP_CFG" "$2") \
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
    local out=$RUNS/$1 cfg=$DDP_CFG notes=() extra=()
    [ -n "$TEACHER_NOTE" ] && notes+=("$TEACHER_NOTE")
    case $2 in
        fsdp) if [ "$DRY" = 1 ]; then notes+=("$CPU_FSDP_NOTE"); else cfg=$FSDP_CFG; fi ;;
        compile) extra=(model.compile=true) ;;
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
    step "$1" train --out-dir "$out" "${note[@]}" -- $(launch "$cfg" "$3") \
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
step evaluate_compiled eval "${skip[@]}" --embed "eval=$COMPILED/eval.json" \
    --compare-log "$COMPILED" -- \
    "$PY" evaluate.py --ckpt "$COMPILED/checkpoint.pth" --json "$COMPILED/eval.json" \
    "data.num_workers=$WORKERS"

step host_syncs bench --embed "host_syncs=$LOGS/host_syncs/syncs.json" -- \
    "$PY" bench/gpu_check.py syncs --out "$LOGS/host_syncs/syncs.json" --precisions "$SYNC_PRECISIONS"

finish
exit $?
