"""The benchmark scripts' helpers: BENCHMARKS.md sections, the U-Net plans cut to a smaller patch, and the
CHASE_DB1/DRIVE table of seeded runs (mean ± sd, the dataset named from the converted data)."""

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import ROOT, write_section  # noqa: E402
from vessels import dataset_info, mean_sd, row_config, section_name, split_predict, table, unet_plans  # noqa: E402

from segframe.backbones import default_layers  # noqa: E402
from segframe.config import load_config  # noqa: E402
from segframe.errors import ConfigError  # noqa: E402


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


def _record(row, seed, dice, train_s, label=None, val_dice=None):
    metrics = {"dice": dice, "cldice": 0.5, "thin_sensitivity": 0.25, "iou": 0.4, "sensitivity": 0.6,
               "specificity": 0.9, "accuracy": 0.95}
    return {"row": row, "seed": seed, "label": label or row.upper(), "params": 26_200_000, "train_s": train_s,
            "predict_s": 100.0, "val_dice": val_dice, "metrics": metrics}


def test_mean_sd_against_a_hand_computation():
    # mean 0.72; deviations -0.02, 0, 0.02 -> sample variance (0.0004 + 0 + 0.0004) / 2 = 0.0004, sd 0.02
    assert mean_sd([0.70, 0.72, 0.74], 4) == "0.7200 ± 0.0200"
    # mean 650; sample sd of (640, 660) = sqrt((100 + 100) / 1) = 14.14
    assert mean_sd([640.0, 660.0], 0) == "650 ± 14"
    assert mean_sd([0.7315], 4) == "0.7315"  # one run: no sd


def test_table_header_and_rows_from_records():
    records = [_record("unet", 0, 0.70, 640.0, "U-Net", 0.8), _record("upernet", 0, 0.60, 700.0),
               _record("unet", 1, 0.74, 660.0, "U-Net", 0.9), _record("unet", 2, 0.72, 650.0, "U-Net")]
    info = {"name": "DRIVE", "description": "DRIVE retinal vessels; labels: first observer", "test": 20,
            "val": 4}
    lines = table(records, argparse.Namespace(epochs=12, iterations=50), "DRIVE from /data", info)
    text = "\n".join(lines)
    assert lines[0].startswith("## Vessel Dice on DRIVE after the same budget (12 epochs x 50 iterations")
    assert "mean ± sd over 1-3 seeded runs per row" in lines[0]
    assert "CHASE" not in text and "Test split (20 images; DRIVE retinal vessels" in text
    assert "fold 0 (4 images, mirrored)" in text
    header = next(line for line in lines if line.startswith("| model"))
    assert header.split(" | ")[1] == "runs" and header.split(" | ")[5] == "val Dice"
    rows = [line for line in lines if line.startswith("| U-Net") or line.startswith("| UPERNET")]
    # first-seen order; the U-Net's three runs: Dice as above, train time 650 ± 10 (sd of 640, 660, 650);
    # val Dice over the two runs that have one (a record of an older run has none): 0.85 ± sqrt(0.005)
    assert rows[0] == ("| U-Net | 3 | 26.2 | 650 ± 10 | 100 ± 0 | 0.8500 ± 0.0707 | 0.7200 ± 0.0200 "
                       "| 0.5000 ± 0.0000 "
                       "| 0.2500 ± 0.0000 | 0.4000 ± 0.0000 | 0.6000 ± 0.0000 | 0.9000 ± 0.0000 "
                       "| 0.9500 ± 0.0000 |")
    # times with their ratio to the U-Net's mean: 700 / 650 = 1.077, 100 / 100
    assert rows[1].startswith("| UPERNET | 1 | 26.2 | 700 (1.08x) | 100 (1.00x) |  | 0.6000 | 0.5000 |")
    assert section_name(info) == "drive-dice-cpu"
    one = table(records[1:2], argparse.Namespace(epochs=12, iterations=50), "DRIVE from /data", info)
    assert one[0].endswith("random init, CPU; one seeded run per row)")
    assert "| UPERNET | 1 | 26.2 | 700 | 100 |" in "\n".join(one)  # no U-Net row: no ratio
    assert section_name({**info, "name": "CHASE_DB1"}) == "chase-dice-cpu"


