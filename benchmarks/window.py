"""nnU-Net's sliding window on the CPU: its producer thread against SegframePredictor's one thread.

Run: .venv/bin/python benchmarks/window.py [--work bench_output] [-m RESULTS_FOLDER ...] [-i IMAGE]
     [--rounds 3] [--write]

For each results folder (without -m, every one vessels.py left under WORK), one image (the first test
image) is predicted as `segframe predict --disable_tta` does (preprocessing, sliding window at tile step
0.5 with Gaussian weighting, resampling back) by two predictors sharing one network: nnU-Net's
`nnUNetPredictor`, which cuts the tiles in a producer thread, and `segframe.nnunet.window.SegframePredictor`,
which cuts them in the predicting thread. They alternate for `--rounds` rounds after one warm-up each;
the table gives each one's median and the ratio of the medians. segframe folders run in fp32 and, on a CPU
with native bfloat16, also with the forward in bf16 (`--precision bf16`); the U-Net in fp32 (nnU-Net has
no CPU bf16). The two predictors' label maps are checked to be equal.

A second table follows nnU-Net's final validation loop on the same image, preprocessed, four times per
round: the window, then the logits handed (a torch tensor) to a spawned export pool of nnU-Net's size,
with `SegframePredictor` and with the trainer's `ValidationPredictor` (logits already in shared memory),
alternating; it gives the median seconds of the windows after a round's first (the pool is idle before
the first hand-over) and their ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, publish  # noqa: E402
from profile_parts import folder_arguments, folder_label, folders_and_image, load  # noqa: E402


def pair(folder: Path, precision: str, classes: tuple[type, type]):
    """Predictors of the two `classes` for fold 0 of `folder`, sharing one network."""
    from segframe.nnunet.runtime import bf16_network

    loaded = load(folder, 0.5)
    if precision == "bf16":
        bf16_network(loaded.network)
    made = []
    for cls in classes:
        with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net's note on perform_everything_on_device
            predictor = cls(tile_step_size=0.5, use_mirroring=False, device=torch.device("cpu"),
                            perform_everything_on_device=False, allow_tqdm=False)
        predictor.manual_initialization(loaded.network, loaded.plans_manager, loaded.configuration_manager,
                                        loaded.list_of_parameters, loaded.dataset_json, loaded.trainer_name,
                                        loaded.allowed_mirroring_axes)
        made.append(predictor)
    return made


def table_line(folder: Path, precision: str, times: dict[str, list[float]]) -> str:
    """A table line: the median seconds of the two predictors in `times` and their ratio (second/first)."""
    first, second = (statistics.median(seconds) for seconds in times.values())
    return f"| {folder_label(folder)} | {precision} | {first:.2f} | {second:.2f} | {second / first:.2f} |"


def measure(folder: Path, precision: str, image: Path, rounds: int) -> str:
    """One table line: the median seconds of both predictors on `image` and their ratio."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from segframe.nnunet.window import SegframePredictor

    stock, segframe = pair(folder, precision, (nnUNetPredictor, SegframePredictor))
    data, props = stock.plans_manager.image_reader_writer_class().read_images([str(image)])
    masks = [p.predict_single_npy_array(data, props, None, None, False) for p in (stock, segframe)]
    if not np.array_equal(*masks):
        raise SystemExit(f"{folder.name}: the two predictors' label maps differ")
    times: dict[str, list[float]] = {"stock": [], "segframe": []}
    for _ in range(rounds):
        for name, predictor in (("stock", stock), ("segframe", segframe)):
            start = time.perf_counter()
            predictor.predict_single_npy_array(data, props, None, None, False)
            times[name].append(time.perf_counter() - start)
        print(f"{folder.name} {precision}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
              flush=True)
    return table_line(folder, precision, times)


