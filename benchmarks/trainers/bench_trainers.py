"""nnU-Net's default trainer with epochs, iterations and seed from the environment (benchmarks/vessels.py).

Found by nnU-Net through `nnUNet_extTrainer` pointing at this folder. `BENCH_SEED` seeds it as
`train.seed` seeds segframe's trainer (docs/data.md).
"""

import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from segframe.nnunet.seeding import MAIN, derived_seed, seed_process, seeded_dataloaders


class nnUNetTrainerBench(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ.get("BENCH_EPOCHS", self.num_epochs))
        self.num_iterations_per_epoch = int(os.environ.get("BENCH_ITERATIONS", self.num_iterations_per_epoch))
        self.num_val_iterations_per_epoch = int(os.environ.get("BENCH_VAL_ITERATIONS",
                                                               self.num_val_iterations_per_epoch))
        self.seed = int(os.environ["BENCH_SEED"]) if os.environ.get("BENCH_SEED") else None
        if self.seed is not None:  # before initialize(), so the initial weights are seeded too
            seed_process(derived_seed(self.seed, self.local_rank, MAIN))

    def get_dataloaders(self):
        return super().get_dataloaders() if self.seed is None else seeded_dataloaders(self, self.seed)
