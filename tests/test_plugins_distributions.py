"""Plugins installed for real: throwaway distributions (a dist-info with entry points on sys.path)."""

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from segframe.cli import main
from segframe.config import load_config, validate_config
from segframe.errors import ConfigError, PluginError
from segframe.model import ViTSegModel
from segframe.plugins import get_registry, reset_registry

THIRD_PARTY = '''
"""A third-party decoder: one 1x1 conv on the first feature level."""
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from segframe import DecoderSpec, hookimpl

class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bias: bool = Field(True, description="conv bias")

class Head(nn.Module):
    def __init__(self, params, in_channels, in_strides, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(in_channels[0], num_classes, 1, bias=params.bias)
        self.output_stride = in_strides[0]

    def forward(self, features):
        return self.conv(features[0])

@hookimpl
def segframe_decoders():
    return [DecoderSpec(name="{name}", description="one 1x1 conv", params=Params,
                        build=lambda p, c, s, k: Head(p, c, s, k))]
'''


@pytest.fixture
def install(tmp_path, monkeypatch):
    """install(dist, version, {entry_point: module}, {module: source}) puts a distribution on sys.path."""
    modules: list[str] = []

    def _install(dist: str, version: str, entry_points: dict[str, str], sources: dict[str, str]) -> None:
        root = tmp_path / dist
        root.mkdir()
        for module, source in sources.items():
            (root / f"{module}.py").write_text(textwrap.dedent(source))
            modules.append(module)
        info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
        (info / "entry_points.txt").write_text(f"[segframe]\n{lines}")
        monkeypatch.syspath_prepend(str(root))
        reset_registry()

    yield _install
    for module in modules:
        sys.modules.pop(module, None)
    reset_registry()


def test_third_party_decoder_builds_a_model(install, tmp_path, capsys):
    install("segframe-onebyone", "0.3", {"onebyone": "onebyone_plugin"},
            {"onebyone_plugin": THIRD_PARTY.replace("{name}", "onebyone")})
    reg = get_registry().decoder("onebyone")
    assert (reg.distribution, reg.version) == ("segframe-onebyone", "0.3")

    cfg = validate_config(tiny_config(decoder={"name": "onebyone", "bias": False}))
    model = ViTSegModel(cfg, num_classes=3).eval()
    assert model.decoder.conv.bias is None
    with torch.no_grad():
        assert model(torch.rand(2, 3, 30, 44)).shape == (2, 3, 30, 44)

    path = tmp_path / "third.yaml"
    path.write_text("model:\n  backbone_size: tiny\n  decoder: {name: onebyone, bais: false}\n")
    with pytest.raises(ConfigError, match=r"third\.yaml[\s\S]*model\.decoder\.bais: unknown key"):
        load_config(path)

    assert main(["plugins", "--json"]) == 0
    listed = {d["name"]: d for d in json.loads(capsys.readouterr().out)["decoders"]}
    assert listed["onebyone"]["distribution"] == "segframe-onebyone"
    assert {"upernet", "segformer"} <= set(listed)


