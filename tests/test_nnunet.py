"""nnU-Net v2 end to end on CPU: real planning and preprocessing, `segframe train`, continue, validate,
`segframe predict` without the YAML, stock `nnUNetv2_predict`, and the errors a user can cause.

The dataset is bright discs on noise (64x64 RGB PNG, labels background/disc) written by the test.
"""

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from nnunet_discs import BIN, DATASET, LEARN, NAME, TRAINER, results, run, segframe, write_yaml
from PIL import Image


@pytest.fixture(scope="module")
def env(disc_world):
    return disc_world


@pytest.fixture(scope="module")
def learned(trained_runs):
    """One `segframe train` run of LEARN to the end (the session's `learn` run); its YAML is gone."""
    return trained_runs["learn"]


def test_training_learns_and_logs(learned):
    folder, stdout, seconds = learned
    summary = json.loads((folder / "fold_0" / "validation" / "summary.json").read_text())
    dice = summary["foreground_mean"]["Dice"]
    print(f"\nlearning test: validation Dice {dice:.4f}, segframe train wall time {seconds:.0f} s")
    assert dice >= 0.9
    assert "rounded to [70, 70], a multiple of the ViT patch (14)" in stdout
    log = next((folder / "fold_0").glob("training_log_*.txt")).read_text()
    assert "backbone dinov2 tiny" in log and "decoder upernet" in log and "LoRA off" in log
    assert "random initialisation" in log and "trainable params: " in log
    assert "WARNING" not in log  # rgb_to_0_1 channels with model.normalize: backbone
    assert (folder / "fold_0" / "progress.png").is_file()
    plans = json.loads((folder / "plans.json").read_text())
    section = plans["configurations"]["2d"]["segframe"]
    assert section["config"]["model"]["decoder"]["name"] == "upernet"
    assert section["plugins"]["decoder"]["distribution"] == "segframe-upernet"
    assert plans["configurations"]["2d"]["patch_size"] == [70, 70]
    assert yaml.safe_load((folder / "segframe.yaml").read_text())["train"]["num_epochs"] == 10
    ckpt = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=False, map_location="cpu")
    assert ckpt["trainer_name"] == TRAINER and ckpt["current_epoch"] == 10
    groups = ckpt["optimizer_state"]["param_groups"]
    assert {g["weight_decay"] for g in groups} == {0.0, 0.05}  # AdamW, no decay on norms/biases/tokens


def test_predict_without_yaml_and_stock_nnunet_predict(env, learned, tmp_path):
    folder = learned[0]
    images = Path(env["nnUNet_raw"], NAME, "imagesTs")
    out = segframe(env, "predict", "-i", images, "-o", tmp_path / "ours", "-m", folder, "-device", "cpu")
    assert "100%" in out.stderr + out.stdout  # nnU-Net's progress bar
    ours = sorted((tmp_path / "ours").glob("*.png"))
    assert [p.name for p in ours] == [f"ts_{i:03d}.png" for i in range(4)]
    dice = []
    for p in ours:
        pred = np.asarray(Image.open(p))
        ref = np.asarray(Image.open(Path(env["nnUNet_raw"], NAME, "labelsTs", p.name))) > 0
        assert pred.shape == (64, 64) and set(np.unique(pred)) <= {0, 1}
        dice.append(2 * (ref & (pred == 1)).sum() / (ref.sum() + (pred == 1).sum()))
    assert np.mean(dice) >= 0.85, dice

    stock_env = dict(env, nnUNet_extTrainer=segframe(env, "trainer-path").stdout.strip())
    run(stock_env, BIN / "nnUNetv2_predict", "-i", images, "-o", tmp_path / "stock", "-d", DATASET,
        "-c", "2d", "-tr", TRAINER, "-p", "nnUNetPlans_segframe_learn", "-f", "0", "-device", "cpu")
    for p in ours:
        assert (np.asarray(Image.open(tmp_path / "stock" / p.name)) == np.asarray(Image.open(p))).all()


