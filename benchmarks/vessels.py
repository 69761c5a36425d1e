"""Segmentation quality on the test split of a retinal vessel dataset after the same training budget:
nnU-Net's own U-Nets and segframe ViT rows, in one run, each row trained with several seeds and reported as
mean ± sd. CHASE_DB1 or DRIVE (binary vessels: Dice, clDice, thin-vessel sensitivity), or LES-AV (arteries
and veins: A/V Dice, A/V accuracy, each class's Dice, the vessels' Dice and clDice).

Run: .venv/bin/python benchmarks/vessels.py [--data ../shared/data/CHASEDB1] [--work bench_output]
     [--epochs 12] [--iterations 50] [--seeds 3] [--rows unet upernet segformer upernet+detail ...]
     [--check] [--reuse] [--write [--section NAME]]

A row is `unet` (nnU-Net's default U-Net), `resenc` (nnU-Net's residual-encoder U-Net, planned by
`nnUNetPlannerResEncM`, the preset that fits this machine) or
`DECODER[+hN][+depthD][+detail[N|A-B-C-D]][+unitsA-B-C-D][+srec[W]][+pN][+trainbf16][+valbf16][+stepS]
[+bf16]` for any installed decoder:
DINOv3-S with that head (UperNet on the pyramid neck as in configs/demo.yaml, every other head on the identity
neck, width 128 where the head has a `hidden_size`; `+hN` sets that width to N instead), `+detail` adds the
detail path with its default options (model.detail; `+detailN` with width N at stride 1, e.g. `+detail16`:
channels 16, 32, 64, 64; `+detailA-B-C-D` sets all four widths, strides 1, 2, 4, 8; `+unitsA-B-C-D` the
path's conv units per stage, e.g. `+units1-2-2-2`: one at stride 1 instead of two),
`+depthD` runs only the backbone's first D blocks (model.layers: four blocks evenly spaced up to block D-1,
e.g. `+depth6`: 0, 2, 3, 5; the later blocks are never run),
`+srec` the Skeleton Recall loss term with weight 1 (train.loss; `+srecW` with weight W, e.g. `+srec0.4`),
`+pN` trains on NxN patches instead of 192x192 at the same iterations and batch (more pixels per step: the
patch size as a lever, said in the label), `+trainbf16` trains under bfloat16 autocast (train.precision: bf16;
fp32 without it), `+valbf16` runs nnU-Net's final validation (part of the train time) with the
network's forward in bfloat16 (train.validation_precision: bf16; the trained model is the same),
`+stepS` predicts with nnU-Net's tile_step_size S instead of 0.5 (`segframe predict --step_size`;
fewer tiles), `+bf16` predicts with the network under bfloat16
autocast (`segframe predict --precision bf16`); a row that differs from an earlier row of the run only
in `+stepS` or `+bf16` predicts with that row's trained model instead of training again (its train time
is that run's). Default rows: the U-Net,
UperNet and SegFormer with the detail path, then UperNet, UNETR, Primus, linear, Mask2Former and DPT
without it (about 2.5 hours per seed on 2 CPU cores). `--check` builds every row's model and exits.

nnU-Net's augmentation is random, so one run of a row is one draw: `--seeds N` trains every row N times
with train.seed 0..N-1 (the seed of the training process and of every augmentation worker, docs/data.md;
the U-Net row gets it as BENCH_SEED), seed by seed over all rows, and the table gives mean ± sd (sample
standard deviation) over the runs and how many runs each row has. `--reuse` takes the runs an interrupted
run finished (work/rows/ROW_sSEED.json). `--write` replaces the dataset's section of BENCHMARKS.md;
`--section NAME` writes a run of a few rows into a section of its own instead.

Every row trains on fold 0 of the training images (`--data`: a CHASE_DB1, DRIVE or LES-AV folder, converted
as `segframe data` does; the table names the dataset and test images actually used) for the same epochs x
iterations, batch 2, from random initialisation (no weights offline), and predicts the test images
without mirroring. The U-Nets are nnU-Net's planned PlainConvUNet (default planner) and ResidualEncoderUNet
(ResEnc-M planner) with their stages cut to fit the 192 patch (what nnU-Net's planner does for that patch:
pooling until the bottleneck is at least 4 pixels), trained by nnUNetTrainer's SGD/poly schedule; their
budget does not change with the rows. Metrics are
means over the test images inside the field of view (`segframe evaluate`). The test images are used
only here: no early stopping, no threshold picked on them. The `val Dice` column is nnU-Net's own
foreground Dice of its final validation of fold 0 (mirrored, full-image, outside the FOV too): the number
to choose settings on.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import statistics
import sys
import time
from pathlib import Path

from segframe.colours import read_dataset
from segframe.config import DetailConfig, SegframeConfig, dump_config, load_config
from segframe.demo import _run, _tool, convert, nnunet_env
from segframe.errors import ConfigError, SegframeError
from segframe.evaluate import classes_from_dataset, evaluate_folders
from segframe.nnunet.plans import config_tag, plans_name, results_folder

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, machine, publish  # noqa: E402

PATCH = [192, 192]
# LES-AV: nnU-Net's two U-Nets, the CHASE_DB1 row configs/demo.yaml trains, and Mask2Former (the head the
# older fork's users train on arteries and veins)
AV_ROWS = ["unet", "resenc", "upernet+depth6+detail+srec0.4", "mask2former"]
DEFAULT_ROWS = ["unet", "upernet+detail", "segformer+detail", "upernet", "unetr", "primus", "linear",
                "mask2former", "dpt"]
# nnU-Net's own rows: planner, the plans it writes, the row's label
UNETS = {
    "unet": ("ExperimentPlanner", "nnUNetPlans", "nnU-Net default 2D U-Net (PlainConvUNet, nnUNetTrainer)"),
    "resenc": ("nnUNetPlannerResEncM", "nnUNetResEncUNetMPlans",
               "nnU-Net ResEnc-M U-Net (ResidualEncoderUNet, nnUNetPlannerResEncM, nnUNetTrainer)"),
}
NAMES = {"upernet": "UperNet", "segformer": "SegFormer", "dpt": "DPT", "unetr": "UNETR", "primus": "Primus",
         "linear": "linear", "mask2former": "Mask2Former"}


def split_predict(row: str) -> tuple[str, float, str]:
    """A row without its prediction options, nnU-Net's tile_step_size S (`+stepS`; 0.5 without it) and
    the network's precision at prediction (`+bf16`: `segframe predict --precision bf16`; fp32 without)."""
    decoder, *options = row.split("+")
    steps = [o for o in options if o.startswith("step")]
    precision = "bf16" if "bf16" in options else "fp32"
    trained = "+".join([decoder, *(o for o in options if o not in steps and o != "bf16")])
    if not steps:
        return trained, 0.5, precision
    try:
        step = float(steps[-1][4:])
    except ValueError:
        step = 0.0
    if len(steps) > 1 or not 0 < step <= 1:
        raise ConfigError(f"row {row!r}: use one +stepS with 0 < S <= 1 (nnU-Net's tile_step_size)")
    return trained, step, precision