def test_resenc_plans_cut_their_residual_blocks_too():
    # nnUNetPlannerResEncM's 2d architecture: residual blocks per encoder stage, convs per decoder stage
    kwargs = {"n_stages": 7, "features_per_stage": [32, 64, 128, 256, 512, 512, 512],
              "kernel_sizes": [[3, 3]] * 7, "strides": [[1, 1]] + [[2, 2]] * 6,
              "n_blocks_per_stage": [1, 3, 4, 6, 6, 6, 6], "n_conv_per_stage_decoder": [1] * 6,
              "conv_bias": True, "norm_op_kwargs": {"eps": 1e-05}}
    base = {"plans_name": "nnUNetResEncUNetMPlans", "configurations": {"2d": {
        "patch_size": [1536, 1536], "batch_size": 12, "architecture": {"arch_kwargs": kwargs}}}}
    arch = unet_plans(base, [192, 192], 2, "cut")["configurations"]["2d"]["architecture"]["arch_kwargs"]
    assert arch["n_stages"] == 6 and arch["n_blocks_per_stage"] == [1, 3, 4, 6, 6, 6]
    assert arch["n_conv_per_stage_decoder"] == [1] * 5 and arch["features_per_stage"][-1] == 512
    assert arch["conv_bias"] is True and arch["norm_op_kwargs"] == {"eps": 1e-05}


def _av_record(row, seed, av_dice, accuracy, train_s):
    metrics = {"artery_dice": 0.6, "vein_dice": 0.7, "crossing_dice": 0.1, "mean_dice": 0.4667,
               "av_accuracy": accuracy, "av_artery_sensitivity": 0.8, "av_vein_sensitivity": 0.9,
               "av_artery_dice": 0.62, "av_vein_dice": 0.72, "av_dice": av_dice, "vessel_dice": 0.75,
               "vessel_cldice": 0.7}
    return {"row": row, "seed": seed, "label": row, "params": 1_000_000, "train_s": train_s,
            "predict_s": 50.0, "val_dice": None, "metrics": metrics}


def test_artery_vein_table_names_the_dataset_and_its_columns():
    records = [_av_record("unet", 0, 0.60, 0.80, 100.0), _av_record("unet", 1, 0.64, 0.84, 120.0),
               _av_record("mask2former", 0, 0.70, 0.90, 55.0)]
    info = {"name": "LES-AV", "description": "LES-AV retinal arteries and veins", "test": 11, "val": 3}
    lines = table(records, argparse.Namespace(epochs=12, iterations=50), "LES-AV from /data", info)
    assert lines[0].startswith("## Arteries and veins on LES-AV after the same budget (12 epochs x 50")
    header = next(line for line in lines if line.startswith("| model")).split(" | ")
    assert header[6:] == ["A/V Dice", "A/V acc.", "artery sens.", "vein sens.", "artery Dice", "vein Dice",
                          "crossing Dice", "vessel Dice", "vessel clDice |"]
    rows = [line for line in lines if line.startswith("| unet") or line.startswith("| mask2former")]
    # the U-Net: A/V Dice mean 0.62, sd sqrt(((-0.02)^2 + 0.02^2) / 1) = 0.0283; train 110 ± 14
    assert rows[0].startswith("| unet | 2 | 1.0 | 110 ± 14 | 50 ± 0 |  | 0.6200 ± 0.0283 | 0.8200 ± 0.0283 |")
    # Mask2Former's train time over the U-Net's mean: 55 / 110 = 0.50x
    assert rows[1].startswith("| mask2former | 1 | 1.0 | 55 (0.50x) | 50 (1.00x) |  | 0.7000 | 0.9000 |")
    assert "A/V Dice: the mean of artery and vein Dice" in "\n".join(lines)


def test_dataset_info_reads_the_converted_data(tmp_path):
    dataset, pre = tmp_path / "Dataset501_DRIVE", tmp_path / "pre"
    dataset.mkdir(), pre.mkdir()
    (dataset / "dataset.json").write_text(json.dumps({"name": "DRIVE", "numTest": 20, "description": "d"}))
    assert dataset_info(dataset, pre) == {"name": "DRIVE", "description": "d", "test": 20, "val": None}
    (pre / "splits_final.json").write_text(json.dumps([{"train": ["a", "b", "c"], "val": ["d", "e"]}]))
    (dataset / "dataset.json").write_text(json.dumps({"name": "CHASEDB1", "numTest": 8, "description": "c"}))
    assert dataset_info(dataset, pre) == {"name": "CHASE_DB1", "description": "c", "test": 8, "val": 2}


