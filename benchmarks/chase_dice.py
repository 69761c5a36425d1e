"""Vessel Dice, clDice and thin-vessel sensitivity on the CHASE_DB1 test split after the same training
budget: nnU-Net's own default 2D U-Net (nnUNetTrainer) and segframe ViT rows, in one run.

Run: .venv/bin/python benchmarks/chase_dice.py [--data ../shared/data/CHASEDB1] [--work bench_output]
     [--epochs 12] [--iterations 50] [--rows unet upernet segformer upernet+detail ...] [--check] [--write]

A row is `unet` (nnU-Net's U-Net) or `DECODER[+detail][+pN]` for any installed decoder: DINOv3-S with
that head (UperNet on the pyramid neck as in configs/demo.yaml, every other head on the identity
neck, width 128 where the head has a `hidden_size`), `+detail` adds the detail path with its default
options (model.detail), `+pN` trains on NxN patches instead of 192x192 at the same iterations and
batch (more pixels per step: the patch size as a lever, said in the label). Default rows: the U-Net,
UperNet and SegFormer with the detail path, then UperNet, UNETR, Primus, linear, Mask2Former and DPT
without it (about 2.5 hours on 2 CPU cores). `--check` builds every row's model and exits.

Every row trains on fold 0 of the 20 training images for the same epochs x iterations, batch 2,
from random initialisation (no weights offline), and predicts the 8 test images without mirroring.
The U-Net is nnU-Net's planned PlainConvUNet with its stages cut to fit the 192 patch (what
nnU-Net's planner does for that patch: pooling until the bottleneck is at least 4 pixels), trained
by nnUNetTrainer's SGD/poly schedule; its budget does not change with the rows. Metrics are means
over the test images inside the field of view (`segframe evaluate`). The test images are used
only here: no early stopping, no threshold picked on them.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

from segframe.config import DetailConfig, SegframeConfig, dump_config, load_config
from segframe.demo import _run, _tool, convert, nnunet_env
from segframe.errors import ConfigError
from segframe.evaluate import evaluate_folders
from segframe.nnunet.plans import config_tag, plans_name, results_folder

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, machine, publish  # noqa: E402

PATCH = [192, 192]
DEFAULT_ROWS = ["unet", "upernet+detail", "segformer+detail", "upernet", "unetr", "primus", "linear",
                "mask2former", "dpt"]
NAMES = {"upernet": "UperNet", "segformer": "SegFormer", "dpt": "DPT", "unetr": "UNETR", "primus": "Primus",
         "linear": "linear", "mask2former": "Mask2Former"}


def row_config(row: str, demo: SegframeConfig) -> tuple[str, SegframeConfig]:
    """The label and config of a ViT row `DECODER[+detail][+pN]` (the demo's model and train values)."""
    from segframe.plugins import get_registry

    decoder, *options = row.split("+")
    registry = get_registry()
    if decoder not in registry.decoders():
        raise ConfigError(f"row {row!r}: unknown decoder {decoder!r}; installed: "
                          f"{', '.join(registry.decoders())} (or the row `unet`)")
    detail, patch = False, PATCH
    for option in options:
        if option == "detail":
            detail = True
        elif option[:1] == "p" and option[1:].isdigit() and int(option[1:]) >= 16:
            patch = [int(option[1:])] * 2
        else:
            raise ConfigError(f"row {row!r}: unknown option {option!r}; use +detail or +pN (a patch size)")
    if decoder == "upernet":
        model = demo.model
        label = "DINOv3-S + UperNet 128 (pyramid neck)"
    else:
        params = registry.decoder(decoder).spec.params.model_fields
        section = {"name": decoder, **({"hidden_size": 128} if "hidden_size" in params else {})}
        model = demo.model.model_copy(update={
            "neck": "identity", "decoder": demo.model.decoder.model_validate(section)})
        label = f"DINOv3-S + {NAMES.get(decoder, decoder)}" + (" 128" if "hidden_size" in params else "")
    # set either way: configs/demo.yaml may itself turn the detail path on
    model = model.model_copy(update={"detail": DetailConfig(enabled=detail)})
    if detail:
        label += " + detail"
    train = demo.train.model_copy(update={"patch_size": patch, "batch_size": 2})
    if patch != PATCH:
        label += f", patch {patch[0]}x{patch[1]}"
    return label, demo.model_copy(update={"model": model, "train": train})


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


def table(rows: list, args: argparse.Namespace, source: str) -> list[str]:
    """The markdown table of the rows measured so far."""
    lines = [
        f"## Vessel Dice on CHASE_DB1 after the same budget ({args.epochs} epochs x {args.iterations} "
        f"iterations, patch {PATCH[0]}x{PATCH[1]} unless the row says otherwise, batch 2, random init, CPU)",
        "",
        machine("cpu") + f"; data: {source.split(' from ')[0]}",
        "",
        "Test split (8 images), first-observer references, means inside the FOV; no mirroring at prediction. "
        "Train time includes nnU-Net's final validation of fold 0 (4 images, mirrored). clDice: centerline "
        "Dice (Shit et al., CVPR 2021); thin sens.: recall of reference vessel pixels of local width <= 2 px "
        "(docs/data.md). `+ detail`: model.detail with its defaults (docs/detail.md).",
        "",
        "| model | params (M) | train (s) | predict (s) | Dice | clDice | thin sens. | IoU | sensitivity "
        "| specificity | accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, params, train_s, predict_s, m in rows:
        lines.append(
            f"| {label} | {params / 1e6:.1f} | {train_s:.0f} | {predict_s:.0f} | {m['dice']:.4f} | "
            f"{m['cldice']:.4f} | {m['thin_sensitivity']:.4f} | {m['iou']:.4f} | {m['sensitivity']:.4f} | "
            f"{m['specificity']:.4f} | {m['accuracy']:.4f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = ROOT.parent / "shared" / "data" / "CHASEDB1"
    parser.add_argument("--data", default=str(default_data) if default_data.is_dir() else "")
    parser.add_argument("--work", default=str(ROOT / "bench_output"))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--val-iterations", type=int, default=4)
    parser.add_argument("--rows", "--only", nargs="+", default=DEFAULT_ROWS, metavar="ROW",
                        help="unet, or DECODER[+detail][+pN] for any installed decoder (see the docstring)")
    parser.add_argument("--check", action="store_true", help="build every row's model, then exit")
    parser.add_argument("--reuse", action="store_true",
                        help="take rows an interrupted run of the same command finished (work/rows/ROW.json) "
                             "instead of training them again")
    parser.add_argument("--write", action="store_true", help="also update this section of BENCHMARKS.md")
    args = parser.parse_args()

    from segframe.model import ViTSegModel

    demo = load_config(ROOT / "configs" / "demo.yaml")
    demo = demo.model_copy(update={"train": demo.train.model_copy(update={
        "num_epochs": args.epochs,
        "num_iterations_per_epoch": args.iterations,
        "num_val_iterations_per_epoch": args.val_iterations,
    })})
    configs = {}
    try:
        for row in dict.fromkeys(args.rows):
            if row != "unet":
                configs[row] = row_config(row, demo)
                ViTSegModel(configs[row][1], in_channels=3, num_classes=2)  # an unbuildable row fails now
    except ConfigError as exc:
        parser.error(str(exc))
    if args.check:
        for row, (label, cfg) in configs.items():
            print(f"{row}: {label}; train patch {cfg.train.patch_size}")
        return

    work = Path(args.work).resolve()
    env = nnunet_env(work)
    dataset, source = convert(args.data, Path(env["nnUNet_raw"]))
    dataset_id = dataset.name[7:10]
    pre = Path(env["nnUNet_preprocessed"]) / dataset.name
    if not (pre / "nnUNetPlans.json").is_file():
        _run([_tool("nnUNetv2_plan_and_preprocess"), "-d", dataset_id, "-c", "2d", "-np", "2"], env)

    rows = []
    images, refs, fov = dataset / "imagesTs", dataset / "labelsTs", dataset / "fovTs"
    results = Path(env["nnUNet_results"]) / dataset.name
    done_rows = work / "rows"
    done_rows.mkdir(exist_ok=True)
    for key in dict.fromkeys(args.rows):
        slug = config_tag(key)
        out = work / f"pred_{slug}"
        record = done_rows / f"{slug}.json"
        if args.reuse and record.is_file():
            rows.append(tuple(json.loads(record.read_text())))
            print(f"{key}: reused from {record}", flush=True)
            continue
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
            train_s = timed([_tool("nnUNetv2_train"), dataset_id, "2d", "0", "-tr", "nnUNetTrainerBench",
                             "-p", name, "-device", "cpu"], run_env)
            predict_s = timed([_tool("nnUNetv2_predict"), "-i", str(images), "-o", str(out), "-d",
                               dataset_id, "-c", "2d", "-tr", "nnUNetTrainerBench", "-p", name, "-f", "0",
                               "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], run_env)
            label = "nnU-Net default 2D U-Net (PlainConvUNet, nnUNetTrainer)"
            folder = results / f"nnUNetTrainerBench__{name}__2d"
        else:
            label, cfg = configs[key]
            path = work / f"bench_{slug}.yaml"
            path.write_text(dump_config(cfg))
            cli = [sys.executable, "-m", "segframe.cli"]
            train_s = timed([*cli, "train", dataset_id, "2d", "0", "--config", str(path), "-device", "cpu",
                             "--overwrite"], env)
            name = plans_name("nnUNetPlans", f"bench_{slug}")
            folder = results_folder(results.parent, dataset.name, name, "2d")
            predict_s = timed([*cli, "predict", "-i", str(images), "-o", str(out), "-m", str(folder),
                               "-f", "0", "-device", "cpu", "--disable_tta"], env)
        import torch

        checkpoint = folder / "fold_0" / "checkpoint_final.pth"
        weights = torch.load(checkpoint, map_location="cpu", weights_only=False)
        params = sum(v.numel() for k, v in weights["network_weights"].items()
                     if v.is_floating_point() and "running_" not in k)
        metrics = evaluate_folders(out, refs, fov)["mean"]
        rows.append((label, params, train_s, predict_s, metrics))
        record.write_text(json.dumps(rows[-1]))
        # written after every row, so a long run keeps what it measured if a later row fails
        (work / "chase_dice.md").write_text("\n".join(table(rows, args, source)) + "\n")
        print(f"{label}: Dice {metrics['dice']:.4f}, clDice {metrics['cldice']:.4f}, thin-vessel "
              f"sensitivity {metrics['thin_sensitivity']:.4f}, train {train_s:.0f} s, "
              f"predict {predict_s:.0f} s", flush=True)

    publish("chase-dice-cpu", table(rows, args, source), args.write)


if __name__ == "__main__":
    main()
