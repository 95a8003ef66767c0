#!/usr/bin/env bash
# Prepares the one command that runs bench/gpu_check.sh on the GPU machine (run it here, on a
# CPU machine with PyPI; see bench/gpu_check.sh --help).
#
# The GPU machine's image has Python 3.12, torch 2.11 (+cu130), torchvision 0.26, accelerate
# 1.15, numpy, safetensors, pyarrow, pandas, fsspec and huggingface_hub, but no `datasets`
# (nor dill, multiprocess), and Pillow / timm at versions nobody listed (Pillow 13 breaks
# timm's RandAugment); it reaches no registry. So the wheels travel with the working tree:
#   1. downloads into the git-ignored .whl/ the wheels for CPython 3.12 manylinux x86-64:
#      datasets at our pin and its dependencies the image lacks (dill, multiprocess, xxhash),
#      fsspec at the highest version datasets accepts (the image's may be newer), and Pillow and
#      timm at our pins (requirements.txt); any other wheel there is removed;
#   2. checks them: one version per package, every requirement met by a carried wheel or by a
#      version the image is known to hold (the others, pyarrow >= 24 among them, are checked by
#      the device command before any step), their size and the working tree's (64 MiB in all);
#   3. prints the device command (bash bench/gpu_check.sh --device-command) and the paths to
#      carry with it.
# pyarrow is not carried (55 MiB for cp312): datasets 5.2.0 needs pyarrow >= 24, which the
# image's is expected to be (it was built in 2026-11); a lower one stops the command at once
# with one line (gpu_check.py preflight), before any device time is spent on steps.
#
#   bash bench/gpu_prepare.sh            # PYTHON=... picks the interpreter that runs pip
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
WHEELS=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 fsspec==2026.9.0
        pillow==12.3.0 timm==1.0.31)
MAX_WHEELS_MIB=24      # far under the 64 MiB the working tree and carried files may take
MAX_TOTAL_MIB=60

mkdir -p .whl
if ! git check-ignore -q .whl/x.whl; then
    echo "gpu_prepare.sh: .whl/ is not ignored by git (.gitignore should list .whl/)" >&2
    exit 2
fi
# Only the pinned versions stay: two versions of a package stop the whole install.
for f in .whl/*.whl; do
    [ -e "$f" ] || continue
    b=$(basename "$f")
    keep=0
    for w in "${WHEELS[@]}"; do
        [ "$(echo "${b%%-*}" | tr 'A-Z_' 'a-z-')==$(echo "$b" | cut -d- -f2)" = "$w" ] && keep=1
    done
    [ "$keep" = 1 ] || { echo "removing $f (not pinned here)"; rm -f "$f"; }
done

echo "downloading ${WHEELS[*]} for cp312 manylinux x86-64 into .whl/"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"

echo "checking .whl/ against the image:"
"$PY" bench/gpu_check.py wheels --wheels .whl --python-version 3.12

wheels_kib=$(du -sk .whl | cut -f1)
tree_kib=$(git ls-files -z --cached --others --exclude-standard | du -ck --files0-from=- 2>/dev/null | tail -1 | cut -f1)
total_mib=$(( (wheels_kib + tree_kib + 1023) / 1024 ))
echo "sizes: .whl/ $(( (wheels_kib + 1023) / 1024 )) MiB + working tree $(( (tree_kib + 1023) / 1024 )) MiB = ${total_mib} MiB (limit 64)"
if [ "$wheels_kib" -gt $(( MAX_WHEELS_MIB * 1024 )) ] || [ "$total_mib" -gt "$MAX_TOTAL_MIB" ]; then
    echo "gpu_prepare.sh: too large to travel (.whl/ at most $MAX_WHEELS_MIB MiB, all at most $MAX_TOTAL_MIB MiB)" >&2
    exit 1
fi

echo
echo "device command (run in the repository root on the GPU machine; \$OUT is the folder that comes back):"
bash bench/gpu_check.sh --device-command
echo
echo 'carry: [".whl"]'
echo "comes back under \$OUT: preflight.json, gpu_check.json, gpu_check_logs.tgz"
