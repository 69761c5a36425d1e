"""The demo's flow with nnU-Net's commands stubbed: stage order, command lines, outputs, data choice."""

import functools
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import segframe.data
from segframe import demo
from segframe.cli import main
from segframe.nnunet import runtime as nnunet_runtime

sys.path.insert(0, str(Path(__file__).parent))
from test_data import write_drive  # noqa: E402


def test_demo_config_is_the_benchmarks_depth6_row():
    from segframe.config import load_config

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from vessels import row_config

    cfg = load_config(demo.DEFAULT_CONFIG)
    assert cfg.train.patch_size == [192, 192] and cfg.model.checkpoint_path == ""
    # the CHASE_DB1 row that met the U-Net on Dice, clDice and thin vessels at less of its time
    _, row, _, _ = row_config("upernet+depth6+detail+srec0.4", cfg)
    assert cfg.model == row.model and cfg.train.loss == row.train.loss
    assert cfg.model.layers == [0, 2, 3, 5] and cfg.train.loss.skeleton_recall == 0.4


@pytest.fixture
def fake_nnunet(monkeypatch):
    """Replace the subprocess calls: training writes a checkpoint, prediction copies the references
    with one case's prediction emptied."""
    calls = []

    def run(cmd, env):
        calls.append(cmd)
        if "train" in cmd:
            dataset_id = int(cmd[cmd.index("train") + 1])
            fold = Path(env["nnUNet_results"], f"Dataset{dataset_id:03d}_X", "Trainer__Plans__2d", "fold_0")
            fold.mkdir(parents=True)
            (fold / "checkpoint_final.pth").write_bytes(b"")
        if "predict" in cmd:
            src, out = Path(cmd[cmd.index("-i") + 1]), Path(cmd[cmd.index("-o") + 1])
            shutil.copytree(src.parent / "labelsTs", out)
            first = sorted(out.glob("*.png"))[0]
            from PIL import Image

            Image.fromarray(np.zeros_like(np.asarray(Image.open(first)))).save(first)

    monkeypatch.setattr(demo, "_run", run)
    return calls


def test_demo_on_generated_data(tmp_path, fake_nnunet, capsys, monkeypatch):
    small = functools.partial(segframe.data.make_synthetic, num_train=4, num_test=3, size=64)
    monkeypatch.setattr(segframe.data, "make_synthetic", small)
    monkeypatch.setattr(nnunet_runtime, "native_bf16", lambda: True)  # a CPU with AVX512_BF16
    summary = demo.run_demo("", tmp_path / "work", checkpoint=None)
    out = capsys.readouterr().out
    assert "generated vessel-like images" in out and "dice" in out
    plan, train, predict = fake_nnunet
    assert Path(plan[0]).name == "nnUNetv2_plan_and_preprocess" and plan[1:5] == ["-d", "503", "-c", "2d"]
    assert train[1:] == ["-m", "segframe.cli", "train", "503", "2d", "0", "--config",
                         str(tmp_path / "work" / "demo_config.yaml"), "-device", "cpu", "--overwrite"]
    model_folder = predict[predict.index("-m", predict.index("predict")) + 1]
    assert model_folder.endswith("Trainer__Plans__2d") and "--disable_tta" in predict
    assert predict[predict.index("--precision") + 1] == "bf16"  # auto, on a CPU with native bfloat16
    cases = summary["metrics"]["cases"]
    assert [c["dice"] for c in cases.values()] == [0.0, 1.0, 1.0]
    work = tmp_path / "work"
    assert json.loads((work / "summary.json").read_text())["metrics"]["mean"]["dice"] == pytest.approx(2 / 3)
    text = (work / "summary.md").read_text()
    assert "random initialisation" in text
    assert "- device: cpu, test-time mirroring: off, arithmetic: training fp32, final validation and " \
           "prediction bf16" in text
    # nnU-Net's final validation predicts in the same arithmetic; the training stays fp32
    used = yaml.safe_load((work / "demo_config.yaml").read_text())["train"]
    assert (used["validation_precision"], used["precision"]) == ("bf16", "auto")
    assert ("- model: dinov3 small (features of blocks 1, 3, 4, 6) + upernet 128 + detail path; loss: "
            "nnU-Net's Dice + CE + Skeleton Recall 0.4 (random") in text
    assert (work / "metrics.csv").is_file()
    assert sorted(p.name for p in (work / "overlays").iterdir()) == [f"test_00{i}.png" for i in range(3)]