def test_broken_entry_point_is_listed_and_others_still_work(install, capsys):
    install("segframe-broken", "1.2", {"brokenhead": "brokenhead_plugin"},
            {"brokenhead_plugin": "raise ImportError('needs libmissing')\n"})
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "upernet" in out and "segformer" in out and "dinov2" in out
    broken = out.split("plugins that failed to load:")[1]
    assert "brokenhead" in broken and "segframe-broken 1.2" in broken and "needs libmissing" in broken

    assert main(["plugins", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["broken"][0]["plugin"] == "brokenhead"

    with pytest.raises(PluginError, match="segframe-broken 1.2.*needs libmissing"):
        get_registry().decoder("brokenhead")
    with pytest.raises(PluginError, match="segframe-broken"):
        validate_config(tiny_config(decoder="brokenhead"))
    # an unrelated unknown name still lists the known decoders
    with pytest.raises(PluginError, match="known decoders: .*segformer.*upernet"):
        get_registry().decoder("nosuch")


def test_entry_point_without_hooks_is_reported(install, capsys):
    install("segframe-empty", "0.1", {"emptyhead": "emptyhead_plugin"}, {"emptyhead_plugin": "X = 1\n"})
    assert main(["plugins"]) == 0
    assert "emptyhead: segframe-empty 0.1: entry point 'emptyhead_plugin' has no @hookimpl" in (
        capsys.readouterr().out
    )


def test_two_distributions_with_the_same_decoder_name(install, capsys):
    # same entry-point name and same decoder name as the real segframe-upernet
    install("fake-upernet", "9.0", {"upernet": "fake_upernet_plugin"},
            {"fake_upernet_plugin": THIRD_PARTY.replace("{name}", "upernet")})
    with pytest.raises(PluginError, match="'upernet' is registered twice") as info:
        get_registry().decoders()
    assert "segframe-upernet" in str(info.value) and "fake-upernet" in str(info.value)
    assert main(["plugins"]) == 1
    assert "fake-upernet" in capsys.readouterr().err


def test_registering_in_tests_needs_no_install(registry):
    import types

    plugin = types.ModuleType("inline_plugin")
    exec(THIRD_PARTY.replace("{name}", "inline"), plugin.__dict__)
    registry.register(plugin, "inline")
    assert "inline" in registry.decoders()
    registry.unregister("inline")
    assert "inline" not in registry.decoders()
    with pytest.raises(PluginError, match="cannot register plugin 'upernet'"):
        registry.register(plugin, "upernet")


def test_unknown_backbone_lists_known_names(registry):
    with pytest.raises(ConfigError, match=r"model\.backbone: unknown backbone 'dinov9'; known") as info:
        validate_config(tiny_config(backbone="dinov9"))
    assert "dinov2" in str(info.value).split("known backbones:")[1]
    known = r"known decoders: .*segformer.*upernet"
    with pytest.raises(ConfigError, match=r"model\.decoder: unknown decoder 'upernett'; " + known):
        validate_config(tiny_config(decoder="upernett"))


def test_docs_example_is_a_working_plugin(install):
    """docs/plugins.md's example plugin, installed as its own distribution."""
    doc = (Path(__file__).parents[1] / "docs" / "plugins.md").read_text()
    source = doc.split("```python\n")[1].split("```")[0]
    install("segframe-mydecoder", "0.1.0", {"mydecoder": "segframe_mydecoder"},
            {"segframe_mydecoder": source})
    model = ViTSegModel(validate_config(tiny_config(decoder="mydecoder")), num_classes=2).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 28, 28)).shape == (1, 2, 28, 28)


def test_v1_and_v2_distributions_side_by_side(install):
    """A version-1 distribution written from the README example keeps working unchanged next to
    docs/plugins.md's version-2 example, each installed as its own distribution."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    v1 = readme[readme.index("## Write a decoder plugin"):].split("```python\n")[1].split("```")[0]
    doc = (Path(__file__).parents[1] / "docs" / "plugins.md").read_text()
    v2 = doc[doc.index("## Contract version 2"):].split("```python\n")[1].split("```")[0]
    install("segframe-mydecoder", "0.1.0", {"mydecoder": "segframe_mydecoder"}, {"segframe_mydecoder": v1})
    install("segframe-clsimage", "0.2.0", {"clsimage": "segframe_clsimage"}, {"segframe_clsimage": v2})
    registry = get_registry()
    assert registry.decoder("mydecoder").spec.contract == 1
    assert registry.decoder("clsimage").spec.contract == 2
    assert registry.decoder("clsimage").distribution == "segframe-clsimage"
    for decoder in ({"name": "mydecoder", "dropout": 0.2}, {"name": "clsimage", "image_channels": 4}):
        for backbone in ("dinov2", "dinov3"):
            model = ViTSegModel(validate_config(tiny_config(backbone, decoder)), num_classes=3).train()
            out = model(torch.rand(2, 3, 30, 45))
            assert out.shape == (2, 3, 30, 45)
            out.mean().backward()
            assert all(p.grad is not None for p in model.decoder.parameters())
    assert model.decoder.image.in_channels == 3 and model.decoder.image.out_channels == 4
