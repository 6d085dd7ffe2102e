#!/usr/bin/env bash
# The LIDC full protocol on one GPU machine, with a time limit, keeping whatever finished.
#
#   pipelines/lidc_full_gpu.sh DATA OUT_DIR [LIMIT_S]
#
# DATA is the lidc_nodule_crops folder, OUT_DIR receives results.md, results.json, the log and
# lidc_runs.tar.gz (each training's train.log, metrics.csv and pruning table; no weights). The
# GPU image lacks MONAI, nibabel and SimpleITK: they are installed from .whl/ (bench/
# fetch_gpu_wheels.sh) into /tmp/site unless an earlier command on the same machine already did
# (bench/gpu_check.sh installs them there too). The experiment rewrites its tables after every
# training, so a run stopped at LIMIT_S (default 480 s) still reports the folds it finished.
set -uo pipefail
cd "$(dirname "$0")/.."
data=${1:?usage: pipelines/lidc_full_gpu.sh DATA OUT_DIR [LIMIT_S]}
out=${2:?usage: pipelines/lidc_full_gpu.sh DATA OUT_DIR [LIMIT_S]}
limit=${3:-480}
python=${PYTHON:-python3}
mkdir -p "$out"
if ! PYTHONPATH=/tmp/site "$python" -c "import monai, nibabel, SimpleITK" 2> /dev/null; then
    if ! ls .whl/*.whl > /dev/null 2>&1; then
        echo "error: MONAI, nibabel or SimpleITK missing and no wheels in .whl/" >&2
        exit 2
    fi
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 2
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt" 2>&1
work=/tmp/lidc_full
rm -rf "$work"
start=$SECONDS
timeout --kill-after=15 "$limit" "$python" pipelines/lidc_experiment.py --protocol full --device cuda \
    --data "$data" --out "$work" > "$out/lidc_full.log" 2>&1
rc=$?
echo "lidc_experiment exit $rc after $((SECONDS - start)) s (limit $limit s)" | tee -a "$out/lidc_full.log"
for f in results.md results.json folds.json; do
    [ -f "$work/$f" ] && cp "$work/$f" "$out/"
done
if [ -d "$work/runs" ]; then
    tar -czf "$out/lidc_runs.tar.gz" -C "$work" --exclude='*.pt' runs
fi
tail -n 40 "$out/lidc_full.log"
[ -f "$out/results.md" ] && cat "$out/results.md"
exit "$rc"
