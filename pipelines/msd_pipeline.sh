#!/usr/bin/env bash
# check -> train (one fold, or N-fold cross-validation) -> infer -> evaluate -> export, on an MSD
# (or nnU-Net v2) task folder, with the `unetpp3d` command only. See pipelines/README.md.
#
#   pipelines/msd_pipeline.sh TASK --data DATA_DIR --out OUT_DIR [--folds N] [--config YAML]
#       [--epochs N] [--device DEV] [--manifest JSON] [--cache-dir DIR] [-- TRAIN_OPTIONS...]
#
# TASK is liver or lung_nodule (pipelines/msd_liver.sh and msd_lung.sh pass it). Each option may
# also come from the environment: DATA_DIR, OUT_DIR, FOLDS, CONFIG, EPOCHS, DEVICE, MANIFEST,
# CACHE_DIR. Options after `--` go to every `unetpp3d train` (e.g. -- --set train.val_every=10).
# UNETPP3D names the command (default: unetpp3d on the PATH).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
usage() { sed -n '2,11s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2; exit 2; }

TASK="${1:-}"
[[ $TASK == liver || $TASK == lung_nodule ]] || usage
shift
DATA_DIR="${DATA_DIR:-}" OUT_DIR="${OUT_DIR:-}" FOLDS="${FOLDS:-1}" CONFIG="${CONFIG:-$here/../unetpp3d/resources/configs/$TASK.yaml}"
EPOCHS="${EPOCHS:-}" DEVICE="${DEVICE:-}" MANIFEST="${MANIFEST:-}" CACHE_DIR="${CACHE_DIR:-}"
train_extra=()
while (($#)); do
  case "$1" in
    --data) DATA_DIR="$2"; shift 2 ;;
    --out) OUT_DIR="$2"; shift 2 ;;
    --folds) FOLDS="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --epochs) EPOCHS="$2"; shift 2 ;;
    --device) DEVICE="$2"; shift 2 ;;
    --manifest) MANIFEST="$2"; shift 2 ;;
    --cache-dir) CACHE_DIR="$2"; shift 2 ;;
    --) shift; train_extra=("$@"); break ;;
    *) echo "error: unknown option $1" >&2; usage ;;
  esac
done
[[ -n $DATA_DIR && -n $OUT_DIR ]] || usage
if [[ ! $FOLDS =~ ^[1-9][0-9]*$ ]]; then
  echo "error: --folds $FOLDS: use 1 (fold 0 only) or the number of folds" >&2
  exit 2
fi
MANIFEST="${MANIFEST:-$DATA_DIR/dataset.json}"
CACHE_DIR="${CACHE_DIR:-$OUT_DIR/cache}"
read -r -a unetpp3d <<< "${UNETPP3D:-unetpp3d}"

step() { printf '\n=== %s\n' "$*"; }
device=()
[[ -n $DEVICE ]] && device=(--device "$DEVICE")

# The scans of a run's validation cases. `unetpp3d train` lists their names in split.json; the
# scan is imagesTr/<case>.<ending> (MSD) or imagesTr/<case>_0000.<ending> (nnU-Net v2).
validation_images() {
  local name scan
  python3 -c 'import json, sys; print("\n".join(json.load(open(sys.argv[1]))["validation"]))' "$1" |
    while read -r name; do
      [[ -n $name ]] || continue
      for scan in "$DATA_DIR/imagesTr/$name".* "$DATA_DIR/imagesTr/${name}_0000".*; do
        [[ -e $scan ]] && { echo "$scan"; continue 2; }
      done
      echo "error: no scan for validation case $name in $DATA_DIR/imagesTr" >&2
      return 1
    done
}

# nnU-Net v2 scans are <case>_0000.<ending>, so `infer` names their masks (and nodule reports)
# <case>_0000.*: rename them <case>.*, like the labels they are scored against.
name_by_case() {
  local file base
  for file in "$1"/*_0000.*; do
    base="${file##*/}"
    if [[ -e $file ]]; then mv "$file" "$1/${base/_0000./.}"; fi
  done
}