def test_srec_row_turns_on_skeleton_recall():
    demo = load_config(ROOT / "configs" / "demo.yaml")
    label, cfg, step, precision = row_config("upernet+detail+srec", demo)
    assert label.endswith("+ detail + Skeleton Recall") and cfg.train.loss.skeleton_recall == 1.0
    assert step == 0.5 and precision == "fp32"
    assert row_config("upernet+detail", demo)[1].train.loss.skeleton_recall == 0.0
    label, cfg, *_ = row_config("upernet+detail+srec0.4", demo)
    assert label.endswith("+ detail + Skeleton Recall 0.4") and cfg.train.loss.skeleton_recall == 0.4
    for bad in ("upernet+srec0", "upernet+srec-1", "upernet+srecx"):
        with pytest.raises(ConfigError, match=r"\+srecW with a weight W > 0"):
            row_config(bad, demo)


def test_detail_width_rows_set_the_stride_1_width_or_all_four():
    demo = load_config(ROOT / "configs" / "demo.yaml")
    label, cfg, *_ = row_config("upernet+detail16+srec0.4", demo)
    assert label.endswith("+ detail 16-32-64-64 + Skeleton Recall 0.4")
    assert cfg.model.detail.enabled and cfg.model.detail.channels == [16, 32, 64, 64]
    label, cfg, *_ = row_config("upernet+detail32-16-32-32", demo)
    assert label.endswith("+ detail 32-16-32-32") and cfg.model.detail.channels == [32, 16, 32, 32]
    label, cfg, *_ = row_config("upernet+detail", demo)
    assert label.endswith("+ detail") and cfg.model.detail.channels == [32, 32, 64, 64]
    assert not row_config("upernet", demo)[1].model.detail.enabled
    label, cfg, *_ = row_config("upernet+units1-2-2-2+detail16", demo)  # either order
    assert label.endswith("+ detail 16-32-64-64 (units 1-2-2-2)") and cfg.model.detail.units == [1, 2, 2, 2]
    assert row_config("upernet+detail", demo)[1].model.detail.units == [2, 2, 2, 2]
    with pytest.raises(ConfigError, match=r"\+unitsA-B-C-D sets the detail path's conv units; add \+detail"):
        row_config("upernet+units1-2-2-2", demo)
    for bad in ("upernet+detail0", "upernet+detailx", "upernet+detail-8", "upernet+detail32-16",
                "upernet+detail32-16-0-32", "upernet+detail32-16-32-32-8", "upernet+detail+units1",
                "upernet+detail+units1-0-2-2"):
        with pytest.raises(ConfigError, match=r"unknown option .*\+detail\[N\|A-B-C-D\], \+unitsA-B-C-D"):
            row_config(bad, demo)


def test_step_and_bf16_rows_predict_the_same_training_another_way():
    demo = load_config(ROOT / "configs" / "demo.yaml")
    label, cfg, step, precision = row_config("segformer+detail+step0.75+srec", demo)
    assert step == 0.75 and label.endswith("+ detail + Skeleton Recall, tile step 0.75")
    assert cfg == row_config("segformer+detail+srec", demo)[1]  # the training is the row's without +step
    assert split_predict("segformer+detail+step0.75+srec") == ("segformer+detail+srec", 0.75, "fp32")
    assert split_predict("unet") == ("unet", 0.5, "fp32")
    label, cfg, step, precision = row_config("segformer+detail+bf16+srec+step0.6", demo)
    assert (step, precision) == (0.6, "bf16") and label.endswith(", tile step 0.6, bf16 prediction")
    assert cfg == row_config("segformer+detail+srec", demo)[1]  # +bf16 only predicts, too
    assert split_predict("segformer+bf16+detail") == ("segformer+detail", 0.5, "bf16")
    for bad in ("segformer+step0", "segformer+step1.5", "segformer+stepx", "segformer+step0.5+step0.7"):
        with pytest.raises(ConfigError, match=r"one \+stepS with 0 < S <= 1"):
            row_config(bad, demo)


