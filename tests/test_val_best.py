"""End to end on one tiny trained results folder: `segframe train --val_best` (the best checkpoint
validated into fold_X/validation_best, with and without --val), `segframe predict -chk checkpoint_best.pth`,
and `segframe export` run on the real folder (its JSON's preprocessing checked against nnU-Net's own
prediction, its refusals).

The run trains in the session's disc world (tests/nnunet_discs.py) under its own plans name, one epoch
of two iterations at 48x48; the export check predicts 48x48 crops (one tile).
"""

import hashlib
import json
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from nnunet_discs import DATASET, NAME, results, segframe, write_yaml
from PIL import Image

TINY = {
    "model": {"backbone": "dinov3", "backbone_size": "tiny", "decoder": "linear"},
    "train": {"initial_lr": 1e-3, "num_epochs": 1, "num_iterations_per_epoch": 2,
              "num_val_iterations_per_epoch": 1, "warmup_epochs": 0, "batch_size": 2, "patch_size": [48, 48]},
}


@pytest.fixture(scope="module")
def world(disc_world, tmp_path_factory):
    """The env, the trained fold 0 of the `valbest` run, and its YAML (kept for fold 1's --val_best run)."""
    config = write_yaml(tmp_path_factory.mktemp("valbest") / "valbest.yaml", TINY)
    segframe(disc_world, "train", DATASET, "2d", "0", "--config", config, "-device", "cpu")
    return disc_world, results(disc_world, "valbest"), config


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def all_foreground_best(fold: Path) -> None:
    """Make checkpoint_best.pth differ from the final weights: its classifier says "disc" everywhere."""
    best = torch.load(fold / "checkpoint_best.pth", weights_only=False, map_location="cpu")
    weights = best["network_weights"]  # the last layer: the upsampler's 1x1 conv to the classes
    weights["upsampler.out.weight"] = torch.zeros_like(weights["upsampler.out.weight"])
    weights["upsampler.out.bias"] = torch.tensor([-50.0, 50.0])
    torch.save(best, fold / "checkpoint_best.pth")


def validation_images(env: dict, fold: Path, out: Path, crop: int | None = None) -> list[str]:
    """fold's validation cases as input images in `out` (their top-left crop x crop, if given)."""
    cases = [p.name[:-4] for p in sorted((fold / "validation").glob("*.png"))]
    out.mkdir()
    for case in cases:
        image = Image.open(Path(env["nnUNet_raw"], NAME, "imagesTr", f"{case}_0000.png"))
        (image.crop((0, 0, crop, crop)) if crop else image).save(out / f"{case}_0000.png")
    return cases


def test_val_best_validates_checkpoint_best_into_its_own_folder(world, tmp_path):
    env, folder, _ = world
    fold = folder / "fold_0"
    all_foreground_best(fold)
    final_validation = digest(fold / "validation")
    out = segframe(env, "train", DATASET, "2d", "0", "--val", "--val_best", "--name", "valbest",
                   "-device", "cpu")
    assert "validating checkpoint_best.pth" in out.stdout
    assert digest(fold / "validation") == final_validation  # the final weights' validation is untouched
    assert not list(fold.glob(".validation_best*"))
    cases = [p.name for p in sorted((fold / "validation").glob("*.png"))]
    assert cases and [p.name for p in sorted((fold / "validation_best").glob("*.png"))] == cases
    for case in cases:  # the best weights predict "disc" everywhere
        assert (np.asarray(Image.open(fold / "validation_best" / case)) == 1).all()
    best = json.loads((fold / "validation_best" / "summary.json").read_text())["foreground_mean"]["Dice"]
    final = json.loads((fold / "validation" / "summary.json").read_text())["foreground_mean"]["Dice"]
    assert best != final

    # segframe predict -chk checkpoint_best.pth: the same weights, the same masks as nnU-Net's validation
    images = tmp_path / "val_images"
    validation_images(env, fold, images)
    segframe(env, "predict", "-i", images, "-o", tmp_path / "pred", "-m", folder, "-f", "0",
             "-chk", "checkpoint_best.pth", "-device", "cpu")
    for case in cases:
        assert (np.asarray(Image.open(tmp_path / "pred" / case))
                == np.asarray(Image.open(fold / "validation_best" / case))).all()


def test_val_best_after_training_validates_only_the_best(world):
    """As nnUNetv2_train --val_best: train, then one validation, with checkpoint_best.pth."""
    env, folder, config = world
    out = segframe(env, "train", DATASET, "2d", "1", "--config", config, "--val_best", "-device", "cpu")
    fold = folder / "fold_1"
    assert "validating checkpoint_best.pth (epoch 1)" in out.stdout
    assert (fold / "checkpoint_final.pth").is_file() and (fold / "validation_best" / "summary.json").is_file()
    assert not (fold / "validation").exists()


