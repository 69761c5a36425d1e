"""The nnU-Net integration's pieces in isolation: plans variant, LR schedule, intensity check,
auxiliary logits, DDP (gloo, 2 CPU processes) with LoRA, frozen and partly used backbones, and the
`segframe train` refusals answered before the training process starts."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config
from ddp import starting_model, train_ddp

from segframe.config import validate_config
from segframe.errors import ConfigError
from segframe.model import ViTSegModel
from segframe.nnunet.network import intensity_warning
from segframe.nnunet.plans import (
    NnUNetSetupError,
    backbone_patch_size,
    config_from_configuration,
    config_tag,
    make_plans,
    round_patch,
)
from segframe.nnunet.schedule import WarmupPolyLR

ARCH = {"network_class_name": "x", "arch_kwargs": {}, "_kw_requires_import": []}


def base_plans() -> dict:
    return {
        "plans_name": "nnUNetPlans", "dataset_name": "Dataset001_X",
        "configurations": {
            "2d": {"patch_size": [64, 96], "batch_size": 12, "data_identifier": "nnUNetPlans_2d",
                   "architecture": ARCH},
            "big": {"inherits_from": "2d", "patch_size": [512, 500]},
            "3d_fullres": {"patch_size": [32, 64, 64], "batch_size": 2, "data_identifier": "nnUNetPlans_3d",
                           "architecture": ARCH},
        },
    }


def test_round_patch_and_tags():
    assert round_patch([64, 96], 14) == [70, 98]
    assert round_patch([1024, 1000], 16) == [1024, 1008]
    assert round_patch([5, 20], 14) == [14, 14]  # at least one patch
    assert config_tag("UperNet-L.v2") == "upernet_l_v2"
    with pytest.raises(ConfigError, match="letters or digits"):
        config_tag("--")


def test_backbone_patch_size_builds_nothing_real():
    cfg = validate_config({"model": {"backbone": "dinov2", "backbone_size": "giant"}})
    assert backbone_patch_size(cfg) == 14
    cfg = validate_config({"model": {"backbone": "dinov3", "backbone_size": "7b"}})
    assert backbone_patch_size(cfg) == 16


def test_make_plans_keeps_data_and_carries_the_config():
    cfg = validate_config({"model": {"backbone": "dinov2", "backbone_size": "tiny", "decoder": "segformer"},
                           "train": {"batch_size": 3}})
    base = base_plans()
    plans, notes = make_plans(base, "2d", cfg, "nnUNetPlans_segframe_x", 14)
    entry = plans["configurations"]["2d"]
    assert plans["plans_name"] == "nnUNetPlans_segframe_x" and base["plans_name"] == "nnUNetPlans"
    assert entry["data_identifier"] == "nnUNetPlans_2d"  # nnU-Net's preprocessed data is reused
    assert entry["patch_size"] == [70, 98] and entry["batch_size"] == 3
    assert "[64, 96] rounded to [70, 98]" in notes[0]
    assert config_from_configuration(entry) == cfg
    assert entry["segframe"]["plugins"]["decoder"]["distribution"] == "segframe-segformer"
    assert "segframe" not in base["configurations"]["2d"]  # the base plans are not touched

    override = cfg.model_copy(update={"train": cfg.train.model_copy(update={"patch_size": [100, 30]})})
    plans, notes = make_plans(base, "big", override, "p", 16)
    assert plans["configurations"]["big"]["patch_size"] == [96, 32]
    assert notes[0].startswith("train.patch_size [100, 30] rounded")
    with pytest.raises(NnUNetSetupError, match="3D; segframe trains 2D"):
        make_plans(base, "3d_fullres", cfg, "p", 14)
    with pytest.raises(NnUNetSetupError, match="no configuration '2D'; known: 2d, big, 3d_fullres"):
        make_plans(base, "2D", cfg, "p", 14)
    with pytest.raises(NnUNetSetupError, match="no segframe config"):
        config_from_configuration(base["configurations"]["2d"])


def test_warmup_poly_schedule_by_hand():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [a], "lr_scale": 1.0}, {"params": [b], "lr_scale": 0.25}], lr=1.0)
    sched = WarmupPolyLR(opt, 0.01, max_epochs=10, warmup_epochs=2)
    expected = {0: 0.01 / 3, 1: 0.02 / 3, 2: 0.01, 6: 0.01 * 0.5 ** 0.9, 9: 0.01 * 0.125 ** 0.9}
    for epoch, lr in expected.items():
        sched.step(epoch)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr)
        assert opt.param_groups[1]["lr"] == pytest.approx(lr / 4)
    assert WarmupPolyLR(opt, 0.01, max_epochs=1, warmup_epochs=5).factor(0) == 1.0  # one epoch: no warmup


def test_intensity_warning():
    rgb = ["RGBTo01Normalization"] * 3
    assert intensity_warning(rgb, "backbone") is None
    assert intensity_warning(["ZScoreNormalization"], "none") is None
    assert "model.normalize: none" in intensity_warning(["ZScoreNormalization"] * 3, "backbone")
    assert "model.normalize: backbone" in intensity_warning(rgb, "none")


def test_cpu_device_takes_omp_num_threads_or_every_core(monkeypatch):
    """-device cpu: torch threads = OMP_NUM_THREADS when set (nnU-Net's CLIs take every core whatever it
    says, so two CPU runs side by side each spun on all cores), else os.cpu_count(); a bad value is
    refused in one line."""
    from segframe.errors import SegframeError
    from segframe.nnunet.runtime import torch_device as _device

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert _device("cpu") == torch.device("cpu") and torch.get_num_threads() == 3
        monkeypatch.delenv("OMP_NUM_THREADS")
        _device("cpu")
        assert torch.get_num_threads() == os.cpu_count()
        for bad in ("0", "two", "-1"):
            monkeypatch.setenv("OMP_NUM_THREADS", bad)
            with pytest.raises(SegframeError, match=f"OMP_NUM_THREADS='{bad}': set it to a whole number"):
                _device("cpu")
    finally:
        torch.set_num_threads(before)


# `segframe train` in a process of its own that starts no training process; prints whether torch was imported
REFUSE = """import sys
from segframe.cli import main
from segframe.nnunet import lifeline

