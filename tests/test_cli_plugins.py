"""`segframe plugins` and `segframe config`, run in-process through the real dispatcher."""

import json
from pathlib import Path

from segframe.cli import main

CONFIGS = Path(__file__).parents[1] / "configs"


def test_plugins_lists_decoders_and_backbones(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "upernet  (segframe-upernet 0.1.0)" in out
    assert "segformer  (segframe-segformer 0.1.0)" in out
    assert "pool_scales: list[int] = [1, 2, 3, 6]" in out
    assert "hidden_size: int = 256" in out
    assert "dinov2  (segframe 0.1.0)" in out and "sizes: small, base, large" in out
    assert "failed to load" not in out
    dpt = out[out.index("  dpt  (segframe-dpt 0.1.0)"):]
    assert dpt.splitlines()[1].strip() == "contract 2; inputs: prefix_tokens"


def test_plugins_json(capsys):
    assert main(["plugins", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    segformer = next(d for d in listing["decoders"] if d["name"] == "segformer")
    assert segformer["distribution"] == "segframe-segformer"
    dropout = next(p for p in segformer["params"] if p["name"] == "dropout")
    assert (dropout["type"], dropout["default"]) == ("float", 0.1) and dropout["description"]
    contracts = {d["name"]: (d["contract"], d["inputs"]) for d in listing["decoders"]}
    assert contracts["segformer"] == (1, []) and contracts["unetr"] == (2, ["image"])
    dinov2 = next(b for b in listing["backbones"] if b["name"] == "dinov2")
    assert "tiny" in dinov2["sizes"]
    assert listing["broken"] == []


def test_plugins_show(capsys):
    assert main(["plugins", "show", "upernet"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["properties"]["pool_scales"]["default"] == [1, 2, 3, 6]
    assert schema["additionalProperties"] is False
    assert main(["plugins", "show", "dinov2"]) == 0
    assert "registers" in json.loads(capsys.readouterr().out)["properties"]
    assert main(["plugins", "show", "uppernet"]) == 1
    err = capsys.readouterr().err
    assert "no decoder or backbone named 'uppernet'" in err and "upernet" in err and "dinov2" in err


def test_config_check_prints_resolved_config(capsys, tmp_path):
    path = tmp_path / "short.yaml"
    path.write_text("model:\n  backbone_size: tiny\n  decoder: upernet\n")
    assert main(["config", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "pool_scales:\n    - 1\n" in out and "num_epochs: 1000" in out and "r: 8" in out
    for name in ("upernet.yaml", "segformer.yaml"):
        assert main(["config", "check", str(CONFIGS / name)]) == 0


def test_config_check_error_is_a_message_not_a_traceback(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  decoder: {name: upernet, pool_scales: 6}\n")
    assert main(["config", "check", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("segframe config: error: invalid config") and "model.decoder.pool_scales" in err
    assert "Traceback" not in err


def test_config_schema(capsys):
    assert main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert set(schema["properties"]) == {"model", "lora", "train"}
