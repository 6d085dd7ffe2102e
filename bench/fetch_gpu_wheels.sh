#!/usr/bin/env bash
# Fetch the wheels that the GPU machines lack into .whl/ (git-ignored), for `make gpu-check`.
#
# The GPU image has PyTorch, PyYAML, typer, tqdm, TensorBoard, SciPy, scikit-image, Matplotlib,
# Pillow, pytest, packaging and typing-extensions, but not MONAI, nibabel, SimpleITK or fire
# (which `python -m monai.bundle run` needs) and fire's termcolor. Its Python is 3.12 on
# x86-64 Linux, so the wheels are fetched for that platform whatever this machine is. Pinned to
# the versions the CPU suite runs with; one version of each, or the install there stops.
#
#   bench/fetch_gpu_wheels.sh            # into .whl/
#   bench/fetch_gpu_wheels.sh DIR        # elsewhere
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
python=${PYTHON:-python3}
wheels=(monai==1.6.1 nibabel==5.4.2 SimpleITK==2.5.7 fire==0.7.1 termcolor==3.3.0)

mkdir -p "$dest"
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "${wheels[@]}"

# What travels to the GPU machine (tracked and untracked-not-ignored files plus the wheels) must
# stay under 64 MiB.
wheel_bytes=$(du -cb "$dest"/*.whl | tail -1 | cut -f1)
repo_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null \
             | awk '$2 == "total" {s += $1} END {print s + 0}')
total=$((wheel_bytes + repo_bytes))
limit=$((64 * 1024 * 1024))
ls -l "$dest"/*.whl
printf 'wheels %.1f MiB + repository %.1f MiB = %.1f MiB of the 64 MiB that travel\n' \
    "$(echo "$wheel_bytes / 1048576" | bc -l)" "$(echo "$repo_bytes / 1048576" | bc -l)" \
    "$(echo "$total / 1048576" | bc -l)"
if [ "$total" -ge "$limit" ]; then
    echo "error: over 64 MiB; make the repository smaller or carry fewer wheels" >&2
    exit 1
fi
