"""The main job end to end: convert retinal images, plan with nnU-Net, fine-tune a ViT + UperNet,
predict the test images, evaluate inside the field of view, and write overlays and a summary.

`make demo` runs `python -m segframe.demo --data DIR --work DIR`; `segframe demo` is the same.
Every nnU-Net folder lives under --work. The test images are used only for the final
evaluation: nothing is tuned, stopped early or thresholded on them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from segframe.errors import SegframeError

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
SYNTHETIC_NOTE = (
    "no data folder given: using generated vessel-like images (segframe.data.synthetic). "
    "They only show that the pipeline runs; their scores say nothing about real fundus images. "
    "Pass --data (make demo DATA=DIR) with CHASE_DB1 or DRIVE for real results."
)


class DemoError(SegframeError):
    """A demo stage failed or its inputs are missing."""


def _say(message: str) -> None:
    print(f"\n=== {message}", flush=True)


def _tool(name: str) -> str:
    """An nnU-Net console script from this interpreter's environment, else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise DemoError(f"{name} not found; install nnunetv2 in this environment (pip install -e .)")
    return found


def _run(cmd: list[str], env: dict[str, str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    code = subprocess.call(cmd, env=env)
    if code != 0:
        raise DemoError(f"command failed with exit code {code}: {' '.join(cmd)}")


def nnunet_env(work: Path) -> dict[str, str]:
    """The process environment with nnU-Net's three folders under `work`."""
    env = dict(os.environ)
    for key, sub in (("nnUNet_raw", "nnUNet_raw"), ("nnUNet_preprocessed", "nnUNet_preprocessed"),
                     ("nnUNet_results", "nnUNet_results")):
        env[key] = str((work / sub).resolve())
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    env["PYTHONUNBUFFERED"] = "1"  # nnU-Net's epoch lines appear as they happen
    env.setdefault("nnUNet_n_proc_DA", str(max(1, min(2, os.cpu_count() or 1))))
    return env


def convert(data: str, raw: Path) -> tuple[Path, str]:
    """Write the demo dataset; returns its folder and a description of the source."""
    from segframe.data import convert_chase, convert_drive, make_synthetic

    if not data:
        print(SYNTHETIC_NOTE, flush=True)
        return make_synthetic(raw), "synthetic (generated vessel-like images)"
    source = Path(data)
    if not source.is_dir():
        raise DemoError(f"data folder not found: {source} (leave DATA empty to use generated images)")
    if (source / "training").is_dir() and (source / "test").is_dir():
        return convert_drive(source, raw), f"DRIVE from {source}"
    return convert_chase(source, raw), f"CHASE_DB1 from {source}"


def write_config(config: Path, checkpoint: str | None, out: Path, precision: str = "fp32") -> Path:
    """Copy the demo config into the work folder, with the user's checkpoint filled in when given and
    the final validation's arithmetic (`train.validation_precision`) set to the demo's `precision`."""
    from segframe.config import dump_config, load_config

    if not config.is_file():
        raise DemoError(f"config file not found: {config} (pass --config FILE)")
    loaded = load_config(config)
    if checkpoint:
        path = Path(checkpoint).resolve()
        if not path.is_file():
            raise DemoError(f"checkpoint not found: {path}")
        loaded.model.checkpoint_path = str(path)
    loaded.train.validation_precision = precision
    out.write_text(dump_config(loaded))
    return out


def find_results_folder(results: Path, dataset_id: int, fold: int = 0,
                        checkpoint: str = "checkpoint_final.pth") -> Path:
    """The newest `<results>/DatasetXXX_*/<trainer__plans__config>` whose fold has `checkpoint`."""
    found = sorted(results.glob(f"Dataset{dataset_id:03d}_*/*/fold_{fold}/{checkpoint}"),
                   key=lambda p: p.stat().st_mtime)
    if not found:
        raise DemoError(f"no trained model in {results}: expected Dataset{dataset_id:03d}_*/*/fold_{fold}/"
                        f"{checkpoint} (did training finish?)")
    return found[-1].parent.parent


def _mask_rgb(mask: np.ndarray) -> np.ndarray:
    return np.repeat((mask.astype(np.uint8) * 255)[..., None], 3, axis=2)


def overlay(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, fov: np.ndarray | None = None,
            classes: dict[int, tuple[str, tuple[int, int, int]]] | None = None,
            ignore: int | None = None) -> np.ndarray:
    """Four panels side by side: image | truth | prediction | errors on the image (dimmed outside the FOV).

    Binary masks (no `classes`): errors green for found vessel, red for false vessel, blue for missed.
    Label maps with `classes` (id -> (name, colour)): truth and prediction in the class colours; the
    errors panel shows agreeing pixels in their class colour, another class in yellow, false vessel
    in magenta, missed vessel in cyan (the reference's `ignore` pixels are not marked); a legend of
    names and colours is drawn below the panels."""
    errors = image.astype(np.float32) * 0.6
    if fov is not None:
        errors[~fov] *= 0.4
    if classes is None:
        errors[truth & pred] = (0, 255, 0)
        errors[pred & ~truth] = (255, 0, 0)
        errors[truth & ~pred] = (0, 96, 255)
        masks = [_mask_rgb(truth), _mask_rgb(pred)]
    else:
        from segframe.colours import colourise

        table = {i: colour for i, (_, colour) in classes.items()}
        vessel = (truth != 0) & (truth != ignore)
        agree = vessel & (pred == truth)
        errors[agree] = colourise(truth, table)[agree]
        errors[vessel & (pred != 0) & ~agree] = CLASS_ERRORS["other class"]
        errors[(truth == 0) & (pred != 0)] = CLASS_ERRORS["false vessel"]
        errors[vessel & (pred == 0)] = CLASS_ERRORS["missed"]
        masks = [colourise(truth, table), colourise(pred, table)]
    gap = np.full((image.shape[0], 8, 3), 255, np.uint8)
    panels = [image, *masks, errors.astype(np.uint8)]
    picture = np.concatenate([p for panel in panels for p in (panel, gap)][:-1], axis=1)
    if classes is None:
        return picture
    entries = [(name, colour) for i, (name, colour) in sorted(classes.items()) if i != 0]
    return np.concatenate([picture, legend(entries + list(CLASS_ERRORS.items()), picture.shape[1],
                                           image.shape[0])], axis=0)


CLASS_ERRORS = {"other class": (255, 255, 0), "false vessel": (255, 0, 255), "missed": (0, 255, 255)}


def legend(entries: list[tuple[str, tuple[int, int, int]]], width: int, height: int) -> np.ndarray:
    """A white strip `width` wide, with a coloured square and the name of each entry (in rows as
    `width` needs), its text sized for a picture `height` pixels tall (so a legend under a 1444-px
    fundus is as readable as under 64)."""
    from PIL import ImageDraw, ImageFont

    size = max(12, height // 30)
    font = ImageFont.load_default(size=size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    places, x, y = [], size // 2, 0
    for name, colour in entries:
        step = size + size // 3 + int(measure.textlength(name, font=font)) + size
        if x > size // 2 and x + step > width:
            x, y = size // 2, y + 2 * size
        places.append((x, y, name, colour))
        x += step
    strip = Image.new("RGB", (width, y + 2 * size), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for x, y, name, colour in places:
        top = y + size // 2
        draw.rectangle([x, top, x + size, top + size], fill=tuple(colour), outline=(0, 0, 0))
        draw.text((x + size + size // 3, top), name, fill=(0, 0, 0), font=font)
    return np.asarray(strip)


def write_overlays(dataset: Path, predictions: Path, out: Path) -> list[Path]:
    """An overlay PNG per test case of `dataset` (labelsTs) and its prediction; label maps of several
    classes (by the dataset.json, as `segframe evaluate` decides) get the class colours and a legend."""
    from segframe.colours import colour_table, label_names, read_dataset, read_label_map
    from segframe.data.common import read_mask, read_rgb
    from segframe.evaluate import classes_from_dataset

    dataset_json = dataset / "dataset.json"
    info = read_dataset(dataset_json) if dataset_json.is_file() else None
    several = info is not None and classes_from_dataset(info, str(dataset_json)) is not None
    if several:
        colours = colour_table(info)
        classes = {i: (name, colours[i]) for i, name in label_names(info).items()}
        ignore = next((i for i, name in label_names(info).items() if name == "ignore"), None)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for ref in sorted((dataset / "labelsTs").glob("*.png")):
        case = ref.stem
        fov_path = dataset / "fovTs" / f"{case}.png"
        fov = read_mask(fov_path) if fov_path.is_file() else None
        image = read_rgb(dataset / "imagesTs" / f"{case}_0000.png")
        if several:
            panel = overlay(image, read_label_map(ref), read_label_map(predictions / f"{case}.png"), fov,
                            classes, ignore)
        else:
            panel = overlay(image, read_mask(ref), read_mask(predictions / f"{case}.png"), fov)
        Image.fromarray(panel).save(out / f"{case}.png")
        written.append(out / f"{case}.png")
    return written


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("segframe", "torch", "timm", "nnunetv2"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def describe(cfg: Any) -> str:
    """What the demo trains, in one line: backbone, the blocks read, head and width, detail path, loss."""
    m = cfg.model
    text = f"{m.backbone.name} {m.backbone_size}"
    if m.layers is not None:
        text += f" (features of blocks {', '.join(str(i + 1) for i in m.layers)})"
    width = getattr(cfg.decoder_params(), "hidden_size", None)  # the plugin's default when the YAML omits it
    text += f" + {m.decoder.name}" + (f" {width}" if width else "")
    text += " + detail path" if m.detail.enabled else ""
    recall = cfg.train.loss.skeleton_recall
    return text + "; loss: nnU-Net's Dice + CE" + (f" + Skeleton Recall {recall:g}" if recall else "")


def demo_precision(choice: str, device: str) -> str:
    """The network's arithmetic in the demo's predictions: nnU-Net's final validation
    (`train.validation_precision`) and the test images (`segframe predict --precision`). `auto` is bf16
    on a CPU that computes bfloat16 natively (AVX512_BF16 or AMX: where BENCHMARKS.md measured it faster,
    with the same scores) and fp32 elsewhere."""
    if choice == "bf16" and device != "cpu":
        raise DemoError(f"--precision bf16 is for --device cpu (on {device} nnU-Net's own autocast applies); "
                        "use --precision auto or fp32")
    if choice != "auto":
        return choice
    from segframe.nnunet.runtime import native_bf16

    return "bf16" if device == "cpu" and native_bf16() else "fp32"


def summary_markdown(summary: dict[str, Any]) -> str:
    from segframe.evaluate import format_markdown

    times = summary["stage_seconds"]
    lines = [
        "# segframe demo",
        "",
        f"- data: {summary['data']}",
        f"- dataset: {summary['dataset']}",
        f"- model: {summary['model']} ({summary['weights']})",
        f"- config: {summary['config']}",
        f"- device: {summary['device']}, test-time mirroring: {'on' if summary['tta'] else 'off'}, "
        f"arithmetic: training {summary['train_precision']}, final validation and prediction "
        f"{summary['precision']}",
        f"- machine: {summary['machine']}; " + ", ".join(f"{k} {v}" for k, v in summary["versions"].items()),
        f"- date: {summary['date']}",
        "",
        "Test-split metrics inside the field of view (first-observer references). The test images were "
        "used for this evaluation only.",
        "",
        format_markdown(summary["metrics"]),
        "",
        "| stage | seconds |",
        "|---|---|",
        *(f"| {k} | {v:.0f} |" for k, v in times.items()),
        f"| **total** | **{sum(times.values()):.0f}** |",
        "",
    ]
    return "\n".join(lines)


def run_demo(data: str, work: str | Path, config: str | Path = DEFAULT_CONFIG, checkpoint: str | None = None,
             device: str = "cpu", tta: bool = False, skip_train: bool = False,
             precision: str = "auto") -> dict[str, Any]:
    """Run every stage; returns the summary (also written to <work>/summary.json and summary.md)."""
    from segframe.config import load_config
    from segframe.evaluate import evaluate_folders, format_table, json_safe, save_results

    precision = demo_precision(precision, device)
    work = Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = nnunet_env(work)
    times: dict[str, float] = {}

    def stage(name: str, title: str):
        _say(title)
        times[name] = time.perf_counter()

    def done(name: str) -> None:
        times[name] = time.perf_counter() - times[name]
        print(f"--- {name}: {times[name]:.0f} s", flush=True)

    stage("convert", "1/6 converting the dataset to nnU-Net's raw format")
    dataset, source = convert(data, Path(env["nnUNet_raw"]))
    dataset_id = int(dataset.name[7:10])
    print(f"dataset: {dataset}", flush=True)
    done("convert")

    used_config = write_config(Path(config), checkpoint, work / "demo_config.yaml", precision)
    cfg = load_config(used_config)
    import torch

    from segframe.nnunet.runtime import resolve_precision

    train_precision = resolve_precision(cfg.train.precision, torch.device(device))  # what the trainer uses
    if not skip_train:
        stage("plan", "2/6 planning and preprocessing with nnU-Net (2d)")
        _run([_tool("nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", "2d", "-np",
              env["nnUNet_n_proc_DA"], "--verify_dataset_integrity"], env)
        done("plan")

        stage("train", f"3/6 training {used_config.name} (fold 0; nnU-Net prints one block per epoch)")
        _run([sys.executable, "-m", "segframe.cli", "train", str(dataset_id), "2d", "0",
              "--config", str(used_config), "-device", device, "--overwrite"], env)
        done("train")

    stage("predict", "4/6 predicting the test images")
    model_folder = find_results_folder(Path(env["nnUNet_results"]), dataset_id)
    predictions = work / "predictions"
    cmd = [sys.executable, "-m", "segframe.cli", "predict", "-i", str(dataset / "imagesTs"),
           "-o", str(predictions), "-m", str(model_folder), "-f", "0", "-chk", "checkpoint_final.pth",
           "-device", device, "--precision", precision,
           "--overwrite"]  # a re-run replaces its own predictions
    _run(cmd + ([] if tta else ["--disable_tta"]), env)
    done("predict")

    stage("evaluate", "5/6 evaluating inside the field of view")
    metrics = evaluate_folders(predictions, dataset / "labelsTs", dataset / "fovTs")
    save_results(metrics, work)
    print(format_table(metrics), flush=True)
    done("evaluate")

    stage("overlays", "6/6 writing overlays (image | truth | prediction | errors)")
    written = write_overlays(dataset, predictions, work / "overlays")
    print(f"{len(written)} overlays in {work / 'overlays'}", flush=True)
    done("overlays")

    weights = f"fine-tuned from {cfg.model.checkpoint_path}" if cfg.model.checkpoint_path else \
        "random initialisation: no pretrained weights, short CPU budget"
    summary = {
        "data": source,
        "dataset": str(dataset),
        "model": describe(cfg),
        "weights": weights,
        "config": str(used_config),
        "model_folder": str(model_folder),
        "device": device,
        "tta": tta,
        "train_precision": train_precision,
        "precision": precision,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "versions": _versions(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "stage_seconds": {k: round(v, 1) for k, v in times.items()},
        "metrics": metrics,
    }
    (work / "summary.json").write_text(json.dumps(json_safe(summary), indent=2) + "\n")
    (work / "summary.md").write_text(summary_markdown(summary))
    _say(f"done in {sum(times.values()):.0f} s; {weights}")
    for k, v in times.items():
        print(f"  {k:<9} {v:7.0f} s")
    print("mean inside FOV: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics["mean"].items()))
    print(f"summary: {work / 'summary.md'}; overlays: {work / 'overlays'}", flush=True)
    return summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="",
                   help="CHASE_DB1 or DRIVE folder; empty: generated vessel-like images")
    p.add_argument("--work", default="demo_output", help="folder for every output (default demo_output)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="segframe YAML (default configs/demo.yaml)")
    p.add_argument("--checkpoint", help="official backbone weights to fine-tune instead of random init")
    p.add_argument("--device", default="cpu", help="cpu, cuda or mps (default cpu)")
    p.add_argument("--tta", action="store_true", help="mirror test images at prediction (4x slower)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="the network's arithmetic in nnU-Net's final validation and the test predictions; "
                        "auto (default): bf16 on a CPU that computes bfloat16 natively (AVX512_BF16 or AMX), "
                        "fp32 elsewhere")
    p.add_argument("--skip-train", action="store_true",
                   help="reuse the model already trained under --work; predict, evaluate and summarise")


def _demo(args: argparse.Namespace) -> int:
    run_demo(args.data, args.work, args.config, args.checkpoint, args.device, args.tta, args.skip_train,
             args.precision)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `demo` subcommand."""
    p = subparsers.add_parser(
        "demo", help="end to end: convert, plan, train configs/demo.yaml, predict, evaluate, overlays",
        description=__doc__.split("\n\n")[0],
    )
    add_arguments(p)
    p.set_defaults(func=_demo)


def main(argv: list[str] | None = None) -> int:
    from segframe.cli import main as cli_main

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
