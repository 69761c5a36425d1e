"""The small nnU-Net world the end-to-end tests train in: bright discs on noise (RGB, 64x64 by
default) written as an nnU-Net raw dataset under a temporary root, planned and preprocessed by
nnU-Net's own command, and the helpers that run commands in it. Imported by the tests under
tests/ and by the in-repo plugins' nnU-Net tests."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from segframe.data.common import Case, write_dataset

TRAINER = "nnUNetTrainerSegframe"
BIN = Path(sys.executable).parent


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


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def nnunet_env(root: Path, dataset: int, name: str, train: int, test: int, size: int = 64, seed: int = 0,
               **extra: str) -> dict:
    """An environment whose nnUNet_raw/_preprocessed/_results live under `root`, holding dataset
    `dataset` (`train` + `test` disc cases of `size` px), planned and preprocessed for 2d."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", nnUNet_compile="f", **extra)
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
    run(env, BIN / "nnUNetv2_plan_and_preprocess", "-d", dataset, "-c", "2d", "-np", "1")
    # augmentation in the training process (2-core CI machines); set after planning, which would
    # pass 0 to torch.set_num_threads
    env["nnUNet_n_proc_DA"] = "0"
    env["root"] = str(root)
    return env
