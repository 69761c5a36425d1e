"""`train.seed`: one seed for the training process and every augmentation worker, each drawing from its own
stream (numpy's SeedSequence), and batches in a fixed order (batchgenerators' MultiThreadedAugmenter)."""

from __future__ import annotations

import os
import random
from unittest import mock

import numpy as np
import torch
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

# the random streams of a seeded run: the training process, the training loader's workers, the validation's
MAIN, TRAIN_WORKERS, VAL_WORKERS = 0, 1, 2


def derived_seed(seed: int, rank: int, stream: int, worker: int = 0) -> int:
    """The 32-bit seed of one random stream of a run seeded with `seed`: numpy's SeedSequence child for
    (DDP rank, stream, worker), so every process and worker draws from its own well-mixed stream."""
    return int(np.random.SeedSequence(seed, spawn_key=(rank, stream, worker)).generate_state(1)[0])


def seed_process(seed: int) -> None:
    """Seed torch, numpy and python `random` of this process."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class SeededWorkerLoader:
    """nnU-Net's data loader as batchgenerators' workers see it: `set_thread_id`, which each worker calls once
    when it starts, is the worker-init hook that seeds the worker from the run seed and its index."""

    def __init__(self, loader, seed: int, rank: int, stream: int):
        self.loader, self.seed, self.rank, self.stream = loader, seed, rank, stream

    def set_thread_id(self, thread_id: int) -> None:
        torch.set_num_threads(1)  # as nnU-Net's own workers (NonDetMultiThreadedAugmenter) run
        seed_process(derived_seed(self.seed, self.rank, self.stream, thread_id))
        self.loader.set_thread_id(thread_id)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.loader)


def seeded_augmenter(loader, workers: int, seed: int, rank: int, stream: int, pin_memory: bool):
    """batchgenerators' MultiThreadedAugmenter over nnU-Net's data loader with `workers` seeded workers.

    It hands out batches round robin over its workers, so their order is fixed; nnU-Net's
    NonDetMultiThreadedAugmenter hands them out in whichever order the workers finish them.
    """
    augmenter = MultiThreadedAugmenter(
        SeededWorkerLoader(loader, seed, rank, stream), None, workers,
        seeds=[derived_seed(seed, rank, stream, i) for i in range(workers)], pin_memory=pin_memory)
    next(augmenter)  # start the workers now, as nnU-Net does
    return augmenter


def seeded_dataloaders(trainer: nnUNetTrainer, seed: int) -> tuple:
    """nnUNetTrainer.get_dataloaders of `trainer` with every augmentation worker seeded from `seed` and the
    batches in a fixed order; the worker counts are nnU-Net's (nnUNet_n_proc_DA for training, half of it
    for validation). Also for other nnUNetTrainer subclasses (benchmarks/trainers)."""
    workers = get_allowed_n_proc_DA()
    with mock.patch.dict(os.environ, {"nnUNet_n_proc_DA": "0"}):  # loaders built, no worker started
        train, val = nnUNetTrainer.get_dataloaders(trainer)
    if workers == 0:  # augmentation in the training process, which is seeded
        return train, val
    rank, pin = trainer.local_rank, trainer.device.type == "cuda"
    return (seeded_augmenter(train.data_loader, workers, seed, rank, TRAIN_WORKERS, pin),
            seeded_augmenter(val.data_loader, max(1, workers // 2), seed, rank, VAL_WORKERS, pin))
