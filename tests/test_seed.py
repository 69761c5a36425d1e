"""train.seed: the config key, the seeds derived for the training process and each augmentation worker, and
the seeded multi-worker augmenter giving the same batches in the same order twice."""

import random

import numpy as np
import pytest
import torch
from conftest import tiny_config

from segframe.config import validate_config
from segframe.errors import ConfigError
from segframe.nnunet.seeding import (
    MAIN,
    TRAIN_WORKERS,
    VAL_WORKERS,
    SeededWorkerLoader,
    derived_seed,
    seeded_augmenter,
)


def test_seed_config_default_and_validation():
    assert validate_config(tiny_config()).train.seed is None  # unseeded unless asked
    assert validate_config({**tiny_config(), "train": {"seed": 0}}).train.seed == 0
    assert validate_config({**tiny_config(), "train": {"seed": 2**32 - 1}}).train.seed == 2**32 - 1
    for bad, why in ((-1, "greater than or equal to 0"), (2**32, "less than or equal to 4294967295"),
                     (1.5, "valid integer"), ("seven", "valid integer")):
        with pytest.raises(ConfigError, match=rf"train\.seed: .*{why}"):
            validate_config({**tiny_config(), "train": {"seed": bad}}, "run.yaml")


def test_derived_seeds_are_deterministic_and_distinct():
    workers = [derived_seed(7, 0, TRAIN_WORKERS, i) for i in range(4)]
    assert workers == [derived_seed(7, 0, TRAIN_WORKERS, i) for i in range(4)]  # the same in every run
    streams = workers + [derived_seed(7, 0, MAIN), derived_seed(7, 0, VAL_WORKERS, 0),
                         derived_seed(7, 1, TRAIN_WORKERS, 0), derived_seed(8, 0, TRAIN_WORKERS, 0)]
    assert len(set(streams)) == len(streams)  # per worker, per stream, per DDP rank, per run seed
    assert all(0 <= s < 2**32 for s in streams)  # what np.random.seed accepts


class FakeLoader:
    """Infinite batches made of draws from the three RNGs a worker must have seeded."""

    def set_thread_id(self, thread_id):
        self.thread_id = thread_id

    def __iter__(self):
        return self

    def __next__(self):
        return {"np": float(np.random.random()), "torch": float(torch.rand(1)), "py": random.random(),
                "worker": self.thread_id}


def test_worker_init_seeds_torch_numpy_and_random():
    threads = torch.get_num_threads()
    state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        loader = SeededWorkerLoader(FakeLoader(), seed=7, rank=0, stream=TRAIN_WORKERS)
        loader.set_thread_id(1)
        batch = next(loader)
    finally:
        torch.set_num_threads(threads)
        random.setstate(state[0]), np.random.set_state(state[1]), torch.set_rng_state(state[2])
    expected = derived_seed(7, 0, TRAIN_WORKERS, 1)
    assert batch["worker"] == 1
    assert batch["np"] == np.random.RandomState(expected).random_sample()
    assert batch["torch"] == float(torch.rand(1, generator=torch.Generator().manual_seed(expected)))
    assert batch["py"] == random.Random(expected).random()


def test_seeded_augmenter_same_batches_same_order_workers_differ():
    def batches(seed):
        augmenter = seeded_augmenter(FakeLoader(), 2, seed, 0, TRAIN_WORKERS, pin_memory=False)
        try:
            return [next(augmenter) for _ in range(8)]
        finally:
            augmenter._finish()

    first, again, other = batches(3), batches(3), batches(4)
    assert first == again
    # round robin over the two workers (the first batch went to the warm-up, as in nnU-Net)
    assert [b["worker"] for b in first] == [1, 0] * 4
    assert first[0]["np"] != first[1]["np"] and first[0]["torch"] != first[1]["torch"]
    assert first[0]["py"] != first[1]["py"]
    assert [b["np"] for b in first] != [b["np"] for b in other]