def test_continue_after_a_killed_run_then_validate(env, tmp_path):
    """A run killed after its first epoch continues with --c in a new process (optimizer state and epoch
    restored), then --val re-runs only the validation. LoRA, a frozen backbone and UperNet's auxiliary
    head go through nnU-Net here too."""
    cfg = {
        "model": {"backbone": "dinov3", "backbone_size": "tiny", "freeze_backbone": True,
                  "decoder": {"name": "upernet", "hidden_size": 16, "auxiliary_head": True}},
        "lora": {"enabled": True, "r": 4},
        "train": {"num_epochs": 2, "num_iterations_per_epoch": 3, "num_val_iterations_per_epoch": 1,
                  "batch_size": 2, "patch_size": [48, 48], "save_every": 1, "warmup_epochs": 0},
    }
    config = write_yaml(tmp_path / "resume.yaml", cfg)
    cmd = [sys.executable, "-m", "segframe.cli", "train", str(DATASET), "2d", "0", "--config", str(config),
           "-device", "cpu"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.rstrip().endswith("Epoch 1"):  # printed after epoch 0's checkpoint_latest was written
            proc.kill()
            break
    proc.wait()
    fold = results(env, "resume") / "fold_0"
    assert (fold / "checkpoint_latest.pth").is_file(), "".join(seen)[-3000:]
    assert not (fold / "checkpoint_final.pth").exists()

    again = segframe(env, "train", DATASET, "2d", "0", "--config", config, "-device", "cpu", check=False)
    assert again.returncode == 1 and "--c to continue" in again.stderr
    config.unlink()  # --c reuses the config stored in the plans
    out = segframe(env, "train", DATASET, "2d", "0", "--c", "--name", "resume", "-device", "cpu")
    assert "continuing at epoch 1" in out.stdout
    final = torch.load(fold / "checkpoint_final.pth", weights_only=False, map_location="cpu")
    assert final["current_epoch"] == 2
    steps = {float(s["step"]) for s in final["optimizer_state"]["state"].values()}
    assert steps == {6.0}  # 2 epochs x 3 iterations: the first epoch's AdamW state was restored
    assert len(final["logging"]["train_losses"]) == 2
    assert any(".lora_A." in k for k in final["network_weights"])

    summary = fold / "validation" / "summary.json"
    summary.unlink()
    # side by side (independent folds): --val of fold 0, and nnU-Net's own training command on the plans
    # segframe wrote, another fold, no YAML anywhere
    stock_env = dict(env, nnUNet_extTrainer=segframe(env, "trainer-path").stdout.strip())
    with ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(segframe, env, "train", DATASET, "2d", "0", "--val", "--name", "resume",
                            "-device", "cpu"),
                pool.submit(run, stock_env, BIN / "nnUNetv2_train", DATASET, "2d", "1", "-tr", TRAINER,
                            "-p", "nnUNetPlans_segframe_resume", "-device", "cpu")]
        for job in jobs:
            job.result()
    assert summary.is_file()
    other = torch.load(fold.parent / "fold_1" / "checkpoint_final.pth", weights_only=False,
                       map_location="cpu")
    assert other["network_weights"].keys() == final["network_weights"].keys()


def test_user_errors(env, learned, tmp_path):
    def error(*args: str) -> str:
        done = segframe(env, *args, check=False)
        assert done.returncode == 1, done.stdout + done.stderr
        assert "Traceback" not in done.stderr, done.stderr
        return done.stderr

    config = write_yaml(tmp_path / "learn.yaml", LEARN)
    # the same plans name with another model would orphan the trained checkpoints
    other = dict(LEARN, model=dict(LEARN["model"], decoder="segformer"))
    again = tmp_path / "again"  # learn.yaml again: the same plans name, `learn`
    again.mkdir()
    calls = {  # independent refusals that read only: two processes at a time
        "nnUNetv2_plan_and_preprocess -d 991": ("train", "991", "2d", "0", "--config", config),
        "fold '7' does not exist": ("train", str(DATASET), "2d", "7", "--config", config),
        "no configuration '3d_fullres'": ("train", str(DATASET), "3d_fullres", "0", "--config", config),
        "--config FILE.yaml is needed": ("train", str(DATASET), "2d", "0"),
        "already have trained checkpoints": ("train", str(DATASET), "2d", "0", "--config",
                                             write_yaml(again / "learn.yaml", other), "--overwrite"),
    }
    with ThreadPoolExecutor(2) as pool:
        messages = dict(zip(calls, pool.map(lambda args: error(*args), calls.values()), strict=True))
    for expected, message in messages.items():
        assert expected in message, message
    assert "--name" in messages["already have trained checkpoints"]

    folder = learned[0]
    images = Path(env["nnUNet_raw"], NAME, "imagesTs")
    plain = tmp_path / "nnUNetTrainer__nnUNetPlans__2d"
    plain.mkdir()
    shutil.copy(Path(env["nnUNet_preprocessed"], NAME, "nnUNetPlans.json"), plain / "plans.json")
    shutil.copy(folder / "dataset.json", plain / "dataset.json")
    assert "no segframe config" in error(
        "predict", "-i", images, "-o", tmp_path / "o", "-m", plain, "-device", "cpu")

    moved = tmp_path / folder.name
    shutil.copytree(folder, moved)
    plans = json.loads((moved / "plans.json").read_text())
    section = plans["configurations"]["2d"]["segframe"]
    section["config"]["model"]["decoder"] = {"name": "fancyhead"}
    section["plugins"]["decoder"] = {"name": "fancyhead", "distribution": "segframe-fancyhead",
                                     "version": "1.2"}
    (moved / "plans.json").write_text(json.dumps(plans))
    message = error("predict", "-i", images, "-o", tmp_path / "o", "-m", moved, "-device", "cpu")
    assert "pip install segframe-fancyhead" in message and "upernet" in message
    assert "fold(s) 3" in error("predict", "-i", images, "-o", tmp_path / "o", "-m", folder, "-f", "3",
                                "-device", "cpu")
    assert "does not exist" in error("predict", "-i", tmp_path / "none", "-o", tmp_path / "o", "-m", folder,
                                     "-device", "cpu")
    broken = folder / "fold_1" / "checkpoint_latest.pth"
    broken.parent.mkdir()
    broken.write_bytes(b"PK\x03\x04 cut short")
    message = error("train", str(DATASET), "2d", "1", "--c", "--name", "learn", "-device", "cpu")
    assert "cannot continue from" in message and "fold_1/checkpoint_latest.pth" in message
    assert broken.read_bytes() == b"PK\x03\x04 cut short"
    shutil.rmtree(broken.parent)
    assert (folder / "fold_0" / "checkpoint_final.pth").is_file()  # nothing above touched the trained run
