"""Shim for nnU-Net's `nnUNet_extTrainer` search: re-exports segframe's trainer (see segframe.nnunet)."""

from segframe.nnunet.trainer import nnUNetTrainerSegframe

__all__ = ["nnUNetTrainerSegframe"]
