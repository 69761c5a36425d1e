"""nnU-Net v2 integration: the segframe trainer, the plans that carry a config, and `segframe train/predict`.

Everything in segframe that imports nnunetv2 lives in this package.
"""

from pathlib import Path

TRAINER_NAME = "nnUNetTrainerSegframe"
# Folder for nnU-Net's `nnUNet_extTrainer` variable: its one module re-exports the trainer, so stock
# `nnUNetv2_train -tr nnUNetTrainerSegframe` and `nnUNetv2_predict` find it.
EXT_TRAINER_DIR = Path(__file__).resolve().parent / "ext"
