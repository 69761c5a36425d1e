"""Every installed decoder through nnU-Net v2 on CPU: `segframe train` (a tiny run), then the results
folder predicts with no YAML through `segframe predict` and through stock `nnUNetv2_predict` with
`nnUNet_extTrainer`, pixel for pixel the same. Learning itself is tested in test_nnunet.py.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from segframe.plugins import get_registry

sys.path.insert(0, str(Path(__file__).parent))
from nnunet_discs import BIN, TRAINER, nnunet_env, run  # noqa: E402
from test_heads import section  # noqa: E402

DATASET = 991
NAME = "Dataset991_HeadDiscs"
DECODERS = list(get_registry().decoders())


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return nnunet_env(tmp_path_factory.mktemp("heads"), DATASET, "HeadDiscs", train=10, test=2, size=48,
                      seed=1)


@pytest.mark.parametrize("decoder", DECODERS)
def test_train_then_predict_without_yaml_both_ways(env, decoder, tmp_path):
    cfg = {
        "model": {"backbone": "dinov2", "backbone_size": "tiny", "decoder": section(decoder)},
        "train": {"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1,
                  "batch_size": 2, "patch_size": [42, 42], "warmup_epochs": 0},
    }
    config = tmp_path / f"{decoder}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run(env, sys.executable, "-m", "segframe.cli", "train", DATASET, "2d", "0", "--config", config,
        "-device", "cpu")
    config.unlink()  # prediction needs only the results folder
    plans = f"nnUNetPlans_segframe_{decoder}"
    folder = Path(env["nnUNet_results"], NAME, f"{TRAINER}__{plans}__2d")
    assert (folder / "fold_0" / "checkpoint_final.pth").is_file()
    images = Path(env["nnUNet_raw"], NAME, "imagesTs")
    run(env, sys.executable, "-m", "segframe.cli", "predict", "-i", images, "-o", tmp_path / "ours",
        "-m", folder, "-device", "cpu", "--disable_tta")
    stock = dict(env, nnUNet_extTrainer=run(env, sys.executable, "-m", "segframe.cli",
                                            "trainer-path").stdout.strip())
    run(stock, BIN / "nnUNetv2_predict", "-i", images, "-o", tmp_path / "stock", "-d", DATASET, "-c", "2d",
        "-tr", TRAINER, "-p", plans, "-f", "0", "-device", "cpu", "--disable_tta")
    ours = sorted((tmp_path / "ours").glob("*.png"))
    assert [p.name for p in ours] == ["ts_000.png", "ts_001.png"]
    for p in ours:
        mine, theirs = np.asarray(Image.open(p)), np.asarray(Image.open(tmp_path / "stock" / p.name))
        assert mine.shape == (48, 48) and set(np.unique(mine)) <= {0, 1}
        assert (mine == theirs).all(), p.name