mkdir -p "$OUT_DIR"

step "1/6 check: every case of $MANIFEST, fingerprint to $OUT_DIR/fingerprint.json"
"${unetpp3d[@]}" check --manifest "$MANIFEST" --fingerprint "$OUT_DIR/fingerprint.json"

# FOLDS=1 trains fold 0 of the config's data.folds (5 by default: 80/20); FOLDS=N splits the
# training cases into N folds and trains them all. Every fold plans the same preprocessing
# (from all labelled cases), so their models can be ensembled, and they share one disk cache of
# preprocessed volumes (the MSD liver scans would need tens of GB of RAM in a memory cache;
# `-- --set data.cache=memory` brings it back).
train_options=(--set "task=$TASK" --set data.cache=disk --set "data.cache_dir=$CACHE_DIR" "${device[@]}")
((FOLDS > 1)) && train_options+=(--set "data.folds=$FOLDS")
[[ -n $EPOCHS ]] && train_options+=(--epochs "$EPOCHS")
runs=()
for ((fold = 0; fold < FOLDS; fold++)); do
  run="$OUT_DIR/runs/fold_$fold"
  runs+=("$run")
  step "2/6 train fold $fold -> $run"
  if [[ -f $run/last.pt ]]; then
    # A run that was stopped (or finished): continue it with its own config.
    "${unetpp3d[@]}" train --manifest "$MANIFEST" --out "$run" --resume --fold "$fold" \
      "${train_options[@]}" "${train_extra[@]}"
  else
    # --fingerprint: step 1's, so that training reads no case before its loaders do.
    "${unetpp3d[@]}" train --manifest "$MANIFEST" --config "$CONFIG" --out "$run" --fold "$fold" \
      --fingerprint "$OUT_DIR/fingerprint.json" "${train_options[@]}" "${train_extra[@]}"
  fi
done

# Cross-validation predictions: each case by the fold that did not train on it.
cv="$OUT_DIR/cv_predictions"
rm -rf "$cv"
for run in "${runs[@]}"; do
  step "3/6 infer: ${run##*/} on its validation cases -> $cv"
  listed="$(validation_images "$run/split.json")"  # an assignment, so that set -e sees a failure
  mapfile -t scans <<< "$listed"
  "${unetpp3d[@]}" infer "${scans[@]}" --model "$run" --out "$cv" "${device[@]}"
done
name_by_case "$cv"

step "4/6 evaluate: $cv against $DATA_DIR/labelsTr -> $OUT_DIR/cv_evaluation/"
"${unetpp3d[@]}" evaluate --pred "$cv" --ref "$DATA_DIR/labelsTr" --out "$OUT_DIR/cv_evaluation"

models=()
for run in "${runs[@]}"; do models+=(--model "$run"); done
with="fold 0"
((${#runs[@]} > 1)) && with="the ensemble of ${#runs[@]} folds (probabilities averaged)"
if compgen -G "$DATA_DIR/imagesTs/[!.]*" > /dev/null; then
  step "5/6 infer: imagesTs with $with -> $OUT_DIR/test_predictions"
  "${unetpp3d[@]}" infer "$DATA_DIR/imagesTs" "${models[@]}" --out "$OUT_DIR/test_predictions" "${device[@]}"
  name_by_case "$OUT_DIR/test_predictions"
else
  step "5/6 infer: no scans in $DATA_DIR/imagesTs, nothing to segment"
fi

for run in "${runs[@]}"; do
  step "6/6 export: ${run##*/} -> $OUT_DIR/bundles/${run##*/}"
  "${unetpp3d[@]}" export-bundle --model "$run" --out "$OUT_DIR/bundles/${run##*/}" --force
done

step "done: $OUT_DIR (cv_evaluation/, test_predictions/, bundles/, runs/)"