def test_demo_on_drive_with_checkpoint(tmp_path, fake_nnunet, monkeypatch):
    monkeypatch.setattr(nnunet_runtime, "native_bf16", lambda: False)  # an AVX2-only CPU
    write_drive(tmp_path / "DRIVE")
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"x")
    summary = demo.run_demo(str(tmp_path / "DRIVE"), tmp_path / "work", checkpoint=str(weights), tta=True)
    assert summary["data"].startswith("DRIVE") and "Dataset501_DRIVE" in summary["dataset"]
    assert "--disable_tta" not in fake_nnunet[-1]
    predict = fake_nnunet[-1]
    assert predict[predict.index("--precision") + 1] == "fp32" and summary["precision"] == "fp32"
    used = yaml.safe_load((tmp_path / "work" / "demo_config.yaml").read_text())
    assert used["model"]["checkpoint_path"] == str(weights)
    assert used["train"]["validation_precision"] == "fp32" and summary["train_precision"] == "fp32"
    assert summary["weights"].startswith("fine-tuned from")


def test_the_summary_names_every_setting_the_demo_trains(tmp_path, fake_nnunet):
    write_drive(tmp_path / "DRIVE")
    config = tmp_path / "mine.yaml"
    text = demo.DEFAULT_CONFIG.read_text().replace("hidden_size: 128", "hidden_size: 64")
    text = text.replace("layers: [0, 2, 3, 5]", "layers: [0, 1, 2, 3]")
    config.write_text(text.replace("skeleton_recall: 0.4", "skeleton_recall: 0.5") + "  precision: bf16\n")
    summary = demo.run_demo(str(tmp_path / "DRIVE"), tmp_path / "work", config=config, precision="fp32")
    # the config's training precision is kept; --precision sets the final validation's and the prediction's
    assert (summary["train_precision"], summary["precision"]) == ("bf16", "fp32")
    assert "arithmetic: training bf16, final validation and prediction fp32" in demo.summary_markdown(summary)
    assert summary["model"] == ("dinov3 small (features of blocks 1, 2, 3, 4) + upernet 64 + detail path; "
                                "loss: nnU-Net's Dice + CE + Skeleton Recall 0.5")


def test_bf16_is_refused_off_the_cpu_before_anything_runs(tmp_path, fake_nnunet):
    with pytest.raises(demo.DemoError, match=r"--precision bf16 is for --device cpu .*use --precision auto"):
        demo.run_demo("", tmp_path / "work", device="cuda", precision="bf16")
    assert fake_nnunet == [] and not (tmp_path / "work").exists()
    assert demo.demo_precision("auto", "cuda") == "fp32"


def test_overlay_colours():
    image = np.full((2, 3, 3), 100, np.uint8)
    truth = np.array([[1, 1, 0], [0, 0, 0]], bool)
    pred = np.array([[1, 0, 1], [0, 0, 0]], bool)
    panel = demo.overlay(image, truth, pred)
    assert panel.shape == (2, 4 * 3 + 3 * 8, 3)
    errors = panel[:, -3:]
    assert errors[0, 0].tolist() == [0, 255, 0] and errors[0, 2].tolist() == [255, 0, 0]
    assert errors[0, 1].tolist() == [0, 96, 255] and errors[1, 0].tolist() == [60, 60, 60]
    assert (panel[:, 3 + 8:6 + 8, 0] == truth * 255).all()


def test_demo_errors(tmp_path, fake_nnunet, capsys):
    assert main(["demo", "--data", str(tmp_path / "nowhere"), "--work", str(tmp_path / "w")]) == 1
    assert "data folder not found" in capsys.readouterr().err
    with pytest.raises(demo.DemoError, match="no trained model"):
        demo.find_results_folder(tmp_path, 502)
    (tmp_path / "empty").mkdir()
    assert main(["demo", "--data", str(tmp_path / "empty"), "--work", str(tmp_path / "w")]) == 1
    assert "Image_01L.jpg" in capsys.readouterr().err
