"""The small nnU-Net world the end-to-end tests train in: bright discs on noise (RGB, 64x64 by
default) written as an nnU-Net raw dataset under a temporary root, planned and preprocessed by
nnU-Net's own command, and the helpers that run commands in it. Imported by the tests under
tests/ and by the in-repo plugins' nnU-Net tests; its session fixtures (registered by the root
conftest.py) plan that world once and train the runs several modules only read, two at a time."""

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from batchgenerators.utilities.file_and_folder_operations import save_json
from nnunetv2.utilities.crossval_split import generate_crossval_split

from segframe.data.common import Case, write_dataset

TRAINER = "nnUNetTrainerSegframe"
BIN = Path(sys.executable).parent
DATASET = 990
NAME = "Dataset990_Discs"
# the run test_nnunet checks learning on: validation Dice >= 0.9 on fold 0's held-out cases; seeded
# (train.seed), so the margin measured here is the margin CI gets (unseeded: 0.92-0.95)
LEARN = {
    "model": {"backbone": "dinov2", "backbone_size": "tiny",
              "decoder": {"name": "upernet", "hidden_size": 32}},
    "train": {"initial_lr": 1e-3, "num_epochs": 10, "num_iterations_per_epoch": 25,
              "num_val_iterations_per_epoch": 4, "warmup_epochs": 1, "batch_size": 8, "seed": 0},
}
# a moment of training per decoder: enough for a results folder whose checkpoints are real
MOMENT = {"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1,
          "batch_size": 2, "patch_size": [42, 42], "warmup_epochs": 0}


def disc_case(rng: np.random.Generator, name: str, size: int = 64) -> Case:
    """One to three bright discs on noise; the label is the discs, the whole image is the FOV."""
    yy, xx = np.mgrid[:size, :size]
    label = np.zeros((size, size), bool)
    for _ in range(rng.integers(1, 4)):
        r = rng.uniform(5, 12)
        cy, cx = rng.uniform(r, size - r, 2)
        label |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    image = rng.normal(60, 25, (size, size, 3)) + label[..., None] * 120
    return Case(name, np.clip(image, 0, 255).astype(np.uint8), label, np.ones((size, size), bool))


def run(env: dict, *cmd, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                             f"{done.stderr[-3000:]}")
    return done


def segframe(env: dict, *args, check: bool = True) -> subprocess.CompletedProcess:
    return run(env, sys.executable, "-m", "segframe.cli", *args, check=check)


# nnUNetv2_plan_and_preprocess, with the dataset fingerprint's foreground intensity statistics from 1e5
# sampled pixels in all instead of nnU-Net's 1e8 (5e6 per disc case, with replacement: ~0.5 s per 64x64
# case, 25 of the 39 s of planning). Only CT normalisation reads those statistics; these RGB images
# are normalised to 0-1
PLAN_AND_PREPROCESS = """import sys
from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import plan_and_preprocess_entry

nnunet_init = DatasetFingerprintExtractor.__init__


def fewer_samples(self, *args, **kwargs):
    nnunet_init(self, *args, **kwargs)
    self.num_foreground_voxels_for_intensitystats = 1e5


DatasetFingerprintExtractor.__init__ = fewer_samples
sys.argv[0] = "nnUNetv2_plan_and_preprocess"
plan_and_preprocess_entry()
"""


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def nnunet_env(root: Path, dataset: int, name: str, train: int, test: int, size: int = 64, seed: int = 0,
               **extra: str) -> dict:
    """An environment whose nnUNet_raw/_preprocessed/_results live under `root`, holding dataset
    `dataset` (`train` + `test` disc cases of `size` px), planned and preprocessed for 2d by nnU-Net's
    nnUNetv2_plan_and_preprocess (PLAN_AND_PREPROCESS)."""
    # nnUNet_def_n_proc: nnU-Net's validation, evaluation and export pools spawn 8 processes each by
    # default, every one importing torch; on 2 cores that alone cost ~10 s per training run (and
    # nnUNet_npp/_nps: stock nnUNetv2_predict's 3 + 3). One thread per process: the runs go two at a
    # time, and more OpenMP threads than free cores spin (epochs 25 times slower, seen on 2 cores)
    env = dict(os.environ, PYTHONUNBUFFERED="1", nnUNet_compile="f", nnUNet_def_n_proc="1", nnUNet_npp="1",
               nnUNet_nps="1", OMP_NUM_THREADS="1", **extra)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[var] = str(root / var)
        (root / var).mkdir()
    env.pop("nnUNet_extTrainer", None)
    env.pop("PYTHONWARNINGS", None)
    rng = np.random.default_rng(seed)
    write_dataset(root / "nnUNet_raw", dataset, name,
                  train=(disc_case(rng, f"tr_{i:03d}", size) for i in range(train)),
                  test=(disc_case(rng, f"ts_{i:03d}", size) for i in range(test)),
                  description="discs on noise", reference="generated", licence="CC0")
    run(env, sys.executable, "-c", PLAN_AND_PREPROCESS, "-d", dataset, "-c", "2d", "-np", "1")
    # the 5-fold split nnU-Net's first training would write, written now: runs started side by side
    # must not race to create it
    names = sorted(f"tr_{i:03d}" for i in range(train))
    save_json(generate_crossval_split(names, seed=12345, n_splits=5),
              root / "nnUNet_preprocessed" / f"Dataset{dataset:03d}_{name}" / "splits_final.json")
    # augmentation in the training process (2-core CI machines); set after planning, which would
    # pass 0 to torch.set_num_threads
    env["nnUNet_n_proc_DA"] = "0"
    env["root"] = str(root)
    return env