def test_trainbf16_row_trains_under_bf16_and_is_its_own_training():
    demo = load_config(ROOT / "configs" / "demo.yaml")
    label, cfg, step, precision = row_config("upernet+depth6+trainbf16+detail+bf16", demo)
    assert cfg.train.precision == "bf16" and (step, precision) == (0.5, "bf16")
    assert label.endswith("+ detail, bf16 training, bf16 prediction")
    # +bf16 only predicts, +trainbf16 trains another model
    assert split_predict("upernet+trainbf16+bf16") == ("upernet+trainbf16", 0.5, "bf16")
    fp32 = row_config("upernet+depth6+detail", demo)[1]
    assert fp32.train.precision == "fp32" and cfg != fp32
    assert cfg.model_copy(update={"train": fp32.train}) == fp32  # only the precision differs
    # a row says its training precision whatever the demo config sets
    tuned = demo.model_copy(update={"train": demo.train.model_copy(update={"precision": "bf16"})})
    assert row_config("upernet", tuned)[1].train.precision == "fp32"
    with pytest.raises(ConfigError, match=r"unknown option 'trainbf17'.*\+trainbf16 \(bf16 training\)"):
        row_config("upernet+trainbf17", demo)


def test_depth_row_runs_the_first_blocks_only():
    demo = load_config(ROOT / "configs" / "demo.yaml")
    label, cfg, *_ = row_config("upernet+depth6+detail+srec0.4", demo)
    assert label.startswith("DINOv3-S (blocks 1-6) + UperNet") and cfg.model.layers == [0, 2, 3, 5]
    assert row_config("upernet+depth8", demo)[1].model.layers == [1, 3, 5, 7]
    # depth 12 is the family default for ViT-S (backbones.base.default_layers)
    assert row_config("upernet+depth12", demo)[1].model.layers == default_layers(12)
    assert row_config("upernet+detail", demo)[1].model.layers is None
    for bad in ("upernet+depth3", "upernet+depthx", "upernet+depth"):
        with pytest.raises(ConfigError, match=r"unknown option .*\+depthD \(D >= 4 blocks\)"):
            row_config(bad, demo)


def test_width_row_sets_the_heads_hidden_size():
    demo = load_config(ROOT / "configs" / "demo.yaml")
    label, cfg, *_ = row_config("upernet+h96+depth4+detail+srec0.4", demo)
    assert label.startswith("DINOv3-S (blocks 1-4) + UperNet 96 (pyramid neck) + detail")
    assert cfg.model.decoder.hidden_size == 96 and cfg.model.neck == "pyramid"
    assert cfg.model.layers == [0, 1, 2, 3]
    assert cfg.model.decoder.pool_scales == demo.model.decoder.pool_scales
    assert row_config("upernet", demo)[1].model.decoder.hidden_size == 128
    label, cfg, *_ = row_config("segformer+h64", demo)
    assert label == "DINOv3-S + SegFormer 64" and cfg.model.decoder.hidden_size == 64
    with pytest.raises(ConfigError, match=r"\+hN sets a head's hidden_size, which linear does not have"):
        row_config("linear+h64", demo)
    with pytest.raises(ConfigError, match=r"\+hN sets a head's hidden_size, which linear does not have"):
        row_config("linear+h128", demo)  # the default width is no exception
    for bad in ("upernet+h0", "upernet+hx", "upernet+h"):
        with pytest.raises(ConfigError, match=r"unknown option .*\+hN \(a head width\)"):
            row_config(bad, demo)


def test_a_row_says_everything_it_trains_whatever_the_demo_config_sets():
    demo = load_config(ROOT / "configs" / "demo.yaml")
    model = demo.model.model_copy(update={
        "layers": [0, 1, 2, 3], "decoder": demo.model.decoder.model_copy(update={"hidden_size": 96})})
    loss = demo.train.loss.model_copy(update={"skeleton_recall": 0.4})
    tuned = demo.model_copy(update={"model": model, "train": demo.train.model_copy(update={"loss": loss})})
    label, cfg, *_ = row_config("upernet+detail", tuned)
    assert label == "DINOv3-S + UperNet 128 (pyramid neck) + detail"
    assert cfg.model.layers is None and cfg.model.decoder.hidden_size == 128
    assert cfg.train.loss.skeleton_recall == 0.0


def test_the_gpu_check_says_it_needs_cuda_and_exits_0_without_it():
    import subprocess

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: benchmarks/gpu_check.py runs for real")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], capture_output=True,
                          text=True)
    assert done.returncode == 0 and "needs a CUDA GPU" in done.stdout and "Traceback" not in done.stderr
