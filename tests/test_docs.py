"""The README's examples run as written: the decoder plugin and the configs it points to."""

import re
import types
from pathlib import Path

import torch
from conftest import tiny_config

from segframe.config import load_config
from segframe.model import ViTSegModel

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_decoder_plugin_example(registry):
    section = README[README.index("## Write a decoder plugin"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    module = types.ModuleType("segframe_mydecoder")
    exec(compile(code, "README.md", "exec"), module.__dict__)
    registry.register(module, "mydecoder")
    model = ViTSegModel(tiny_config(decoder={"name": "mydecoder", "dropout": 0.2}), num_classes=3)
    assert model(torch.rand(1, 3, 40, 50)).shape == (1, 3, 40, 50)


def test_readme_configs_are_valid():
    for name in re.findall(r"configs/(\w+\.yaml)", README):
        load_config(ROOT / "configs" / name)
