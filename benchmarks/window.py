"""nnU-Net's sliding window on the CPU: its producer thread against SegframePredictor's one thread.

Run: .venv/bin/python benchmarks/window.py [--work bench_output] [-m RESULTS_FOLDER ...] [-i IMAGE]
     [--rounds 3] [--write]

For each results folder (without -m, every one chase_dice.py left under WORK), one image (the first test
image) is predicted as `segframe predict --disable_tta` does (preprocessing, sliding window at tile step
0.5 with Gaussian weighting, resampling back) by two predictors sharing one network: nnU-Net's
`nnUNetPredictor`, which cuts the tiles in a producer thread, and `segframe.nnunet.window.SegframePredictor`,
which cuts them in the predicting thread. They alternate for `--rounds` rounds after one warm-up each;
the table gives each one's median and the ratio of the medians. segframe folders run in fp32 and, on a CPU
with native bfloat16, also with the forward in bf16 (`--precision bf16`); the U-Net in fp32 (nnU-Net has
no CPU bf16). The two predictors' label maps are checked to be equal.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, publish  # noqa: E402
from profile_parts import folder_arguments, folder_label, folders_and_image, load  # noqa: E402


def pair(folder: Path, precision: str):
    """nnU-Net's predictor and SegframePredictor of fold 0 of `folder`, sharing one network."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from segframe.nnunet.predict import bf16_network
    from segframe.nnunet.window import SegframePredictor

    loaded = load(folder, 0.5)
    if precision == "bf16":
        bf16_network(loaded.network)
    made = []
    for cls in (nnUNetPredictor, SegframePredictor):
        with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net's note on perform_everything_on_device
            predictor = cls(tile_step_size=0.5, use_mirroring=False, device=torch.device("cpu"),
                            perform_everything_on_device=False, allow_tqdm=False)
        predictor.manual_initialization(loaded.network, loaded.plans_manager, loaded.configuration_manager,
                                        loaded.list_of_parameters, loaded.dataset_json, loaded.trainer_name,
                                        loaded.allowed_mirroring_axes)
        made.append(predictor)
    return made


def measure(folder: Path, precision: str, image: Path, rounds: int) -> str:
    """One table line: the median seconds of both predictors on `image` and their ratio."""
    stock, segframe = pair(folder, precision)
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
    stock_s, segframe_s = (statistics.median(times[k]) for k in ("stock", "segframe"))
    return (f"| {folder_label(folder)} | {precision} | {stock_s:.2f} | {segframe_s:.2f} | "
            f"{segframe_s / stock_s:.2f} |")


def main() -> None:
    from segframe.nnunet.cli import cpu_threads
    from segframe.nnunet.predict import native_bf16

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
    for folder in folders:
        segframe_folder = (folder / "segframe.yaml").is_file()
        for precision in ("fp32", "bf16") if segframe_folder and native_bf16() else ("fp32",):
            lines.append(measure(folder, precision, image, args.rounds))
    publish("window-thread-cpu", lines, args.write)


if __name__ == "__main__":
    main()
