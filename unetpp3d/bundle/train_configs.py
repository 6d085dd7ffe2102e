"""Generate a bundle's ``configs/train.json``, ``multi_gpu_train.json`` and ``evaluate.json``.

They follow the model zoo's habits, so that MONAI's runner and MONAI Label train the bundle::

    python -m monai.bundle run --config_file BUNDLE/configs/train.json --bundle_root BUNDLE --dataset_dir DATA
    torchrun --nproc_per_node=2 -m monai.bundle run \\
        --config_file "['BUNDLE/configs/train.json','BUNDLE/configs/multi_gpu_train.json']" ...
    python -m monai.bundle run \\
        --config_file "['BUNDLE/configs/train.json','BUNDLE/configs/evaluate.json']" ...

The IDs MONAI's training properties name are present (``train#trainer``,
``train#trainer#max_epochs``, ``train#dataset``, ``train#inferer``, ``validate#dataset``, ...);
MONAI Label sets ``train#dataset#data``, ``validate#dataset#data``, ``train#trainer#max_epochs``
and ``device``, and the trainer reads exactly those. The components are plain unetpp3d classes
(:mod:`unetpp3d.bundle.training`) taking plain arguments; the network, preprocessing and config
are the bundle's own, so a bundle trained here still runs with ``inference.json`` and
``unetpp3d infer --model BUNDLE``.
"""

from __future__ import annotations

from typing import Any

from unetpp3d.bundle.configs import _target, initialize_steps
from unetpp3d.bundle.training import BundleTrainer, BundleValidator, labelled_datalist
from unetpp3d.config import TrainConfig
from unetpp3d.inference.model_loading import BUNDLE_METADATA_KEY
from unetpp3d.inference.predictor import Predictor
from unetpp3d.model.network import UNetPlusPlus3D

META = f"@_meta_#{BUNDLE_METADATA_KEY}"  # the bundle's own section of metadata.json


def train_config(payload: dict[str, Any], predictor: Predictor) -> dict[str, Any]:
    """``configs/train.json``: train the bundle's network on ``dataset_dir``, from and back to ``models/model.pt``.

    Args:
        payload: the exported checkpoint (its config gives the defaults: epochs, validation interval, seed).
        predictor: the model as ``unetpp3d infer`` loads it (its network's arguments).
    """
    train = (payload.get("config") or {}).get("train") or {}
    defaults = TrainConfig()
    return {
        "imports": ["$import runpy"],
        "bundle_root": ".",
        "ckpt_dir": "$@bundle_root + '/models'",
        "output_dir": "$@bundle_root + '/train'",
        "dataset_dir": "$@bundle_root + '/data'",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "epochs": int(train.get("epochs", defaults.epochs)),
        "val_interval": int(train.get("val_every", defaults.val_every)),
        "fold": None,
        "pretrained": True,
        "config_overrides": [],
        "network_def": {"_target_": _target(UNetPlusPlus3D), **predictor.network.model_args},
        "datalist": {"_target_": _target(labelled_datalist), "dataset_dir": "@dataset_dir"},
        "train": {
            "dataset": {"_target_": "Dataset", "data": "@datalist",
                        "_desc_": "the training cases; the trainer draws its patches from this data"},
            "inferer": {"_target_": "SimpleInferer",
                        "_desc_": "MONAI's train property: the trainer runs the network on whole patches"},
            "trainer": {
                "_target_": _target(BundleTrainer),
                "network": "@network_def",
                "preprocessing": f"{META}#preprocessing",
                "config": f"{META}#config",
                "train_data": "@train#dataset#data",
                "val_data": "@validate#dataset#data",
                "max_epochs": "@epochs",
                "val_interval": "@val_interval",
                "config_overrides": "@config_overrides",
                "fold": "@fold",
                "pretrained": "@pretrained",
                "model_file": "$@ckpt_dir + '/model.pt'",
                "run_dir": "@output_dir",
                "device": "@device",
            },
        },
        "validate": {
            "dataset": {"_target_": "Dataset", "data": None,
                        "_desc_": "the validation cases; null: a split of train#dataset#data, as `unetpp3d train` "
                                  "makes it"},
        },
        "initialize": initialize_steps(seed=int(train.get("seed", defaults.seed))),
        "run": ["$@train#trainer.run()"],
        "finalize": [],
    }


def multi_gpu_train_config() -> dict[str, Any]:
    """``configs/multi_gpu_train.json``, merged over ``train.json`` under ``torchrun``.

    The trainer joins torchrun's process group itself and trains one DistributedDataParallel
    replica per process on ``cuda:LOCAL_RANK``, as ``unetpp3d train`` does under torchrun; rank 0
    writes the files. This file only makes the run refuse to start outside torchrun.
    """
    return {"train#trainer#distributed": True}


def evaluate_config() -> dict[str, Any]:
    """``configs/evaluate.json``, merged over ``train.json``: segment and score labelled cases with ``models/model.pt``."""
    return {
        "output_dir": "$@bundle_root + '/eval'",
        "validate#evaluator": {"_target_": _target(BundleValidator), "bundle_root": "@bundle_root",
                               "data": "@datalist", "output_dir": "@output_dir", "device": "@device"},
        "run": ["$@validate#evaluator.run()"],
    }