def validation_round(predictor, data: torch.Tensor, props: dict, images: int, out: str) -> list[float]:
    """nnU-Net's final validation loop over `images` copies of one preprocessed image: the window, then the
    logits handed to a spawned export pool of nnU-Net's default size; the seconds of each window."""
    from nnunetv2.configuration import default_num_processes
    from nnunetv2.inference.export_prediction import export_prediction_from_logits

    seconds, exports = [], []
    with multiprocessing.get_context("spawn").Pool(default_num_processes) as pool:
        for i in range(images):
            start = time.perf_counter()
            logits = predictor.predict_sliding_window_return_logits(data).cpu()
            seconds.append(time.perf_counter() - start)
            exports.append(pool.starmap_async(export_prediction_from_logits, (
                (logits, props, predictor.configuration_manager, predictor.plans_manager,
                 predictor.dataset_json, f"{out}/case_{i}", False),)))
        for export in exports:
            export.get()
    return seconds


def measure_validation(folder: Path, precision: str, image: Path, rounds: int) -> str:
    """One line of the second table: windows after a validation round's first, both predictors' medians."""
    from segframe.nnunet.window import SegframePredictor, ValidationPredictor

    plain, validation = pair(folder, precision, (SegframePredictor, ValidationPredictor))
    raw, raw_props = plain.plans_manager.image_reader_writer_class().read_images([str(image)])
    preprocessor = plain.configuration_manager.preprocessor_class(verbose=False)
    data, _, props = preprocessor.run_case_npy(raw, None, raw_props, plain.plans_manager,
                                               plain.configuration_manager, plain.dataset_json)
    data = torch.from_numpy(data)
    times: dict[str, list[float]] = {"plain": [], "validation": []}
    with tempfile.TemporaryDirectory() as out:
        for _ in range(rounds):
            for name, predictor in (("plain", plain), ("validation", validation)):
                seconds = validation_round(predictor, data, props, 4, out)
                times[name] += seconds[1:]
                print(f"{folder.name} {precision} {name}: " + ", ".join(f"{s:.2f}" for s in seconds),
                      flush=True)
    return table_line(folder, precision, times)


def main() -> None:
    from segframe.nnunet.runtime import cpu_threads, native_bf16

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    folder_arguments(parser)
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds per predictor")
    parser.add_argument("--write", action="store_true", help="also update this section of BENCHMARKS.md")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    warnings.filterwarnings("ignore")
    folders, image = folders_and_image(parser, args)
    torch.set_num_threads(cpu_threads())  # as `segframe predict -device cpu` runs
    lines = [f"## nnU-Net's sliding window on the CPU: producer thread vs one thread (median of "
             f"{args.rounds} alternating rounds)", "", machine("cpu"), "",
             f"One image ({image.name}) predicted as `segframe predict --disable_tta` does, tile step "
             "0.5; `nnU-Net` cuts the tiles in its producer thread, `one thread` is segframe's "
             "SegframePredictor (the same label map).", "",
             "| model | forward | nnU-Net (s) | one thread (s) | ratio |", "|---|---|---:|---:|---:|"]
    precisions = {folder: ("fp32", "bf16") if (folder / "segframe.yaml").is_file() and native_bf16() else
                  ("fp32",) for folder in folders}
    for folder in folders:
        for precision in precisions[folder]:
            lines.append(measure(folder, precision, image, args.rounds))
    lines += ["", "nnU-Net's final validation loop on the CPU: the same image, preprocessed, 4 times per "
              "round, each image's logits handed to a spawned export pool; seconds per window after a "
              "round's first (median); `SegframePredictor` hands nnU-Net a tensor the pool's thread copies "
              "to shared memory, `ValidationPredictor` (the trainer's) one already there.", "",
              "| model | forward | SegframePredictor (s) | ValidationPredictor (s) | ratio |",
              "|---|---|---:|---:|---:|"]
    for folder in folders:
        for precision in precisions[folder]:
            lines.append(measure_validation(folder, precision, image, args.rounds))
    publish("window-thread-cpu", lines, args.write)


if __name__ == "__main__":
    main()
