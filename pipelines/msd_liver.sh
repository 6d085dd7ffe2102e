#!/usr/bin/env bash
# Medical Segmentation Decathlon Task03 Liver (LiTS): liver and liver tumour in portal-venous CT.
#
#   pipelines/msd_liver.sh --data /data/Task03_Liver --out /runs/liver            # fold 0 of 5
#   pipelines/msd_liver.sh --data /data/Task03_Liver --out /runs/liver --folds 5  # 5 folds + ensemble
#
# Trains on the labels as given: 0 background, 1 liver, 2 tumour ("cancer" in the MSD's
# dataset.json), with unetpp3d/resources/configs/liver.yaml. Post-processing keeps the largest connected component of
# liver and tumour together (a patient may have many tumours) and every tumour voxel inside it.
# Options and outputs: pipelines/msd_pipeline.sh and pipelines/README.md.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/msd_pipeline.sh" liver "$@"
