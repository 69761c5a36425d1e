"""`segframe config migrate`: the older nnU-Net fork's configs (its 24 ViT files and its Mask2Former
files) become segframe configs that pass `segframe config check`, every key has a report line, only
kept meaning is `kept`, and the report ends with a verdict; anything that is not a fork config is
refused in one line and nothing is written. The network parity itself is tests/test_fork_parity.py.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml
from fork_reference import FORK_CONFIGS, FORK_M2F_CONFIGS, require_fork

from segframe.cli import main
from segframe.config import check_config, load_config, missing_weights, validate_config
from segframe.errors import CheckpointError
from segframe.model import ViTSegModel
from segframe.upsample import ForkUpsampler, build_upsampler

UPERNET = {"model": {"model_path": "nnunetv2.model.model_upernet", "backbone": "dinov3",
                     "backbone_size": "large", "checkpoint_path": "",
                     "decoder": {"hidden_size": 512, "pool_scales": [1, 2, 3, 6]}},
           "lora": {"enabled": False, "r": 8, "lora_alpha": 16, "target_modules": ["qkv"],
                    "lora_dropout": 0.05},
           "train": {"initial_lr": 0.001, "weight_decay": 3.0e-5, "gradient_clip": 12.0, "num_epochs": 1000,
                     "num_iterations_per_epoch": 100, "num_val_iterations_per_epoch": 50}}


def _write(path, data) -> str:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return str(path)


def _leaf_keys(data: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        if isinstance(value, dict) and value and key != "decoder" or key == "decoder" and value:
            keys += _leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


@pytest.mark.parametrize("path", FORK_CONFIGS + FORK_M2F_CONFIGS, ids=lambda p: p.stem)
def test_every_fork_config_migrates_and_passes_check(path, tmp_path, capsys):
    require_fork()
    new = tmp_path / "new.yaml"
    assert main(["config", "migrate", str(path), "-o", str(new)]) == 0
    report = capsys.readouterr().out
    check_config(new)
    data = yaml.safe_load(path.read_text())
    for key in _leaf_keys(data):  # every key of the fork's file has its line: nothing changes silently
        assert f"  {key}: " in report, key
    verdict = re.search(r"^verdict: (.*)$", report, re.M).group(1)
    n = report.count(": DIFFERENCE: ")
    assert verdict == ("same network and training" if n == 0 else
                       f"{n} difference{'s' * (n > 1)} (the DIFFERENCE lines above)")
    if data["model"].get("backbone", "dinov3") in ("dinov2", "dinov3"):  # the fork took its weights from timm
        assert "  model.checkpoint_path: DIFFERENCE: empty: the fork started from " in report
        assert "model.pretrained: timm:vit_" in report


def test_upernet_report_and_config(tmp_path, capsys):
    old, new = _write(tmp_path / "upernet.yaml", UPERNET), tmp_path / "new.yaml"
    assert main(["config", "migrate", old, "-o", str(new)]) == 0
    report = capsys.readouterr().out
    assert "  model.checkpoint_path: DIFFERENCE: empty: the fork started from timm's pretrained " \
           "vit_large_patch16_dinov3.lvd1689m" in report
    assert report.rstrip().splitlines()[-1] == "verdict: 1 difference (the DIFFERENCE lines above)"
    cfg = load_config(new)
    m, train = cfg.model, cfg.train
    assert m.pretrained == "timm:vit_large_patch16_dinov3.lvd1689m"
    assert (m.checkpoint_path, m.freeze_backbone) == ("", True)
    assert (m.normalize, m.intermediate_norm, m.upsampler, m.upsampler_width) == ("none", True,
                                                                                  "fork_progressive", 256)
    assert (train.optimizer, train.warmup_epochs, train.precision, train.num_iterations_per_epoch) == (
        "sgd", 0, "nnunet", 100)
    assert missing_weights(cfg) is not None

    weights = tmp_path / "vit_large_patch16_dinov3.safetensors"
    weights.write_bytes(b"")
    assert main(["config", "migrate", old, "-o", str(new), "--overwrite", "--checkpoint", str(weights)]) == 0
    report = capsys.readouterr().out
    assert "verdict: same network and training" in report and "DIFFERENCE" not in report
    assert load_config(new).model.checkpoint_path == str(weights)


def test_unset_keys_take_the_forks_defaults(tmp_path, capsys):
    old = _write(tmp_path / "old.yaml", "model: {model_path: nnunetv2.model.model_unetr}\n"
                                        "train: {initial_lr: 0.002, gradient_clip: 1.0}\n")
    assert main(["config", "migrate", old, "-o", str(tmp_path / "new.yaml")]) == 0
    report = capsys.readouterr().out
    cfg = load_config(tmp_path / "new.yaml")
    assert (cfg.model.backbone.name, cfg.model.backbone_size, cfg.lora.enabled) == ("dinov3", "large", True)
    assert cfg.model.freeze_backbone is False  # LoRA on: peft freezes the backbone
    assert cfg.model.decoder.params["decoder_channels"] == [512, 256, 128, 64, 32]
    train = cfg.train
    assert (train.weight_decay, train.num_iterations_per_epoch, train.gradient_clip) == (3e-5, 100, 12)
    assert "lora.enabled: not set; the fork's default true written" in report
    assert "train.gradient_clip: 1.0 written as 12.0: the fork's trainer clipped at 12.0" in report


def test_visionfm_is_built_as_the_fork_built_it(tmp_path, capsys):
    fork = {**UPERNET, "model": {**UPERNET["model"], "backbone": "visionfm", "checkpoint_path": "vfm.pth"}}
    old = _write(tmp_path / "old.yaml", fork)
    assert main(["config", "migrate", old, "-o", str(tmp_path / "n.yaml")]) == 0
    report = capsys.readouterr().out
    cfg = load_config(tmp_path / "n.yaml")
    assert (cfg.model.backbone_size, cfg.model.backbone.params["pos_embed_resize"]) == ("base", "timm")
    assert "model.backbone_size: large written as base: the fork built visionfm's ViT-B" in report
    assert "verdict: same network and training" in report  # no timm weights: the file is the start


def test_mask2former_config(tmp_path, capsys):
    require_fork()
    path = next(p for p in FORK_M2F_CONFIGS if p.stem == "m2f_lora")
    assert main(["config", "migrate", str(path), "-o", str(tmp_path / "new.yaml")]) == 0
    report = capsys.readouterr().out
    cfg = load_config(tmp_path / "new.yaml")
    assert cfg.model.decoder.name == "mask2former"
    keys = ("hidden_size", "num_points", "mask_weight", "dice_weight", "class_weight", "no_object_weight")
    assert {k: cfg.model.decoder.params[k] for k in keys} == {
        "hidden_size": 2048, "num_points": 12544, "mask_weight": 5.0, "dice_weight": 5.0, "class_weight": 2.0,
        "no_object_weight": 0.1}
    assert cfg.lora.target_modules == ["qkv", "proj"] and cfg.lora.lora_dropout == 0.1
    assert (cfg.train.gradient_clip, cfg.train.num_epochs, cfg.train.initial_lr) == (10.0, 200, 1e-3)
    assert "model.decoder: DIFFERENCE: the fork ran DINOv3's own Mask2Former code" in report


@pytest.mark.parametrize("text, message", [
    (None, "old.yaml does not exist"),
    ("model:\n  model_path: [model_upernet\ntrain: {}\n", "old.yaml is not valid YAML at line 3"),
    ("- model_upernet\n", "expected a mapping with model, lora and train sections, got list"),
    ("", "old.yaml(: the file)? is empty"),
    ("version: '3'\nservices:\n  web: {image: nginx, ports: ['80:80']}\n",
     "neither a config of the older nnU-Net fork .* nor a valid segframe config"),
    ("model: {model_path: nnunetv2.model.model_fpn}\n", "is not one of the fork's model files"),
    ("model: {model_path: model_upernet, colour: red}\ntrain: {lr_scheduler: poly}\nextra: 1\n",
     "keys the fork's ViT config does not have: model.colour, train.lr_scheduler, extra"),
    ("model: {hidden_dim: 256, size: 3}\nm2f_train: {}\n",
     "keys the fork's Mask2Former config does not have: model.size"),
    ("model: {model_path: model_upernet, backbone: sam}\n", "model.backbone sam is not one the fork built"),
    ("model: {model_path: model_upernet, decoder: {pool_scales: six}}\n",
     "model.decoder.pool_scales: Input should be a valid list"),
])
def test_errors_are_one_line_and_write_nothing(text, message, tmp_path, capsys):
    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    if text is not None:
        old.write_text(text)
    assert main(["config", "migrate", str(old), "-o", str(new)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("segframe config: error: ") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert list(tmp_path.iterdir()) == ([old] if text is not None else [])  # no output, no temporary file


def test_a_segframe_config_is_copied_unchanged(tmp_path, capsys):
    text = "# mine\nmodel: {decoder: {name: upernet}}\n"
    old, new = _write(tmp_path / "mine.yaml", text), tmp_path / "new.yaml"
    assert main(["config", "migrate", old, "-o", str(new)]) == 0
    assert "already a valid segframe config: copied unchanged" in capsys.readouterr().out
    assert new.read_text() == text


def test_existing_output_needs_overwrite(tmp_path, capsys):
    old, new = _write(tmp_path / "old.yaml", UPERNET), tmp_path / "new.yaml"
    new.write_text("keep me\n")
    assert main(["config", "migrate", old, "-o", str(new)]) == 1
    assert "new.yaml already exists; pass --overwrite" in capsys.readouterr().err
    assert new.read_text() == "keep me\n"
    assert main(["config", "migrate", old, "-o", str(new), "--overwrite"]) == 0
    assert load_config(new).model.decoder.name == "upernet"


def test_comments_are_reported_with_their_lines(tmp_path, capsys):
    old = _write(tmp_path / "old.yaml", "# UperNet for nnU-Net\nmodel:\n  model_path: model_upernet  # head\n"
                                        "  backbone: retfound\n  checkpoint_path: 'run #1.pth'\n")
    assert main(["config", "migrate", old, "-o", str(tmp_path / "new.yaml")]) == 0
    report = capsys.readouterr().out
    assert "line 1: comment not carried over: # UperNet for nnU-Net" in report
    assert "line 3: comment not carried over: # head" in report
    assert "line 5" not in report  # a `#` inside a quoted value is not a comment
    assert load_config(tmp_path / "new.yaml").model.checkpoint_path == "run #1.pth"


def test_config_check_of_a_fork_config_names_migrate(tmp_path, capsys):
    assert main(["config", "check", _write(tmp_path / "old.yaml", UPERNET)]) == 1
    err = capsys.readouterr().err
    assert "model.model_path is no longer supported" in err and "`segframe config migrate" in err


# ---------------------------------------------------------------- no silent random init

NAMED = {"model": {"backbone": "dinov3", "backbone_size": "tiny",
                   "pretrained": "timm:vit_small_patch16_dinov3.lvd1689m",
                   "decoder": {"name": "upernet", "hidden_size": 16}}}


def test_named_weights_without_a_file_refuse_to_load_but_build(tmp_path, capsys):
    cfg = validate_config(NAMED)
    model = ViTSegModel(cfg, in_channels=3, num_classes=2)  # building (and config check) still work
    with pytest.raises(CheckpointError, match="model.pretrained says the backbone starts from timm:vit_"):
        model.load_pretrained()
    assert main(["config", "check", _write(tmp_path / "c.yaml", NAMED)]) == 0
    assert "`segframe train` will refuse" in capsys.readouterr().err
    explicit = validate_config({"model": {**NAMED["model"], "pretrained": "none"}})
    assert missing_weights(explicit) is None
    assert ViTSegModel(explicit, in_channels=3, num_classes=2).load_pretrained() is None  # random init
    with pytest.raises(Exception, match="pretrained"):
        validate_config({"model": {**NAMED["model"], "pretrained": "vit_small_patch16_dinov3"}})


REFUSE = """
import sys
from segframe.cli import main
from segframe.nnunet import lifeline
lifeline.supported = lambda: False  # the checks run in this process
sys.exit(main(sys.argv[1:]))
"""


def test_train_refuses_to_start_without_the_named_weights(tmp_path):
    env = dict(os.environ)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[var] = str(tmp_path / var)
        (tmp_path / var).mkdir()
    dataset = tmp_path / "nnUNet_preprocessed" / "Dataset990_X"
    dataset.mkdir()
    arch = {"network_class_name": "x", "arch_kwargs": {}, "_kw_requires_import": []}
    (dataset / "nnUNetPlans.json").write_text(json.dumps({
        "plans_name": "nnUNetPlans", "dataset_name": "Dataset990_X", "configurations": {
            "2d": {"patch_size": [64, 96], "batch_size": 12, "data_identifier": "nnUNetPlans_2d",
                   "architecture": arch}}}))
    config = _write(tmp_path / "migrated.yaml", NAMED)
    done = subprocess.run([sys.executable, "-c", REFUSE, "train", "990", "2d", "0", "--config", config,
                           "-device", "cpu"], env=env, capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "model.checkpoint_path is empty, which would train from random weights" in done.stderr
    assert not list(dataset.glob("nnUNetPlans_segframe*"))  # refused before any plans were written


# ---------------------------------------------------------------- the fork's upsampler

def test_fork_upsampler_is_the_forks():
    """The same weights (GroupNorm up to 32 groups, convs without bias) and the same output as the fork's
    ProgressiveUpsampler with UperNet's settings, on a size that is no multiple of the input's."""
    require_fork()
    from fork_reference import fork_module

    torch.manual_seed(0)
    fork = fork_module("backbone").ProgressiveUpsampler(in_channels=3, num_classes=3, num_stages=2,
                                                        hidden_dim=256).eval()
    ours = build_upsampler("fork_progressive", 3, 16, width=256).eval()
    assert isinstance(ours, ForkUpsampler)
    theirs, mine = fork.state_dict(), ours.state_dict()
    assert [v.shape for v in theirs.values()] == [v.shape for v in mine.values()]
    # by hand: (3*256*9 + 256*256*9 + 2*2*256) + (256*128*9 + 128*128*9 + 2*2*128) + (128*3 + 3)
    assert sum(p.numel() for p in ours.parameters()) == 597_760 + 442_880 + 387
    ours.load_state_dict(dict(zip(mine, theirs.values(), strict=True)))
    x = torch.randn(1, 3, 5, 7)
    with torch.no_grad():
        assert (ours(x, (83, 115)) - fork(x, (83, 115))).abs().max() < 1e-5