def results(env: dict, tag: str) -> Path:
    """The results folder of the segframe run `tag` (plans nnUNetPlans_segframe_<tag>) in the disc world."""
    return Path(env["nnUNet_results"], NAME, f"{TRAINER}__nnUNetPlans_segframe_{tag}__2d")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items):
    """Under pytest-xdist (`--dist loadgroup`, as `make test` runs), the tests that read the trained runs
    share one worker, so each worker's session does not train them again; so do the tests of a module
    that use one of its module-scoped fixtures (the runs a module trains for itself), which each worker
    would otherwise build again for its share of the module's tests."""
    for item in items:
        if "trained_runs" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("trained_runs"))
            continue
        info = getattr(item, "_fixtureinfo", None)
        definitions = info.name2fixturedefs.values() if info else ()
        if any(d.scope == "module" for defs in definitions for d in defs):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))


@pytest.fixture(scope="session")
def disc_world(tmp_path_factory) -> dict:
    """Dataset990_Discs (20 training + 4 test cases), planned once for every end-to-end module; each
    module trains under plans names of its own, so the modules never see each other's runs."""
    return nnunet_env(tmp_path_factory.mktemp("discs"), DATASET, "Discs", train=20, test=4)


@pytest.fixture(scope="session")
def trained_runs(disc_world) -> dict[str, tuple[Path, str, float]]:
    """`segframe train` to the end for LEARN (tag `learn`) and for a moment of every installed decoder
    (tag = decoder name), two processes at a time; each YAML is deleted once its run is done, as
    prediction must need only the results folder. tag -> (results folder, stdout, wall seconds).
    Tests only read these folders."""
    from test_heads import section

    from segframe.plugins import get_registry

    configs = {"learn": LEARN}
    for decoder in get_registry().decoders():
        configs[decoder] = {"model": {"backbone": "dinov2", "backbone_size": "tiny",
                                      "decoder": section(decoder)}, "train": MOMENT}
    root = Path(disc_world["root"])

    def train(tag: str) -> tuple[Path, str, float]:
        config = write_yaml(root / f"{tag}.yaml", configs[tag])
        start = time.perf_counter()
        out = segframe(disc_world, "train", DATASET, "2d", "0", "--config", config, "-device", "cpu")
        config.unlink()
        return results(disc_world, tag), out.stdout, time.perf_counter() - start

    with ThreadPoolExecutor(2) as pool:  # the longest run first, the moments beside it
        return dict(zip(configs, pool.map(train, configs), strict=True))
