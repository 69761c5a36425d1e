"""The benchmark scripts' helpers: BENCHMARKS.md sections and the U-Net plans cut to a smaller patch."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from chase_dice import unet_plans  # noqa: E402
from common import write_section  # noqa: E402


def test_write_section_replaces_only_its_own(tmp_path):
    md = tmp_path / "B.md"
    md.write_text("# intro kept\n")
    write_section("a", "table A1", md)
    write_section("b", "table B", md)
    write_section("a", "table A2", md)
    text = md.read_text()
    assert text.startswith("# intro kept\n") and "table A1" not in text
    assert text.index("table A2") < text.index("table B") and text.count("<!-- a:start -->") == 1


def test_unet_plans_cut_to_the_patch():
    kwargs = {"n_stages": 8, "features_per_stage": [32, 64, 128, 256, 512, 512, 512, 512],
              "kernel_sizes": [[3, 3]] * 8, "strides": [[1, 1]] + [[2, 2]] * 7, "n_conv_per_stage": [2] * 8,
              "n_conv_per_stage_decoder": [2] * 7}
    base = {"plans_name": "nnUNetPlans", "configurations": {"2d": {
        "patch_size": [1024, 1024], "batch_size": 2, "architecture": {"arch_kwargs": kwargs}}}}
    plans = unet_plans(base, [192, 192], 2, "cut")
    cut = plans["configurations"]["2d"]
    assert cut["patch_size"] == [192, 192] and plans["plans_name"] == "cut"
    arch = cut["architecture"]["arch_kwargs"]
    # 192 / 2**5 = 6 >= 4 pixels at the bottleneck; one more pooling would give 3
    assert arch["n_stages"] == 6 and len(arch["strides"]) == 6 and len(arch["n_conv_per_stage_decoder"]) == 5
    assert base["configurations"]["2d"]["architecture"]["arch_kwargs"]["n_stages"] == 8