def no_child(argv):
    raise SystemExit("a training process was started: " + " ".join(argv))

lifeline.run_child = no_child
code = main(sys.argv[1:])
print("torch imported:", "torch" in sys.modules)
sys.exit(code)
"""


def test_train_answers_argument_errors_without_torch(tmp_path):
    """The refusals that need neither the model nor a checkpoint come from `segframe train`'s own process
    before the training process starts (which imports torch): a typo is answered in under a second."""
    env = dict(os.environ)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[var] = str(tmp_path / var)
        (tmp_path / var).mkdir()
    dataset = tmp_path / "nnUNet_preprocessed" / "Dataset990_X"
    dataset.mkdir()
    (dataset / "nnUNetPlans.json").write_text(json.dumps(base_plans()))
    (dataset / "splits_final.json").write_text(json.dumps([{"train": [], "val": []}] * 3))
    refusals = {
        "dataset '991' is not preprocessed": ["991", "2d", "0", "--config", "x.yaml"],
        "no configuration '3d_lowres'; known: 2d, big, 3d_fullres": ["990", "3d_lowres", "0"],
        "fold '3' does not exist": ["990", "2d", "3", "--config", "x.yaml"],
        "plans 'nnUNetPlans_v2' (-p) not found": ["990", "2d", "0", "-p", "nnUNetPlans_v2", "--config", "x"],
        "--config FILE.yaml is needed": ["990", "2d", "0"],
        "--c and --val exclude each other": ["990", "2d", "0", "--c", "--val"],
    }
    for message, args in refusals.items():
        done = subprocess.run([sys.executable, "-c", REFUSE, "train", *args, "-device", "cpu"], env=env,
                              capture_output=True, text=True)
        assert done.returncode == 1 and message in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr
        assert "torch imported: False" in done.stdout, args


def test_auxiliary_logits_match_the_output_size():
    cfg = tiny_config(decoder={"name": "upernet", "hidden_size": 16, "auxiliary_head": True}, neck="pyramid")
    model = ViTSegModel(cfg, in_channels=3, num_classes=3).train()
    out, aux = model(torch.rand(2, 3, 30, 45))
    assert aux.shape == out.shape == (2, 3, 30, 45) and model.auxiliary_loss_weight == 0.4
    model.eval()
    assert torch.is_tensor(model(torch.rand(1, 3, 30, 45)))  # the auxiliary logits only in training


DDP_CASES = {
    "lora_frozen_dinov3": {"config": {**tiny_config("dinov3", freeze_backbone=True),
                                      "lora": {"enabled": True, "r": 4}}, "steps": 3},
    "early_layers_aux_head": {"config": tiny_config(
        "dinov2", layers=[0, 1, 2], decoder={"name": "upernet", "hidden_size": 16, "auxiliary_head": True}),
        "steps": 3},
    "segformer_visionfm": {"config": tiny_config("visionfm", decoder="segformer"), "steps": 3},
}


@pytest.fixture(scope="module")
def ddp_ranks(tmp_path_factory):
    """Every case trained by two DDP ranks in one spawn (tests/ddp.py)."""
    return train_ddp(DDP_CASES, tmp_path_factory.mktemp("ddp"))


@pytest.mark.parametrize("case", list(DDP_CASES))
def test_ddp_two_cpu_processes(case, ddp_ranks):
    ranks = [rank[case] for rank in ddp_ranks]
    initial = dict(starting_model(DDP_CASES[case]).named_parameters())
    assert ranks[0].keys() == ranks[1].keys() and ranks[0]
    for name, value in ranks[0].items():
        torch.testing.assert_close(value, ranks[1][name], msg=f"{name} differs between ranks")
    # every trainable weight trained; 1-d parameters are left out: a bias feeding a training-mode BatchNorm
    # (SegFormer's projections) gets a gradient of rounding noise only, which can be exactly 0 on some CPUs
    weights = [n for n, v in ranks[0].items() if "lora_B" not in n and v.ndim > 1]
    moved = [n for n in weights if not torch.equal(ranks[0][n], initial[n].detach())]
    assert weights and moved == weights
