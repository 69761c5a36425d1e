"""Vessel Dice on the CHASE_DB1 test split after the same training budget: segframe DINOv3-S + UperNet,
DINOv3-S + SegFormer, and nnU-Net's own default 2D U-Net (nnUNetTrainer), in one run.

Run: .venv/bin/python benchmarks/chase_dice.py [--data ../shared/data/CHASEDB1] [--work bench_output]
     [--epochs 12] [--iterations 50] [--write]

All three train on fold 0 of the 20 training images for the same epochs x iterations, on the
same 192x192 patches with batch 2, from random initialisation (no weights offline), and
predict the 8 test images without mirroring. The U-Net is nnU-Net's planned PlainConvUNet with
its stages cut to fit the 192 patch (what nnU-Net's planner does for that patch: pooling until
the bottleneck is at least 4 pixels), trained by nnUNetTrainer's SGD/poly schedule. Metrics are
means over the test images inside the field of view. The test images are used only here.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

from segframe.config import dump_config, load_config
from segframe.demo import _run, _tool, convert, nnunet_env
from segframe.evaluate import evaluate_folders
from segframe.nnunet.plans import plans_name, results_folder

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, machine, publish  # noqa: E402

PATCH = [192, 192]


def unet_plans(base: dict, patch: list[int], batch: int, name: str) -> dict:
    """nnU-Net's 2d plans with the patch set and the U-Net's stages cut so the bottleneck is >= 4 pixels."""
    plans = copy.deepcopy(base)
    plans["plans_name"] = name
    cfg = plans["configurations"]["2d"]
    kwargs = cfg["architecture"]["arch_kwargs"]
    stages = 1
    while stages < kwargs["n_stages"] and all(p % 2**stages == 0 and p // 2**stages >= 4 for p in patch):
        stages += 1
    cfg["patch_size"], cfg["batch_size"] = list(patch), batch
    kwargs["n_stages"] = stages
    for key in ("features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage"):
        kwargs[key] = kwargs[key][:stages]
    kwargs["n_conv_per_stage_decoder"] = kwargs["n_conv_per_stage_decoder"][: stages - 1]
    return plans


def timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    _run(cmd, env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = ROOT.parent / "shared" / "data" / "CHASEDB1"
    parser.add_argument("--data", default=str(default_data) if default_data.is_dir() else "")
    parser.add_argument("--work", default=str(ROOT / "bench_output"))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--val-iterations", type=int, default=4)
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["upernet", "segformer", "unet"],
        default=["upernet", "segformer", "unet"],
    )
    parser.add_argument("--write", action="store_true", help="also update this section of BENCHMARKS.md")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    env = nnunet_env(work)
    dataset, source = convert(args.data, Path(env["nnUNet_raw"]))
    dataset_id = dataset.name[7:10]
    pre = Path(env["nnUNet_preprocessed"]) / dataset.name
    if not (pre / "nnUNetPlans.json").is_file():
        _run([_tool("nnUNetv2_plan_and_preprocess"), "-d", dataset_id, "-c", "2d", "-np", "2"], env)

    demo = load_config(ROOT / "configs" / "demo.yaml")
    train = demo.train.model_copy(
        update={
            "num_epochs": args.epochs,
            "num_iterations_per_epoch": args.iterations,
            "num_val_iterations_per_epoch": args.val_iterations,
            "patch_size": PATCH,
            "batch_size": 2,
        }
    )
    segformer = demo.model.model_copy(
        update={
            "neck": "identity",
            "decoder": demo.model.decoder.model_validate({"name": "segformer", "hidden_size": 128}),
        }
    )
    configs = {
        "upernet": ("DINOv3-S + UperNet 128 (pyramid neck)", demo.model_copy(update={"train": train})),
        "segformer": (
            "DINOv3-S + SegFormer 128",
            demo.model_copy(update={"model": segformer, "train": train}),
        ),
    }
    rows = []
    images, refs, fov = dataset / "imagesTs", dataset / "labelsTs", dataset / "fovTs"
    results = Path(env["nnUNet_results"]) / dataset.name
    for key in args.only:
        out = work / f"pred_{key}"
        if key == "unet":
            name = "nnUNetPlans_bench_unet"
            base = json.loads((pre / "nnUNetPlans.json").read_text())
            (pre / f"{name}.json").write_text(json.dumps(unet_plans(base, PATCH, 2, name), indent=2))
            run_env = dict(
                env,
                nnUNet_extTrainer=str(Path(__file__).parent / "trainers"),
                BENCH_EPOCHS=str(args.epochs),
                BENCH_ITERATIONS=str(args.iterations),
                BENCH_VAL_ITERATIONS=str(args.val_iterations),
                nnUNet_compile="f",
            )
            train_s = timed(
                [
                    _tool("nnUNetv2_train"),
                    dataset_id,
                    "2d",
                    "0",
                    "-tr",
                    "nnUNetTrainerBench",
                    "-p",
                    name,
                    "-device",
                    "cpu",
                ],
                run_env,
            )
            predict_s = timed(
                [
                    _tool("nnUNetv2_predict"),
                    "-i",
                    str(images),
                    "-o",
                    str(out),
                    "-d",
                    dataset_id,
                    "-c",
                    "2d",
                    "-tr",
                    "nnUNetTrainerBench",
                    "-p",
                    name,
                    "-f",
                    "0",
                    "-device",
                    "cpu",
                    "--disable_tta",
                    "-npp",
                    "1",
                    "-nps",
                    "1",
                ],
                run_env,
            )
            label = "nnU-Net default 2D U-Net (PlainConvUNet, nnUNetTrainer)"
            folder = results / f"nnUNetTrainerBench__{name}__2d"
        else:
            label, cfg = configs[key]
            path = work / f"bench_{key}.yaml"
            path.write_text(dump_config(cfg))
            cli = [sys.executable, "-m", "segframe.cli"]
            train_s = timed(
                [
                    *cli,
                    "train",
                    dataset_id,
                    "2d",
                    "0",
                    "--config",
                    str(path),
                    "-device",
                    "cpu",
                    "--overwrite",
                ],
                env,
            )
            name = plans_name("nnUNetPlans", f"bench_{key}")
            folder = results_folder(results.parent, dataset.name, name, "2d")
            predict_s = timed(
                [
                    *cli,
                    "predict",
                    "-i",
                    str(images),
                    "-o",
                    str(out),
                    "-m",
                    str(folder),
                    "-f",
                    "0",
                    "-device",
                    "cpu",
                    "--disable_tta",
                ],
                env,
            )
        import torch

        weights = torch.load(
            folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False
        )
        params = sum(
            v.numel()
            for k, v in weights["network_weights"].items()
            if v.is_floating_point() and "running_" not in k
        )
        metrics = evaluate_folders(out, refs, fov)["mean"]
        rows.append((label, params, train_s, predict_s, metrics))
        print(
            f"{label}: Dice {metrics['dice']:.4f}, train {train_s:.0f} s, predict {predict_s:.0f} s",
            flush=True,
        )

    lines = [
        f"## Vessel Dice on CHASE_DB1 after the same budget ({args.epochs} epochs x {args.iterations} "
        f"iterations, patch {PATCH[0]}x{PATCH[1]}, batch 2, random init, CPU)",
        "",
        machine("cpu") + f"; data: {source.split(' from ')[0]}",
        "",
        "Test split (8 images), first-observer references, means inside the FOV; no mirroring at prediction. "
        "Train time includes nnU-Net's final validation of fold 0 (4 images, mirrored).",
        "",
        "| model | params (M) | train (s) | predict (s) | Dice | IoU | sensitivity | specificity "
        "| accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, params, train_s, predict_s, m in rows:
        lines.append(
            f"| {label} | {params / 1e6:.1f} | {train_s:.0f} | {predict_s:.0f} | {m['dice']:.4f} | "
            f"{m['iou']:.4f} | {m['sensitivity']:.4f} | {m['specificity']:.4f} | {m['accuracy']:.4f} |"
        )
    (work / "chase_dice.md").write_text("\n".join(lines) + "\n")
    publish("chase-dice-cpu", lines, args.write)


if __name__ == "__main__":
    main()
