"""Where the time goes: one training step and one predicted image, split by part of the network (CPU).

Run: .venv/bin/python benchmarks/profile_parts.py [--work bench_output] [-m RESULTS_FOLDER ...]
     [-i IMAGE] [--steps 3] [--step_size 0.5] [--write]

Without -m, every results folder vessels.py left under WORK, and its first test image. For each
nnU-Net results folder (segframe's, or the U-Net that vessels.py trains, found through
benchmarks/trainers; folders this machine trained, so their checkpoints are trusted):
- train: training steps on random input at the plans' patch and batch size (forward, cross-entropy on
  every output, backward, AdamW; the U-Net with its deep supervision on, as nnU-Net trains it), profiled
  after one warm-up step. Forward time of a part is the time inside its module (each top-level child of
  the network; a ViT backbone's `features` too); backward time of a part is the time of the autograd
  nodes its forward created (torch.profiler links them by sequence number); `loss` and `optimizer`
  (AdamW's step) are timed as ranges. `other` is the rest: the model's own code between parts
  (normalisation, padding), zeroing the gradients, the loss's backward.
- predict: one image through nnU-Net's predictor as `segframe predict --disable_tta` runs it
  (preprocessing, sliding window with Gaussian weighting, resampling back); `other` is nnU-Net's own work.
Times are under the profiler (it adds a little per op), so read shares rather than absolute numbers;
`wall` is the same work without the profiler. The top operators by self CPU time follow each table.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import statistics
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, machine, publish  # noqa: E402

PREFIX = "part::"


def load(folder: Path, step_size: float):
    """nnU-Net's predictor of fold 0 of a results folder, no mirroring."""
    from segframe.errors import SegframeError
    from segframe.nnunet.predict import Predictor
    from segframe.nnunet.results import ResultsFolder

    try:
        results = ResultsFolder(folder)
    except SegframeError:  # not segframe's: nnU-Net's own loader, trainer from benchmarks/trainers
        os.environ["nnUNet_extTrainer"] = str(Path(__file__).parent / "trainers")
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        predictor = nnUNetPredictor(tile_step_size=step_size, use_mirroring=False, device=torch.device("cpu"),
                                    perform_everything_on_device=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(folder), (0,), "checkpoint_final.pth")
        return predictor
    return Predictor.from_results(results, folds=[0], device="cpu", step_size=step_size, mirroring=False,
                                  trust_checkpoint=True).nnunet


def mark_parts(network: torch.nn.Module) -> list[str]:
    """Wrap every top-level child's forward (and a backbone's `features`) in a profiler range."""
    names = []
    for name, child in network.named_children():
        for method in ("forward", "features"):
            if hasattr(child, method):
                fn = getattr(child, method)
                setattr(child, method, functools.wraps(fn)(functools.partial(_ranged, fn, PREFIX + name)))
        names.append(name)
    return names


def _ranged(fn, label, *args, **kwargs):
    with record_function(label):
        return fn(*args, **kwargs)


def split(events, names: list[str]) -> dict[str, float]:
    """ms per part, forward and backward, from a profile's events; `total` is the profiled wall time."""
    spans = defaultdict(list)
    for e in events:
        if e.name.startswith(PREFIX):
            spans[e.name[len(PREFIX):]].append((e.time_range.start, e.time_range.end))
    outer = {}
    for name, ranges in spans.items():  # nested ranges of one part (features calling forward) count once
        ranges.sort()
        merged = [list(ranges[0])]
        for start, end in ranges[1:]:
            if start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        outer[name] = merged
    result = {f"{n} forward" if n in names else n: sum(e - s for s, e in outer[n]) / 1e3 for n in outer}
    owner = {}
    for e in events:  # the forward op that created each autograd node, by the part it ran in
        if e.sequence_nr >= 0 and not e.name.startswith("autograd::") and e.sequence_nr not in owner:
            t = e.time_range.start
            owner[e.sequence_nr] = next((n for n, rs in outer.items() if any(a <= t <= b for a, b in rs)),
                                        None)
    backward = defaultdict(float)
    for e in events:
        if e.name.startswith("autograd::engine::evaluate_function:"):
            part = owner.get(e.sequence_nr)
            if part is not None:
                backward[part] += e.cpu_time_total / 1e3
    if backward:
        result.update({f"{n} backward": backward.get(n, 0.0) for n in names})
    starts = [e.time_range.start for e in events]
    ends = [e.time_range.end for e in events]
    result["total"] = (max(ends) - min(starts)) / 1e3
    result["other"] = result["total"] - sum(v for k, v in result.items() if k != "total")
    return result


def train_step(network, optimizer, batch: int, channels: int, patch: list[int], classes: int) -> None:
    x = torch.randn(batch, channels, *patch)
    target = torch.randint(0, classes, (batch, 1, *patch)).float()
    outputs = network(x)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    with record_function(PREFIX + "loss"):
        loss = sum(F.cross_entropy(o, F.interpolate(target, size=o.shape[2:], mode="nearest")[:, 0].long())
                   for o in outputs)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    with record_function(PREFIX + "optimizer"):
        optimizer.step()


