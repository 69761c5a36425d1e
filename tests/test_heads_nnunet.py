"""Every installed decoder through nnU-Net v2 on CPU: `segframe train` (a moment of training, the
session's run per decoder), then the results folder predicts with no YAML through `segframe predict`
and through nnU-Net's own predictor, pixel for pixel the same. nnU-Net's side runs here in the test's
process, as `nnUNetv2_predict` runs it (the trainer found by name through nnUNet_extTrainer, nnU-Net's
own checkpoint loading) but without its worker pools, which would start two more Python processes per
decoder; the `nnUNetv2_predict` command itself is run in test_nnunet.py and the Mask2Former plugin's
test. Learning itself is tested in test_nnunet.py.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from nnunet_discs import NAME
from PIL import Image

from segframe.nnunet import EXT_TRAINER_DIR
from segframe.plugins import get_registry

DECODERS = list(get_registry().decoders())


def nnunet_predict(folder: Path, images: Path, out: Path) -> None:
    """nnU-Net's nnUNetPredictor on fold 0 of `folder`, as nnUNetv2_predict --disable_tta runs it, in this
    process (predict_from_files_sequential: no worker pools)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), (0,), "checkpoint_final.pth")
    out.mkdir()  # nnU-Net writes its arguments there before it creates the folder itself
    predictor.predict_from_files_sequential(str(images), str(out), save_probabilities=False, overwrite=True)


@pytest.mark.parametrize("decoder", DECODERS)
def test_train_then_predict_without_yaml_both_ways(disc_world, trained_runs, decoder, tmp_path, monkeypatch):
    folder = trained_runs[decoder][0]
    assert (folder / "fold_0" / "checkpoint_final.pth").is_file()
    assert not Path(disc_world["root"], f"{decoder}.yaml").exists()  # prediction needs only the folder
    images = Path(disc_world["nnUNet_raw"], NAME, "imagesTs")
    ours = subprocess.Popen([sys.executable, "-m", "segframe.cli", "predict", "-i", str(images), "-o",
                             str(tmp_path / "ours"), "-m", str(folder), "-device", "cpu", "--disable_tta"],
                            env=disc_world, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:  # side by side: nnU-Net's prediction while segframe predict starts up
        monkeypatch.setenv("nnUNet_extTrainer", str(EXT_TRAINER_DIR))  # what `segframe trainer-path` prints
        nnunet_predict(folder, images, tmp_path / "stock")
    finally:
        log = ours.communicate()[0]
    assert ours.returncode == 0, f"segframe predict failed ({ours.returncode}):\n{log[-3000:]}"
    mine = sorted((tmp_path / "ours").glob("*.png"))
    assert [p.name for p in mine] == [f"ts_{i:03d}.png" for i in range(4)]
    for p in mine:
        a, b = np.asarray(Image.open(p)), np.asarray(Image.open(tmp_path / "stock" / p.name))
        assert a.shape == (64, 64) and set(np.unique(a)) <= {0, 1}
        assert (a == b).all(), p.name
