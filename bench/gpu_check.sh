#!/usr/bin/env bash
# The one command for a GPU machine (`make gpu-check`): every CUDA path tested, then issue 17's figures.
#
#   bench/gpu_check.sh [OUT_DIR]             on a GPU machine; the wheels in .whl/ (bench/fetch_gpu_wheels.sh)
#   bench/gpu_check.sh --dry-run [OUT_DIR]   on a CPU: the same steps at tiny sizes, measuring nothing
#
# OUT_DIR defaults to $OUT, else gpu_check_out. It ends up holding two files: targets.txt (the
# table) and gpu_check.tar.gz (every log, JSON and report below, in gpu_check/), since a device
# call brings back at most 8 files. Steps, each under its own time limit so that the
# whole run ends within about 9 minutes on one H100 or H200 (limits: 25+170+150+110+40+25 s; on an H200
# on 2026-11-27 the gpu tests took 141 s, a training-step row about 15 s, fitting 100 steps 33 s):
#   1. install the carried wheels (MONAI, nibabel, SimpleITK, fire, termcolor) into /tmp/site
#   2. pytest -m gpu                              -> pytest_gpu.log, pytest_gpu.xml
#   3. bench.py train  (bf16/fp16/fp32, layouts, compile of ours)   -> bench_train.{log,json}
#   4. bench.py infer  (256^3; ours fitted first, then agreement)   -> bench_infer.{log,json}
#   5. bench.py data   (real loader against compute only)           -> bench_data.{log,json}
#   6. bench.py forward on the machine's CPU, fp32                  -> bench_cpu.{log,json}
#   7. targets.py: one short table, target against measured, printed last (also targets.txt)
# A step that fails or runs out of time is recorded in steps.tsv and the next one runs; the
# bench rows written before a time limit are kept (bench.py rewrites its JSON after each row).
# Limits can be changed with GPU_CHECK_LIMITS="install pytest train infer data cpu" (seconds).
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
out=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
final=$out
out=$final/gpu_check  # packed into gpu_check.tar.gz at the end
rm -rf "$out" && mkdir -p "$out"
python=${PYTHON:-python3}
limits="25 170 150 110 40 25"
[ "$dry" = 1 ] && limits="25 300 400 400 200 200"  # a shared CPU is slow even at tiny sizes
read -r t_install t_pytest t_train t_infer t_data t_cpu <<< "${GPU_CHECK_LIMITS:-$limits}"
: > "$out/steps.tsv"

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to OUT/NAME.log, record the outcome
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit} s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >> "$out/steps.tsv"
    tail -n 3 "$out/$name.log"
    [ "$rc" = 124 ] && echo "   $name: stopped at its ${limit} s limit"
    return 0
}

export PYTHONUNBUFFERED=1
if [ "$dry" = 1 ]; then
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    # torch.compile with the eager backend on the CPU: the graph capture is checked, cheaply.
    device=(--device cpu --tiny --compile ours --threads "${DRY_RUN_THREADS:-2}")
    fit=3
else
    if ! ls .whl/*.whl > /dev/null 2>&1; then
        echo "error: no wheels in .whl/; run bench/fetch_gpu_wheels.sh on a machine with pip access first" >&2
        exit 2
    fi
    step install "$t_install" "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt" 2>&1
    device=(--device cuda --compile ours)
    fit=60  # steps that fit the phantom for the agreement check (100 took 33 s on an H200)
fi

gpu_tests=$(grep -l "mark.gpu" tests/test_*.py)
# shellcheck disable=SC2086
step pytest_gpu "$t_pytest" "$python" -m pytest -m gpu -p no:cacheprovider -q -rs \
    --basetemp=/tmp/gpu_check_pytest --junitxml="$out/pytest_gpu.xml" $gpu_tests
step bench_train "$t_train" "$python" bench/bench.py "${device[@]}" --quick --sections train --json "$out/bench_train.json"
# torch.compile of the 256^3 windows is left out here: the training step reports what it costs.
step bench_infer "$t_infer" "$python" bench/bench.py "${device[@]}" --quick --sections infer --compile none \
    --fit-steps "$fit" --json "$out/bench_infer.json"
step bench_data "$t_data" "$python" bench/bench.py "${device[@]}" --quick --sections data --json "$out/bench_data.json"
if [ "$dry" = 1 ]; then cpu=(--device cpu --tiny --threads "${DRY_RUN_THREADS:-2}"); else cpu=(--device cpu); fi
step bench_cpu "$t_cpu" "$python" bench/bench.py "${cpu[@]}" --quick --fp32-only --sections forward \
    --json "$out/bench_cpu.json"

"$python" bench/targets.py "$out"/bench_*.json --pytest "$out/pytest_gpu.xml" --steps "$out/steps.tsv" \
    > "$out/targets.txt"
cp "$out/targets.txt" "$final/targets.txt"
tar -czf "$final/gpu_check.tar.gz" -C "$final" gpu_check && rm -rf "$out"
echo
echo "files in $final: targets.txt, gpu_check.tar.gz (logs, JSON, pytest report)"
echo
cat "$final/targets.txt"