def srec_weight(row: str, text: str) -> float:
    """The Skeleton Recall weight W of a row's `+srecW` option (`+srec`: 1)."""
    try:
        weight = float(text) if text else 1.0
    except ValueError:
        weight = 0.0
    if not weight > 0:
        raise ConfigError(f"row {row!r}: use +srec (weight 1) or +srecW with a weight W > 0, e.g. +srec0.4")
    return weight


def stride_values(text: str, default: list[int] | None = None) -> list[int] | None:
    """The four integers >= 1 of a row's `A-B-C-D` (strides 1, 2, 4, 8), or with `default` also a
    single `N` (N at stride 1, `default`'s values after it); None when `text` is neither."""
    parts = text.split("-")
    if not all(p.isdigit() and int(p) >= 1 for p in parts) or len(parts) not in ((1, 4) if default else (4,)):
        return None
    return [int(p) for p in parts] + (default or [])[len(parts):]


def row_config(row: str, demo: SegframeConfig) -> tuple[str, SegframeConfig, float, str]:
    """The label, config, prediction tile step and precision of a ViT row
    `DECODER[+hN][+depthD][+detail[N|A-B-C-D]][+unitsA-B-C-D][+srec[W]][+pN][+trainbf16][+valbf16][+stepS][+bf16]`
    (the demo's model and train values)."""
    from segframe.plugins import get_registry

    trained, step, precision = split_predict(row)
    decoder, *options = trained.split("+")
    registry = get_registry()
    if decoder not in registry.decoders():
        raise ConfigError(f"row {row!r}: unknown decoder {decoder!r}; installed: "
                          f"{', '.join(registry.decoders())} (or the row `unet`)")
    detail, skeleton_recall, patch = DetailConfig(), 0.0, PATCH  # the path off unless an option turns it on
    layers, hidden, units, train_precision, validation = None, None, None, "fp32", "fp32"
    for option in options:
        if option[:1] == "h" and option[1:].isdigit() and int(option[1:]) >= 1:
            hidden = int(option[1:])
        elif option.startswith("depth") and option[5:].isdigit() and int(option[5:]) >= 4:
            layers = [(i + 1) * int(option[5:]) // 4 - 1 for i in range(4)]
        elif option == "detail":
            detail = DetailConfig(enabled=True)
        elif option.startswith("detail") and (channels := stride_values(option[6:], DetailConfig().channels)):
            detail = DetailConfig(enabled=True, channels=channels)
        elif option.startswith("units") and (units := stride_values(option[5:])):
            pass  # applied to the detail path below, whichever order the options come in
        elif option.startswith("srec"):
            skeleton_recall = srec_weight(row, option[4:])
        elif option[:1] == "p" and option[1:].isdigit() and int(option[1:]) >= 16:
            patch = [int(option[1:])] * 2
        elif option == "trainbf16":
            train_precision = "bf16"
        elif option == "valbf16":
            validation = "bf16"
        else:
            raise ConfigError(f"row {row!r}: unknown option {option!r}; use +hN (a head width), "
                              "+depthD (D >= 4 blocks), +detail[N|A-B-C-D], +unitsA-B-C-D, +srec[W], "
                              "+pN (a patch size), +trainbf16 (bf16 training), "
                              "+valbf16 (bf16 final validation), +stepS (a tile step) or +bf16 "
                              "(bf16 prediction)")
    if units:
        if not detail.enabled:
            raise ConfigError(f"row {row!r}: +unitsA-B-C-D sets the detail path's conv units; add +detail")
        detail = detail.model_copy(update={"units": units})
    widths = "hidden_size" in registry.decoder(decoder).spec.params.model_fields
    if hidden and not widths:
        raise ConfigError(f"row {row!r}: +hN sets a head's hidden_size, which {decoder} does not have")
    hidden = hidden or 128
    section = {"name": decoder, **({"hidden_size": hidden} if widths else {})}
    if decoder == "upernet":
        model = demo.model.model_copy(update={"decoder": demo.model.decoder.model_copy(update=section)})
        label = f"DINOv3-S + UperNet {hidden} (pyramid neck)"
    else:
        model = demo.model.model_copy(update={
            "neck": "identity", "decoder": demo.model.decoder.model_validate(section)})
        label = f"DINOv3-S + {NAMES.get(decoder, decoder)}" + (f" {hidden}" if widths else "")
    # set either way: configs/demo.yaml may itself set the detail path, the layers, the width or the loss
    model = model.model_copy(update={"detail": detail, "layers": layers})
    if layers:
        label = label.replace("DINOv3-S", f"DINOv3-S (blocks 1-{layers[-1] + 1})", 1)
    if detail.enabled:
        label += " + detail"
        if detail.channels != DetailConfig().channels:
            label += f" {'-'.join(map(str, detail.channels))}"
        if detail.units != DetailConfig().units:
            label += f" (units {'-'.join(map(str, detail.units))})"
    if skeleton_recall:
        label += " + Skeleton Recall" + (f" {skeleton_recall:g}" if skeleton_recall != 1 else "")
    loss = demo.train.loss.model_copy(update={"skeleton_recall": skeleton_recall})
    train = demo.train.model_copy(update={"patch_size": patch, "batch_size": 2, "loss": loss,
                                          "precision": train_precision, "validation_precision": validation})
    if patch != PATCH:
        label += f", patch {patch[0]}x{patch[1]}"
    if train_precision != "fp32":
        label += f", {train_precision} training"
    if validation != "fp32":
        label += f", {validation} final validation"
    if step != 0.5:
        label += f", tile step {step:g}"
    if precision != "fp32":
        label += f", {precision} prediction"
    return label, demo.model_copy(update={"model": model, "train": train}), step, precision


def unet_plans(base: dict, patch: list[int], batch: int, name: str) -> dict:
    """nnU-Net's 2d plans (the default U-Net's or a residual-encoder planner's) with the patch and batch set
    and the network's stages cut so the bottleneck is >= 4 pixels: every per-stage list of the
    architecture (features, kernels, strides, convolutions or residual blocks per stage) keeps its first
    stages, the decoder's lists one fewer."""
    plans = copy.deepcopy(base)
    plans["plans_name"] = name
    cfg = plans["configurations"]["2d"]
    kwargs = cfg["architecture"]["arch_kwargs"]
    n_stages, stages = kwargs["n_stages"], 1
    while stages < n_stages and all(p % 2**stages == 0 and p // 2**stages >= 4 for p in patch):
        stages += 1
    cfg["patch_size"], cfg["batch_size"] = list(patch), batch
    kwargs["n_stages"] = stages
    for key, value in kwargs.items():
        if isinstance(value, list) and len(value) == n_stages:
            kwargs[key] = value[:stages]
        elif isinstance(value, list) and len(value) == n_stages - 1:
            kwargs[key] = value[: stages - 1]
    return plans


def is_lesav(data: str) -> bool:
    """Whether `data` is an LES-AV folder (arteries and veins) rather than CHASE_DB1 or DRIVE."""
    return bool(data) and (Path(data) / "arteries-and-veins").is_dir()


def convert_data(data: str, raw: Path, scale: float = 1.0) -> tuple[Path, str]:
    """The benchmark's dataset (LES-AV as `segframe data lesav [--scale]`, else as the demo converts) and
    its source."""
    if is_lesav(data):
        from segframe.data.lesav import convert_lesav

        return convert_lesav(data, raw, scale=scale), f"LES-AV from {data}"
    if scale != 1:
        raise ConfigError("--scale is for LES-AV; CHASE_DB1 and DRIVE are converted at their own size")
    return convert(data, raw)


def timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    _run(cmd, env)
    return time.perf_counter() - start


# dataset.json names that read better in a title
DISPLAY = {"CHASEDB1": "CHASE_DB1", "LESAV": "LES-AV"}
METRICS = ("dice", "cldice", "thin_sensitivity", "iou", "sensitivity", "specificity", "accuracy")
# the artery/vein table (a dataset of several classes, `segframe evaluate`'s keys): header -> key; each
# class's own Dice follows A/V acc.
AV_COLUMNS = {"A/V Dice": "av_dice", "A/V acc.": "av_accuracy", "artery sens.": "av_artery_sensitivity",
              "vein sens.": "av_vein_sensitivity"}
VESSEL_COLUMNS = {"vessel Dice": "vessel_dice", "vessel clDice": "vessel_cldice"}


def dataset_info(dataset: Path, preprocessed: Path) -> dict:
    """What the table says about the data actually converted: its name, description and test images (from
    dataset.json), and fold 0's validation images (from nnU-Net's splits, once a row has trained)."""
    meta = json.loads((dataset / "dataset.json").read_text())
    splits = preprocessed / "splits_final.json"
    return {
        "name": DISPLAY.get(meta["name"], meta["name"]),
        "description": meta.get("description", ""),
        "test": meta.get("numTest", len(list((dataset / "imagesTs").glob("*")))),
        "val": len(json.loads(splits.read_text())[0]["val"]) if splits.is_file() else None,
    }


def section_name(info: dict) -> str:
    """The BENCHMARKS.md section of a dataset's table (CHASE_DB1 keeps its historical name)."""
    name = info["name"].lower().replace("_", "")
    return "chase-dice-cpu" if name == "chasedb1" else f"{name}-dice-cpu"


def mean_sd(values: list[float], digits: int) -> str:
    """`mean ± sd` (sample standard deviation) of the runs; the value alone for one run."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summarise(records: list[dict]) -> list[dict]:
    """The runs grouped by row (first-seen order): label, params, the seeds, and every number's runs."""
    rows: dict[str, dict] = {}
    for r in records:
        empty = {"seeds": [], "val_dice": [], "train_s": [], "predict_s": [], **{m: [] for m in r["metrics"]}}
        row = rows.setdefault(r["row"], {"row": r["row"], "label": r["label"], "params": r["params"],
                                         **empty})
        row["seeds"].append(r["seed"])
        if r.get("val_dice") is not None:  # records of older runs have none
            row["val_dice"].append(r["val_dice"])
        row["train_s"].append(r["train_s"])
        row["predict_s"].append(r["predict_s"])
        for m, value in r["metrics"].items():
            row[m].append(value)
    return list(rows.values())


def columns(records: list[dict]) -> dict[str, str]:
    """The table's metric columns, header -> key: the vessel metrics of a binary dataset, or for
    arteries and veins the A/V scores, each class's Dice (`CLASS_dice` of `segframe evaluate`) and the
    vessels' union."""
    keys = records[0]["metrics"]
    if "av_dice" not in keys:
        return dict(zip(("Dice", "clDice", "thin sens.", "IoU", "sensitivity", "specificity", "accuracy"),
                        METRICS, strict=True))
    classes = [k.removesuffix("_dice") for k in keys
               if k.endswith("_dice") and not k.startswith(("av_", "vessel_", "mean_"))]
    return {**AV_COLUMNS, **{f"{c} Dice": f"{c}_dice" for c in classes}, **VESSEL_COLUMNS}


def table(records: list[dict], args: argparse.Namespace, source: str, info: dict) -> list[str]:
    """The markdown table of the runs measured so far: one line per row, mean ± sd over its runs."""
    rows = summarise(records)
    metric_columns = columns(records)
    av = "av_dice" in records[0]["metrics"]
    counts = [len(r["seeds"]) for r in rows]
    runs = f"{min(counts)}" if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"
    val = f"{info['val']} images" if info["val"] is not None else "its validation images"
    what = "Arteries and veins" if av else "Vessel Dice"
    scores = (
        "A/V Dice: the mean of artery and vein Dice (a crossing counts as both; uncertain pixels left out); "
        "A/V acc.: on reference vessel pixels the prediction also marks as artery or vein, the share given "
        "the right type (artery / vein sens.: the same for each); a class's Dice: that label alone; vessel "
        "Dice and clDice: every vessel class as one (docs/data.md). val Dice: nnU-Net's mean foreground "
        "Dice of fold 0's final validation, the number to choose settings on. " if av else
        "clDice: centerline Dice (Shit et al., CVPR 2021); thin sens.: recall of reference vessel "
        "pixels of local width <= 2 px (docs/data.md). ")
    lines = [
        f"## {what} on {info['name']} after the same budget ({args.epochs} epochs x {args.iterations} "
        f"iterations, patch {PATCH[0]}x{PATCH[1]} unless the row says otherwise, batch 2, random init, CPU; "
        + ("one seeded run per row)" if runs == "1" else f"mean ± sd over {runs} seeded runs per row)"),
        "",
        machine("cpu") + f"; data: {source.split(' from ')[0]}",
        "",
        f"Test split ({info['test']} images; {info['description']}), means inside the FOV; no mirroring at "
        f"prediction. Each row was trained `runs` times with train.seed 0, 1, ... (docs/data.md: what a seed "
        f"fixes); a cell is the mean ± the sample standard deviation over those runs. Train time includes "
        f"nnU-Net's final validation of fold 0 ({val}, mirrored); a time's (1.08x) is its mean over the "
        "default U-Net's. " + scores + "`+ detail`: model.detail with its defaults (docs/detail.md).",
        "",
        "| model | runs | params (M) | train (s) | predict (s) | val Dice | "
        + " | ".join(metric_columns) + " |",
        "|---|" + "---:|" * (5 + len(metric_columns)),
    ]
    unet = {key: statistics.fmean(row[key]) for row in rows if row["row"] == "unet"
            for key in ("train_s", "predict_s")}

    def time_cell(row: dict, key: str) -> str:  # mean ± sd, and the mean's ratio to the U-Net's mean
        ratio = f" ({statistics.fmean(row[key]) / unet[key]:.2f}x)" if unet and row["row"] != "unet" else ""
        return mean_sd(row[key], 0) + ratio

    for r in rows:
        cells = [r["label"], str(len(r["seeds"])), f"{r['params'] / 1e6:.1f}", time_cell(r, "train_s"),
                 time_cell(r, "predict_s"), mean_sd(r["val_dice"], 4) if r["val_dice"] else "",
                 *(mean_sd(r[m], 4) for m in metric_columns.values())]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def run_row(key: str, seed: int, label_config: tuple | None, args: argparse.Namespace, env: dict,
            dataset: Path, work: Path, trained: dict | None = None) -> dict:
    """Train, predict and evaluate one row with one seed; the run's record. `trained`: the record of
    this seed's run of the same row without `+stepS` and `+bf16`, whose model is predicted with instead of
    training."""
    dataset_id = dataset.name[7:10]
    pre = Path(env["nnUNet_preprocessed"]) / dataset.name
    images, refs, fov = dataset / "imagesTs", dataset / "labelsTs", dataset / "fovTs"
    results = Path(env["nnUNet_results"]) / dataset.name
    slug = config_tag(key)
    out = work / f"pred_{slug}_s{seed}"
    if key in UNETS:
        planner, base_plans, label = UNETS[key]
        name = f"nnUNetPlans_bench_{key}"
        if not (pre / f"{base_plans}.json").is_file():  # the residual-encoder planner's own plans
            _run([_tool("nnUNetv2_plan_experiment"), "-d", dataset_id, "-pl", planner], env)
        base = json.loads((pre / f"{base_plans}.json").read_text())
        plans = unet_plans(base, PATCH, 2, name)
        # 2D data is preprocessed the same way by every planner (spacing 1, the same normalisation): the
        # residual encoder trains on the default plans' preprocessed files
        default = json.loads((pre / "nnUNetPlans.json").read_text())["configurations"]["2d"]
        plans["configurations"]["2d"]["data_identifier"] = default["data_identifier"]
        (pre / f"{name}.json").write_text(json.dumps(plans, indent=2))
        run_env = dict(
            env,
            nnUNet_extTrainer=str(Path(__file__).parent / "trainers"),
            BENCH_EPOCHS=str(args.epochs),
            BENCH_ITERATIONS=str(args.iterations),
            BENCH_VAL_ITERATIONS=str(args.val_iterations),
            BENCH_SEED=str(seed),
            nnUNet_compile="f",
        )
        train_s = timed([_tool("nnUNetv2_train"), dataset_id, "2d", "0", "-tr", "nnUNetTrainerBench",
                         "-p", name, "-device", "cpu"], run_env)
        predict_s = timed([_tool("nnUNetv2_predict"), "-i", str(images), "-o", str(out), "-d",
                           dataset_id, "-c", "2d", "-tr", "nnUNetTrainerBench", "-p", name, "-f", "0",
                           "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], run_env)
        folder = results / f"nnUNetTrainerBench__{name}__2d"
    else:
        label, cfg, step, precision = label_config
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": seed})})
        # one plans name (and results folder) per trained row (+stepS, +bf16 only predict): the seed is a
        # train value, so each run retrains it with --overwrite; what it measured is kept in its record
        train_slug = config_tag(split_predict(key)[0])
        cli = [sys.executable, "-m", "segframe.cli"]
        if trained is None:
            path = work / f"bench_{train_slug}.yaml"
            path.write_text(dump_config(cfg))
            train_s = timed([*cli, "train", dataset_id, "2d", "0", "--config", str(path), "-device",
                             "cpu", "--overwrite"], env)
        else:
            train_s = trained["train_s"]
        name = plans_name("nnUNetPlans", f"bench_{train_slug}")
        folder = results_folder(results.parent, dataset.name, name, "2d")
        predict_s = timed([*cli, "predict", "-i", str(images), "-o", str(out), "-m", str(folder),
                           "-f", "0", "-device", "cpu", "--disable_tta", "--step_size", str(step),
                           "--precision", precision], env)
    import torch

    checkpoint = folder / "fold_0" / "checkpoint_final.pth"
    weights = torch.load(checkpoint, map_location="cpu", weights_only=False)
    params = sum(v.numel() for k, v in weights["network_weights"].items()
                 if v.is_floating_point() and "running_" not in k)
    labels = dataset / "dataset.json"  # several classes: scored per class and as arteries and veins
    classes = classes_from_dataset(read_dataset(labels), str(labels))
    metrics = evaluate_folders(out, refs, fov, classes)["mean"]
    summary = folder / "fold_0" / "validation" / "summary.json"
    val_dice = json.loads(summary.read_text())["foreground_mean"]["Dice"] if summary.is_file() else None
    return {"row": key, "seed": seed, "label": label, "params": params, "train_s": train_s,
            "predict_s": predict_s, "val_dice": val_dice, "metrics": metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    default_data = ROOT.parent / "shared" / "data" / "CHASEDB1"
    parser.add_argument("--data", default=str(default_data) if default_data.is_dir() else "",
                        help="a CHASE_DB1, DRIVE or LES-AV folder (default: ../shared/data/CHASEDB1)")
    parser.add_argument("--work", default=str(ROOT / "bench_output"))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--val-iterations", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=1, metavar="N",
                        help="train every row N times, with train.seed 0..N-1; the table gives mean ± sd")
    parser.add_argument("--rows", "--only", nargs="+", metavar="ROW",
                        help="unet, resenc, or DECODER[+hN][+depthD][+detail[N|A-B-C-D]][+unitsA-B-C-D]"
                             "[+srec[W]][+pN][+trainbf16][+valbf16][+stepS][+bf16] for any installed decoder "
                             "(see the docstring); default: the U-Net and eight ViT rows, or for LES-AV "
                             + " ".join(AV_ROWS))
    parser.add_argument("--scale", type=float, default=1.0, metavar="F",
                        help="LES-AV: convert at F times the size (segframe data lesav --scale; the table's "
                             "data description says it); use one --work per scale")
    parser.add_argument("--check", action="store_true", help="build every row's model, then exit")
    parser.add_argument("--reuse", action="store_true",
                        help="take the runs an interrupted run finished (work/rows/ROW_sSEED.json, one per "
                             "row and seed) instead of training them again")
    parser.add_argument("--write", action="store_true", help="also update this section of BENCHMARKS.md")
    parser.add_argument("--section", metavar="NAME",
                        help="the BENCHMARKS.md section to write (default: chase-dice-cpu, or "
                             "DATASET-dice-cpu for another dataset); a run of a few rows into a section of "
                             "its own leaves the full table as it is")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    args.rows = args.rows or (AV_ROWS if is_lesav(args.data) else DEFAULT_ROWS)
    if args.section is not None and not re.fullmatch(r"[a-z0-9][a-z0-9-]*", args.section):
        parser.error(f"--section {args.section!r}: use lowercase letters, digits and '-'")

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
            if row not in UNETS:
                configs[row] = row_config(row, demo)
                ViTSegModel(configs[row][1], in_channels=3, num_classes=2)  # an unbuildable row fails now
    except SegframeError as exc:
        parser.error(str(exc))
    if args.check:
        for row, (label, cfg, step, precision) in configs.items():
            print(f"{row}: {label}; train patch {cfg.train.patch_size}, tile step {step:g}, {precision}")
        print(f"each row trained with train.seed {', '.join(map(str, range(args.seeds)))}")
        return

    work = Path(args.work).resolve()
    env = nnunet_env(work)
    dataset, source = convert_data(args.data, Path(env["nnUNet_raw"]), args.scale)
    dataset_id = dataset.name[7:10]
    pre = Path(env["nnUNet_preprocessed"]) / dataset.name
    if not (pre / "nnUNetPlans.json").is_file():
        _run([_tool("nnUNetv2_plan_and_preprocess"), "-d", dataset_id, "-c", "2d", "-np", "2"], env)

    records = []
    trained_here: dict[tuple[str, int], dict] = {}  # (row, seed) -> record, for runs trained by this process
    done_rows = work / "rows"
    done_rows.mkdir(exist_ok=True)
    # seed by seed over all rows: a partial run has every row, and slow drift of the machine spreads evenly
    for seed in range(args.seeds):
        for key in dict.fromkeys(args.rows):
            record = done_rows / f"{config_tag(key)}_s{seed}.json"
            if args.reuse and record.is_file():
                records.append(json.loads(record.read_text()))
                print(f"{key} seed {seed}: reused from {record}", flush=True)
                continue
            base = split_predict(key)[0]  # "unet", "resenc" and rows without +stepS, +bf16 are their own base
            trained = trained_here.get((base, seed)) if base != key else None
            records.append(run_row(key, seed, configs.get(key), args, env, dataset, work, trained))
            trained_here[(key, seed)] = records[-1]
            record.write_text(json.dumps(records[-1]))
            # written after every run, so a long run keeps what it measured if a later one fails
            info = dataset_info(dataset, pre)
            lines = table(records, args, source, info)
            (work / f"{args.section or section_name(info)}.md").write_text("\n".join(lines) + "\n")
            r, m = records[-1], records[-1]["metrics"]
            scores = (f"A/V Dice {m['av_dice']:.4f}, A/V accuracy {m['av_accuracy']:.4f}, vessel Dice "
                      f"{m['vessel_dice']:.4f}" if "av_dice" in m else f"Dice {m['dice']:.4f}, clDice "
                      f"{m['cldice']:.4f}, thin-vessel sensitivity {m['thin_sensitivity']:.4f}")
            print(f"{r['label']} seed {seed}: {scores}, train {r['train_s']:.0f} s, predict "
                  f"{r['predict_s']:.0f} s", flush=True)

    info = dataset_info(dataset, pre)
    publish(args.section or section_name(info), table(records, args, source, info), args.write)


if __name__ == "__main__":
    main()
