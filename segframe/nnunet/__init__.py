"""nnU-Net v2 integration: the segframe trainer, the plans that carry a config, and `segframe train/predict`.

Everything in segframe that imports nnunetv2 lives in this package.
"""

import os
from pathlib import Path

TRAINER_NAME = "nnUNetTrainerSegframe"
# Folder for nnU-Net's `nnUNet_extTrainer` variable: its one module re-exports the trainer, so stock
# `nnUNetv2_train -tr nnUNetTrainerSegframe` and `nnUNetv2_predict` find it.
EXT_TRAINER_DIR = Path(__file__).resolve().parent / "ext"


def use_ext_trainer() -> None:
    """Put segframe's trainer folder on nnU-Net's `nnUNet_extTrainer` path (this process and children)."""
    paths = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if str(EXT_TRAINER_DIR) not in paths:
        os.environ["nnUNet_extTrainer"] = os.pathsep.join([*paths, str(EXT_TRAINER_DIR)])
