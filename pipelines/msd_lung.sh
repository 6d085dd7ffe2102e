#!/usr/bin/env bash
# Medical Segmentation Decathlon Task06 Lung: non-small-cell lung cancer nodules in chest CT.
#
#   pipelines/msd_lung.sh --data /data/Task06_Lung --out /runs/lung            # fold 0 of 5
#   pipelines/msd_lung.sh --data /data/Task06_Lung --out /runs/lung --folds 5  # 5 folds + ensemble
#
# Labels 0 background, 1 nodule ("cancer" in the MSD's dataset.json), with unetpp3d/resources/configs/lung_nodule.yaml.
# Post-processing drops components under infer.min_component_ml and writes a nodule report
# (<case>.nodules.json and .csv: centre, volume, diameter) beside each mask.
# Options and outputs: pipelines/msd_pipeline.sh and pipelines/README.md.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/msd_pipeline.sh" lung_nodule "$@"
