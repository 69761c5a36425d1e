"""Every installed decoder through nnU-Net v2 on CPU: `segframe train` (a moment of training, the
session's run per decoder), then the results folder predicts with no YAML through `segframe predict`
and through stock `nnUNetv2_predict` with `nnUNet_extTrainer`, pixel for pixel the same. Learning
itself is tested in test_nnunet.py.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from nnunet_discs import BIN, DATASET, NAME, TRAINER
from PIL import Image

from segframe.nnunet import EXT_TRAINER_DIR
from segframe.plugins import get_registry

DECODERS = list(get_registry().decoders())


def run_both(*commands: tuple[list, dict]) -> None:
    """Run the commands side by side (each is mostly its own start-up) and fail with the first error."""
    procs = [subprocess.Popen([str(c) for c in cmd], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for cmd, env in commands]
    outputs = [proc.communicate()[0] for proc in procs]
    for (cmd, _), proc, out in zip(commands, procs, outputs, strict=True):
        assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{out[-3000:]}"


@pytest.mark.parametrize("decoder", DECODERS)
def test_train_then_predict_without_yaml_both_ways(disc_world, trained_runs, decoder, tmp_path):
    folder = trained_runs[decoder][0]
    assert (folder / "fold_0" / "checkpoint_final.pth").is_file()
    assert not Path(disc_world["root"], f"{decoder}.yaml").exists()  # prediction needs only the folder
    images = Path(disc_world["nnUNet_raw"], NAME, "imagesTs")
    stock = dict(disc_world, nnUNet_extTrainer=str(EXT_TRAINER_DIR))  # what `segframe trainer-path` prints
    run_both(([sys.executable, "-m", "segframe.cli", "predict", "-i", images, "-o", tmp_path / "ours",
               "-m", folder, "-device", "cpu", "--disable_tta"], disc_world),
             ([BIN / "nnUNetv2_predict", "-i", images, "-o", tmp_path / "stock", "-d", DATASET, "-c", "2d",
               "-tr", TRAINER, "-p", f"nnUNetPlans_segframe_{decoder}", "-f", "0", "-device", "cpu",
               "--disable_tta", "-npp", "1", "-nps", "1"], stock))  # each worker is a spawned process
    ours = sorted((tmp_path / "ours").glob("*.png"))
    assert [p.name for p in ours] == [f"ts_{i:03d}.png" for i in range(4)]
    for p in ours:
        mine, theirs = np.asarray(Image.open(p)), np.asarray(Image.open(tmp_path / "stock" / p.name))
        assert mine.shape == (64, 64) and set(np.unique(mine)) <= {0, 1}
        assert (mine == theirs).all(), p.name