def folder_label(folder: Path) -> str:
    """A results folder's row name: its plans name without nnU-Net's and the benchmark's prefixes."""
    return re.sub(r"^nnUNetPlans_(segframe_)?(bench_)?", "", folder.name.split("__")[1])


def profile_folder(folder: Path, image: Path, steps: int, step_size: float) -> tuple[list, list]:
    """The table lines and the top-operator lines of one results folder."""
    predictor = load(folder, step_size)
    network = predictor.network
    names = mark_parts(network)
    cm = predictor.configuration_manager
    channels = len(predictor.dataset_json["channel_names"])
    classes = len(predictor.dataset_json["labels"])
    decoder = getattr(network, "decoder", None)
    if hasattr(decoder, "deep_supervision"):  # nnU-Net's U-Net trains with deep supervision
        decoder.deep_supervision = True
    network.train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    run = functools.partial(train_step, network, optimizer, cm.batch_size, channels, cm.patch_size, classes)
    run()  # warm-up
    wall = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        wall.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU]) as train_prof:
        run()
    train = split(train_prof.events(), names)
    if hasattr(decoder, "deep_supervision"):
        decoder.deep_supervision = False
    network.eval()
    data, props = predictor.plans_manager.image_reader_writer_class().read_images([str(image)])
    start = time.perf_counter()
    predictor.predict_single_npy_array(data, props, None, None, False)
    predict_wall = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU]) as predict_prof:
        predictor.predict_single_npy_array(data, props, None, None, False)
    predict = split(predict_prof.events(), names)
    label = folder_label(folder)
    patch, image_size = "x".join(map(str, cm.patch_size)), "x".join(map(str, data.shape[-2:]))
    rows = [f"| {label} | train step ({cm.batch_size}x{patch}) | {statistics.median(wall) * 1e3:.0f} | "
            f"{train['total']:.0f} | {_shares(train)} |",
            f"| {label} | predict one {image_size} image (tile step {step_size:g}) | "
            f"{predict_wall * 1e3:.0f} | {predict['total']:.0f} | {_shares(predict)} |"]
    tops = [f"{label}, train step:", _top(train_prof), f"{label}, predict:", _top(predict_prof)]
    return rows, tops


def _shares(result: dict) -> str:
    parts = [f"{k} {v / result['total']:.0%}" for k, v in result.items()
             if k not in ("total", "other") and v / result["total"] >= 0.005]
    return ", ".join([*parts, f"other {result['other'] / result['total']:.0%}"])


def _top(prof, rows: int = 8) -> str:
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=50)


def folder_arguments(parser: argparse.ArgumentParser) -> None:
    """--work, -m and -i: the trained results folders and the image a benchmark reads (also window.py)."""
    parser.add_argument("--work", default=str(ROOT / "bench_output"), help="vessels.py's --work")
    parser.add_argument("-m", dest="folders", action="append", metavar="RESULTS_FOLDER")
    parser.add_argument("-i", dest="image", help="one image the folders can predict")


def folders_and_image(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list[Path], Path]:
    """The results folders (-m, or every one vessels.py left under --work) and the image (-i, or the
    first test image there); nnU-Net's paths set from --work; a parser error for what is missing."""
    work = Path(args.work).resolve()
    for name in ("raw", "preprocessed", "results"):  # nnU-Net warns without them
        os.environ.setdefault(f"nnUNet_{name}", str(work / f"nnUNet_{name}"))
    found = args.folders or sorted(work.glob("nnUNet_results/Dataset*/*__*__*"))
    folders = [Path(f).resolve() for f in found]
    if not folders:
        parser.error(f"no results folder under {work}/nnUNet_results: run vessels.py or pass -m")
    if args.image is None:
        images = sorted(work.glob("nnUNet_raw/Dataset*/imagesTs/*"))
        if not images:
            parser.error(f"no test image under {work}/nnUNet_raw: pass -i")
        args.image = str(images[0])
    for folder in folders:
        if not (folder / "fold_0" / "checkpoint_final.pth").is_file():
            parser.error(f"{folder}: no fold_0/checkpoint_final.pth (train to the end first)")
    if not Path(args.image).is_file():
        parser.error(f"{args.image}: no such image")
    return folders, Path(args.image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    folder_arguments(parser)
    parser.add_argument("--steps", type=int, default=3, help="unprofiled training steps timed for `wall`")
    parser.add_argument("--step_size", type=float, default=0.5, help="nnU-Net's tile_step_size")
    parser.add_argument("--write", action="store_true", help="also update this section of BENCHMARKS.md")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    folders, image = folders_and_image(parser, args)
    lines = [f"## Where the time goes: one training step and one predicted image, by part (torch.profiler, "
             f"median of {args.steps} unprofiled steps for wall)", "", machine("cpu"), "",
             "| model | work | wall (ms) | profiled (ms) | share of the profiled time |",
             "|---|---|---:|---:|---|"]
    tops = []
    for folder in folders:
        rows, top = profile_folder(folder, image, args.steps, args.step_size)
        lines += rows
        tops += top
    print("\n".join(tops))
    publish("profile-parts-cpu", lines, args.write)


if __name__ == "__main__":
    main()
