"""YAML config: every bad input gives a ConfigError naming the file, the key path and what was expected."""

from pathlib import Path

import pytest
from conftest import tiny_config

from segframe.config import config_schema, dump_config, load_config, validate_config
from segframe.errors import ConfigError

CONFIGS = Path(__file__).parents[1] / "configs"


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["upernet.yaml", "segformer.yaml"])
def test_shipped_configs_are_valid(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.model.decoder.name == name.removesuffix(".yaml")
    # the resolved dump is itself a valid config that resolves to the same thing
    assert validate_config(__import__("yaml").safe_load(dump_config(cfg))) == cfg


def test_decoder_as_name_or_mapping():
    by_name = validate_config({"model": {"backbone_size": "tiny", "decoder": "upernet"}})
    assert by_name.model.decoder.params == {
        "hidden_size": 512, "pool_scales": [1, 2, 3, 6], "auxiliary_head": False, "auxiliary_in_index": 2,
        "auxiliary_channels": 256, "auxiliary_loss_weight": 0.4,
    }
    by_map = validate_config(tiny_config(decoder={"name": "upernet", "hidden_size": 256}))
    assert by_map.decoder_params().hidden_size == 256
    assert by_map.decoder_params().pool_scales == [1, 2, 3, 6]


def test_wrong_type_names_file_key_and_type(tmp_path):
    path = _write(tmp_path, "model:\n  decoder: {name: upernet, pool_scales: six}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg and "model.decoder.pool_scales: Input should be a valid list" in msg

    path = _write(tmp_path, "model:\n  decoder: {name: upernet, pool_scales: [1, two]}\n")
    with pytest.raises(ConfigError, match=r"model\.decoder\.pool_scales\.1: Input should be a valid integer"):
        load_config(path)
    path = _write(tmp_path, "train:\n  initial_lr: fast\n")
    with pytest.raises(ConfigError, match=r"train\.initial_lr: Input should be a valid number.*'fast'"):
        load_config(path)


def test_unknown_key_names_file_and_path(tmp_path):
    path = _write(tmp_path, "model:\n  decoder: {name: segformer, hiden_size: 64}\n")
    with pytest.raises(ConfigError, match=r"run\.yaml[\s\S]*model\.decoder\.hiden_size: unknown key"):
        load_config(path)
    path = _write(tmp_path, "lora:\n  rank: 4\n")
    with pytest.raises(ConfigError, match=r"run\.yaml[\s\S]*lora\.rank: unknown key"):
        load_config(path)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = _write(tmp_path, "model:\n  decoder: upernet\n  backbone: [dinov2\ntrain: {}\n")
    with pytest.raises(ConfigError, match=r"run\.yaml is not valid YAML at line 4"):
        load_config(path)


def test_legacy_model_path_is_refused(tmp_path):
    path = _write(tmp_path, "model:\n  model_path: segframe.decoders.UperNet\n")
    with pytest.raises(ConfigError, match="model_path is no longer supported: name the head with `decoder:`"):
        load_config(path)


def test_wrong_backbone_size_lists_sizes():
    with pytest.raises(ConfigError, match=r"backbone_size: 'huge' is not a size of dinov2; choose one of"):
        validate_config(tiny_config(backbone_size="huge"))


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/run.yaml")


def test_schema_lists_plugins_and_their_keys():
    decoder = config_schema()["$defs"]["ModelConfig"]["properties"]["decoder"]["anyOf"]
    assert {"upernet", "segformer"} <= set(decoder[0]["enum"])
    upernet = next(s for s in decoder[1:] if s["properties"]["name"] == {"const": "upernet"})
    assert upernet["properties"]["hidden_size"]["default"] == 512
    assert upernet["additionalProperties"] is False
