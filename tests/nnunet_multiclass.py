"""A small multi-class nnU-Net world for tests/test_multiclass.py: "arteries" (horizontal bars, class 1)
and "veins" (vertical bars, class 2) on noise, crossing where they meet (class 3), and an uncertain square
on some bars (nnU-Net's ignore label 4), as LES-AV's labels. The same cases are written twice: with the
crossing as its own class (Dataset991), and as nnU-Net regions (Dataset992: artery = {1, 3}, vein =
{2, 3}, crossing = {3}, regions_class_order [1, 2, 3]); both planned and preprocessed by nnU-Net."""

import json
import os
import sys
from pathlib import Path

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import save_json
from nnunet_discs import PLAN_AND_PREPROCESS, run
from nnunetv2.utilities.crossval_split import generate_crossval_split
from PIL import Image

CLASSES, REGIONS = 991, 992
NAMES = {CLASSES: "Dataset991_ArteryVein", REGIONS: "Dataset992_ArteryVeinRegions"}
IGNORE = 4
LABELS = {
    CLASSES: {"background": 0, "artery": 1, "vein": 2, "crossing": 3, "ignore": IGNORE},
    REGIONS: {"background": 0, "artery": [1, 3], "vein": [2, 3], "crossing": 3, "ignore": IGNORE},
}
TRAIN, TEST, SIZE = 6, 2, 64


def vessel_case(rng: np.random.Generator, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(image (H, W, 3) uint8, labels (H, W) uint8): two or three bars of each class on noise, the
    bars' intersections crossing, and on every other case an uncertain square over an artery."""
    labels = np.zeros((size, size), np.uint8)
    rows = rng.choice(np.arange(6, size - 10, 12), rng.integers(2, 4), replace=False)
    cols = rng.choice(np.arange(6, size - 10, 12), rng.integers(2, 4), replace=False)
    artery, vein = np.zeros_like(labels, bool), np.zeros_like(labels, bool)
    for r in rows:
        artery[r:r + rng.integers(3, 6)] = True
    for c in cols:
        vein[:, c:c + rng.integers(3, 6)] = True
    labels[artery], labels[vein], labels[artery & vein] = 1, 2, 3
    if rng.random() < 0.5:
        r, c = rows[0], rng.integers(0, size - 8)
        labels[r:r + 3, c:c + 8] = IGNORE
    image = rng.normal(50, 20, (size, size, 3))
    image[..., 0] += 140 * artery  # red arteries, blue veins
    image[..., 2] += 140 * vein
    return np.clip(image, 0, 255).astype(np.uint8), labels


def write_raw(raw: Path, seed: int = 0) -> None:
    """Both datasets under `raw`, from the same cases (imagesTr/labelsTr, imagesTs/labelsTs)."""
    rng = np.random.default_rng(seed)
    cases = {f"{split}_{i:03d}": vessel_case(rng) for split, n in (("tr", TRAIN), ("ts", TEST))
             for i in range(n)}
    for dataset, folder in NAMES.items():
        for name, (image, labels) in cases.items():
            split = "Tr" if name.startswith("tr") else "Ts"
            for kind, array, file in (("images", image, f"{name}_0000"), ("labels", labels, name)):
                (raw / folder / f"{kind}{split}").mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(raw / folder / f"{kind}{split}" / f"{file}.png")
        dataset_json = {"channel_names": {"0": "rgb_to_0_1", "1": "rgb_to_0_1", "2": "rgb_to_0_1"},
                        "labels": LABELS[dataset], "numTraining": TRAIN, "file_ending": ".png"}
        if dataset == REGIONS:
            dataset_json["regions_class_order"] = [1, 2, 3]
        (raw / folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))


def multiclass_env(root: Path) -> dict:
    """An environment whose nnU-Net folders under `root` hold both datasets, planned and preprocessed
    for 2d, with fold 0's split written (as nnunet_discs.nnunet_env does for the discs)."""
    # one thread and one worker per nnU-Net pool, as nnunet_discs.nnunet_env explains
    env = dict(os.environ, PYTHONUNBUFFERED="1", nnUNet_compile="f", nnUNet_def_n_proc="1", nnUNet_npp="1",
               nnUNet_nps="1", OMP_NUM_THREADS="1")
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[var] = str(root / var)
    env.pop("nnUNet_extTrainer", None)
    write_raw(root / "nnUNet_raw")
    run(env, sys.executable, "-c", PLAN_AND_PREPROCESS, "-d", CLASSES, REGIONS, "-c", "2d", "-np", "1")
    names = sorted(f"tr_{i:03d}" for i in range(TRAIN))
    for folder in NAMES.values():
        save_json(generate_crossval_split(names, seed=12345, n_splits=5),
                  root / "nnUNet_preprocessed" / folder / "splits_final.json")
    env["nnUNet_n_proc_DA"] = "0"
    return env
