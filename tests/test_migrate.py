"""`segframe config migrate`: configs of the older nnU-Net fork (one model file per head, named by
`model.model_path`) become segframe configs that pass `segframe config check`; every old key is
reported; errors are one message and write nothing."""

import re

import pytest
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field

from segframe import DecoderSpec, hookimpl
from segframe.cli import main
from segframe.config import load_config
from segframe.migrate import head_of

LORA = {"enabled": True, "r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["qkv", "proj"]}
TRAIN = {"initial_lr": 0.001, "weight_decay": 3.0e-5, "gradient_clip": 12.0, "num_epochs": 500,
         "num_iterations_per_epoch": 250, "num_val_iterations_per_epoch": 50}

# head -> (the fork's model_path, its `decoder:` section, what segframe's decoder must resolve to,
# the fork decoder keys segframe's plugin has no parameter for). Shapes as in the fork's configs/.
HEADS = {
    "upernet": ("nnunetv2.model.model_upernet", {"hidden_size": 256, "pool_scales": [1, 2, 3]},
                {"hidden_size": 256, "pool_scales": [1, 2, 3]}, []),
    "segformer": ("nnunetv2.model.model_segformer_1", {"hidden_size": 128}, {"hidden_size": 128}, []),
    "dpt": ("nnunetv2.model.model_dpt", {"fusion_hidden_size": 128, "readout_type": "add"},
            {"hidden_size": 128, "readout": "add"}, []),
    "unetr": ("nnunetv2.model.model_unetr",
              {"decoder_channels": [512, 256, 128, 64, 32], "negative_slope": 0.01,
               "upsample_mode": "deconv"},
              {}, ["decoder_channels", "negative_slope", "upsample_mode"]),
    "primus": ("nnunetv2.model.primus", {}, {}, []),
    "mask2former": ("nnunetv2.model.model_mask2former", {"num_queries": 50, "hidden_size": 128},
                    {"num_queries": 50, "hidden_size": 128}, []),
}


def _fork_config(model_path: str, decoder: dict) -> dict:
    return {"model": {"model_path": model_path, "backbone": "dinov3", "backbone_size": "large",
                      "checkpoint_path": "", "decoder": decoder},
            "lora": dict(LORA), "train": dict(TRAIN)}


def _write(path, data) -> str:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return str(path)


def _leaf_keys(data: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            keys += _leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


@pytest.mark.parametrize("head", list(HEADS))
def test_each_fork_head_migrates_to_a_config_that_passes_check(head, tmp_path, capsys):
    module, decoder, expected, unmapped = HEADS[head]
    fork = _fork_config(module, decoder)
    old, new = _write(tmp_path / "old.yaml", fork), tmp_path / "new.yaml"
    assert main(["config", "migrate", old, "-o", str(new)]) == 0
    report = capsys.readouterr().out
    assert main(["config", "check", str(new)]) == 0
    capsys.readouterr()

    cfg = load_config(new)
    assert cfg.model.decoder.name == head
    assert {k: cfg.model.decoder.params[k] for k in expected} == expected
    assert (cfg.model.backbone.name, cfg.model.backbone_size) == ("dinov3", "large")
    assert cfg.lora.model_dump() == LORA
    assert {k: getattr(cfg.train, k) for k in TRAIN} == TRAIN
    # every key of the old file has its line in the report: nothing is dropped silently
    for key in _leaf_keys(fork):
        assert f"  {key}: " in report, key
    assert f'model.model_path: "{module}" -> model.decoder.name: {head}' in report
    for key in unmapped:
        assert f"model.decoder.{key}: not a parameter of the {head} decoder" in report
        assert key not in new.read_text()
    assert (f"{len(unmapped)} key(s) left out" if unmapped else "no key left out") in report


@pytest.mark.parametrize("module, head", [
    ("nnunetv2.model.model_upernet", "upernet"), ("model_upernet", "upernet"),
    ("nnunetv2/model/model_upernet.py", "upernet"), ("model_segformer", "segformer"),
    ("nnunetv2.model.model_segformer_1", "segformer"), ("nnunetv2.model.model_dpt", "dpt"),
    ("model_unetr.py", "unetr"), ("nnunetv2.model.primus", "primus"),
    ("nnunetv2.model.model_primus", "primus"),
    ("nnunetv2.model.model_mask2former", "mask2former"), ("m2f", "mask2former"),
    ("nnunetv2.model.model", None), ("nnunetv2.model.model_fpn", None),
])
def test_module_names_of_the_fork(module, head):
    assert head_of(module) == head


def test_decoder_keys_come_from_the_plugin_registry(registry, tmp_path, capsys):
    """A head installed as a plugin is migrated by its own `params`, not by a list in segframe."""

    class MineParams(BaseModel):
        model_config = ConfigDict(extra="forbid")
        width: int = Field(8, description="channels")

    class Mine:
        @hookimpl
        def segframe_decoders(self):
            return [DecoderSpec(name="mine", description="test head", params=MineParams,
                                build=lambda p, c, s, k: torch.nn.Conv2d(c[0], k, 1))]

    registry.register(Mine(), "mine")
    old = _write(tmp_path / "old.yaml", {"model": {"model_path": "nnunetv2.model.model_mine",
                                                   "decoder": {"width": 3, "depth": 2}}})
    assert main(["config", "migrate", old, "-o", str(tmp_path / "new.yaml")]) == 0
    report = capsys.readouterr().out
    assert "model.decoder.depth: not a parameter of the mine decoder (its parameters: width;" in report
    assert load_config(tmp_path / "new.yaml").model.decoder.params == {"width": 3}


def test_the_forks_defaults_are_written_where_segframe_differs(tmp_path, capsys):
    # no model_path: the fork's default model file was model_segformer_1; no lora section: LoRA on;
    # no backbone: dinov3 large; no train section: nnU-Net's trainer values (reported only)
    old = _write(tmp_path / "old.yaml", "model:\n  decoder: {hidden_size: 64}\nextra: 1\n")
    assert main(["config", "migrate", old, "-o", str(tmp_path / "new.yaml")]) == 0
    report = capsys.readouterr().out
    cfg = load_config(tmp_path / "new.yaml")
    assert (cfg.model.decoder.name, cfg.model.decoder.params["hidden_size"]) == ("segformer", 64)
    assert (cfg.model.backbone.name, cfg.model.backbone_size, cfg.lora.enabled) == ("dinov3", "large", True)
    assert "model.model_path: not set; the fork's default" in report
    assert "lora.enabled: not set; written as the fork's default true (segframe's default is false)" in report
    assert "train.initial_lr: not set; the fork used nnU-Net's 0.01" in report
    assert "extra: not a section of a segframe config" in report and "1 key(s) left out" in report


def test_m2f_type_and_segframe_style_decoder(tmp_path, capsys):
    old = _write(tmp_path / "m2f.yaml", "model: {type: m2f, hidden_dim: 2048, backbone_size: base}\n")
    assert main(["config", "migrate", old, "-o", str(tmp_path / "a.yaml")]) == 0
    assert "model.hidden_dim: not a segframe model key" in capsys.readouterr().out
    assert load_config(tmp_path / "a.yaml").model.decoder.name == "mask2former"
    old = _write(tmp_path / "seg.yaml", "model: {decoder: {name: dpt, hidden_size: 64}}\n")
    assert main(["config", "migrate", old, "-o", str(tmp_path / "b.yaml")]) == 0
    assert load_config(tmp_path / "b.yaml").model.decoder.params["hidden_size"] == 64


def test_comments_are_reported_with_their_lines(tmp_path, capsys):
    old = _write(tmp_path / "old.yaml", "# UperNet for nnU-Net\nmodel:\n  model_path: model_upernet  # head\n"
                                        "  checkpoint_path: 'run #1.pth'\n")
    assert main(["config", "migrate", old, "-o", str(tmp_path / "new.yaml")]) == 0
    report = capsys.readouterr().out
    assert "line 1: comment not carried over" in report and "# UperNet for nnU-Net" in report
    assert "line 3: comment not carried over" in report and "# head" in report
    assert "line 4" not in report  # a `#` inside a quoted value is not a comment
    assert load_config(tmp_path / "new.yaml").model.checkpoint_path == "run #1.pth"


def test_existing_output_needs_overwrite(tmp_path, capsys):
    old = _write(tmp_path / "old.yaml", _fork_config("model_upernet", {}))
    new = tmp_path / "new.yaml"
    new.write_text("keep me\n")
    assert main(["config", "migrate", old, "-o", str(new)]) == 1
    assert "new.yaml already exists; pass --overwrite" in capsys.readouterr().err
    assert new.read_text() == "keep me\n"
    assert main(["config", "migrate", old, "-o", str(new), "--overwrite"]) == 0
    assert load_config(new).model.decoder.name == "upernet"


@pytest.mark.parametrize("text, message", [
    (None, "old.yaml does not exist"),
    ("model:\n  model_path: [model_upernet\ntrain: {}\n", "old.yaml is not valid YAML at line 3"),
    ("- model_upernet\n", "expected a mapping with model, lora and train sections, got list"),
    ("", "old.yaml: the file is empty, there is nothing to migrate"),
    ("model: {model_path: nnunetv2.model.model_fpn}\n", r"names no installed decoder \(installed: dpt,"),
    ("model: {model_path: model_upernet, decoder: {name: dpt}}\n",
     "is the upernet head but model.decoder.name"),
    ("model: {model_path: model_upernet, backbone_size: huge}\n",
     "not valid, so {new} was not written:[\\s\\S]*model.backbone_size: 'huge' is not a size of dinov3"),
    ("model: {model_path: model_upernet, decoder: {pool_scales: six}}\n",
     "model.decoder.pool_scales: Input should be a valid list"),
])
def test_errors_are_one_message_and_write_nothing(text, message, tmp_path, capsys):
    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    if text is not None:
        old.write_text(text)
    assert main(["config", "migrate", str(old), "-o", str(new)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("segframe config: error: ") and "Traceback" not in err
    assert re.search(message.format(new=re.escape(str(new))), err), err
    assert list(tmp_path.iterdir()) == ([old] if text is not None else [])  # no output, no temporary file


def test_config_check_of_a_fork_config_names_migrate(tmp_path, capsys):
    old = _write(tmp_path / "old.yaml", _fork_config("nnunetv2.model.model_upernet", {"hidden_size": 512}))
    assert main(["config", "check", old]) == 1
    err = capsys.readouterr().err
    assert "model.model_path is no longer supported" in err and "`segframe config migrate" in err