def test_val_best_errors_change_nothing(world):
    env, folder, _ = world
    fold = folder / "fold_2"
    fold.mkdir()
    shutil.copy(folder / "fold_0" / "checkpoint_final.pth", fold / "checkpoint_final.pth")
    before = digest(folder)
    done = segframe(env, "train", DATASET, "2d", "2", "--val", "--val_best", "--name", "valbest",
                    "-device", "cpu", check=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "--val_best validates" in done.stderr
    assert "checkpoint_best.pth, which does not exist" in done.stderr
    assert digest(folder) == before
    shutil.rmtree(fold)


def test_export_of_a_results_folder(world, tmp_path):
    """`segframe export` on the trained folder; the JSON's preprocessing (x / 255 for rgb_to_0_1) fed to
    onnxruntime gives the probabilities and labels nnU-Net's own predictor gives (one 48x48 tile, no
    mirroring), within nnU-Net's float16 sum of the tile's logits."""
    ort = pytest.importorskip("onnxruntime")
    env, folder, _ = world
    onnx_file = tmp_path / "model.onnx"
    out = segframe(env, "export", "-m", folder, "-f", "0", "-o", onnx_file)
    assert f"wrote {onnx_file}" in out.stdout
    info = json.loads((tmp_path / "model.json").read_text())
    assert info["classes"] == {"background": 0, "vessel": 1}  # dataset.json: the discs are "vessel"
    assert [c["scheme"] for c in info["channels"]] == ["RGBTo01Normalization"] * 3
    assert all(c["raw_to_input"].startswith("x / 255") for c in info["channels"])
    assert info["patch_size"] == [48, 48] and info["input"]["shape"][:2] == ["batch", 3]
    assert info["input"]["shape"][2:] == ["height", "width"] and info["input"]["min_size"] == [32, 32]
    assert "fixed_size_reason" not in info["input"] and "fixes the image size" not in out.stdout
    assert info["segframe_version"] and info["decoder"] == "linear" and info["fold"] == "0"

    fold = folder / "fold_0"
    images = tmp_path / "val_images"
    cases = validation_images(env, fold, images, crop=48)  # one tile of the 48x48 patch
    segframe(env, "predict", "-i", images, "-o", tmp_path / "pred", "-m", folder, "-f", "0", "--disable_tta",
             "-device", "cpu", "--save_probabilities")
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    for case in cases:
        rgb = np.asarray(Image.open(images / f"{case}_0000.png"), dtype=np.float32)
        x = (rgb / 255).transpose(2, 0, 1)[None]  # what the JSON says: x / 255 per channel
        logits = session.run(None, {"image": x})[0][0]
        probs = torch.from_numpy(logits).softmax(0).numpy()  # what nnU-Net's predictor applies
        expected = np.load(tmp_path / "pred" / f"{case}.npz")["probabilities"].reshape(probs.shape)
        # nnU-Net sums the tile's Gaussian-weighted logits in float16: ~1e-4 inside, up to ~3e-3 at the tile's
        # border, where the weight is smallest. Labels must agree wherever that cannot decide them.
        off = np.abs(probs - expected)
        assert off.max() < 1e-2 and off[:, 4:-4, 4:-4].max() < 1e-3, case
        decided = np.abs(expected[1] - expected[0]) > 2e-2
        labels = np.asarray(Image.open(tmp_path / "pred" / f"{case}.png"))
        assert decided.mean() > 0.95 and (logits.argmax(0) == labels)[decided].all(), case
    assert session.run(None, {"image": np.zeros((2, 3, 61, 75), np.float32)})[0].shape == (2, 2, 61, 75)

    # an existing file is refused unless --overwrite; refusals touch nothing
    before = digest(tmp_path)
    done = segframe(env, "export", "-m", folder, "-o", onnx_file, check=False)
    assert done.returncode == 1 and "--overwrite" in done.stderr and "Traceback" not in done.stderr
    done = segframe(env, "export", "-m", folder, "-o", onnx_file, "--overwrite", "-chk", "none.pth",
                    check=False)
    assert done.returncode == 1 and "have no none.pth" in done.stderr  # past the refusal, stopped at loading
    # the same trust rules as segframe predict: a checkpoint that needs unpickling is refused
    crafted = folder / "fold_3"
    crafted.mkdir()
    checkpoint = torch.load(fold / "checkpoint_final.pth", weights_only=False, map_location="cpu")
    torch.save({**checkpoint, "extra": Fraction(1, 3)}, crafted / "checkpoint_final.pth")
    done = segframe(env, "export", "-m", folder, "-f", "3", "-o", tmp_path / "crafted.onnx", check=False)
    assert done.returncode == 1 and "refusing to load" in done.stderr and "--trust-checkpoint" in done.stderr
    assert "Traceback" not in done.stderr
    shutil.rmtree(crafted)
    assert digest(tmp_path) == before
