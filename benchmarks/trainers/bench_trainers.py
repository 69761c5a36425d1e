"""nnU-Net's default trainer with epochs and iterations from the environment (benchmarks/chase_dice.py).

Found by nnU-Net through `nnUNet_extTrainer` pointing at this folder.
"""

import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainerBench(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ.get("BENCH_EPOCHS", self.num_epochs))
        self.num_iterations_per_epoch = int(os.environ.get("BENCH_ITERATIONS", self.num_iterations_per_epoch))
        self.num_val_iterations_per_epoch = int(os.environ.get("BENCH_VAL_ITERATIONS",
                                                               self.num_val_iterations_per_epoch))
