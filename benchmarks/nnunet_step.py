"""One nnU-Net training step split into data loading (augmentation) and model compute, segframe model.

Run: .venv/bin/python benchmarks/nnunet_step.py [--work demo_output] [--dataset ID]
     [--config configs/demo.yaml] [--steps 20] [--write]

Needs the dataset planned and preprocessed under WORK/nnUNet_preprocessed (`make demo` does it).
The trainer is nnUNetTrainerSegframe with the config's patch and batch size; "data" is the wait
for `next(dataloader_train)`, "model" is `train_step` (forward, loss, backward, clip, AdamW).
Measured with augmentation in the training process (nnUNet_n_proc_DA=0) and in background
workers (nnUNet_n_proc_DA=2), one after the other in one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, machine, publish  # noqa: E402


def measure(dataset: str, config: Path, steps: int, n_proc: int, device: torch.device) -> tuple[list, list]:
    from segframe.config import load_config
    from segframe.files import read_json
    from segframe.nnunet.plans import dataset_folder, write_plans
    from segframe.nnunet.trainer import nnUNetTrainerSegframe

    os.environ["nnUNet_n_proc_DA"] = str(n_proc)
    folder = dataset_folder(dataset)
    name, _ = write_plans(folder, "nnUNetPlans", "2d", load_config(config), "bench_step")
    plans = read_json(folder / f"{name}.json", "plans")
    plans["continue_training"] = False
    dataset_json = read_json(folder / "dataset.json", "dataset.json")
    trainer = nnUNetTrainerSegframe(plans, "2d", 0, dataset_json, device)
    trainer.on_train_start()
    trainer.network.train()
    data, model = [], []
    try:
        for i in range(steps + 2):
            start = time.perf_counter()
            batch = next(trainer.dataloader_train)
            loaded = time.perf_counter()
            trainer.train_step(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:  # the first two fill the workers' queues and warm up
                data.append(loaded - start)
                model.append(time.perf_counter() - loaded)
    finally:
        for loader in (trainer.dataloader_train, trainer.dataloader_val):
            if hasattr(loader, "_finish"):
                loader._finish()
    return data, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(ROOT / "demo_output"))
    parser.add_argument("--dataset", help="dataset id or name (default: the one preprocessed under WORK)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--write", action="store_true", help="also update this section of BENCHMARKS.md")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    work = Path(args.work).resolve()
    os.environ["nnUNet_raw"] = str(work / "nnUNet_raw")
    os.environ["nnUNet_preprocessed"] = str(work / "nnUNet_preprocessed")
    if not args.dataset:
        found = sorted(p.name for p in (work / "nnUNet_preprocessed").glob("Dataset*"))
        if not found:
            parser.error(f"no preprocessed dataset under {work}: run make demo (or vessels.py) first")
        args.dataset = found[0]
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    with tempfile.TemporaryDirectory() as results:
        os.environ["nnUNet_results"] = results
        for n_proc in (0, 2):
            data, model = measure(args.dataset, Path(args.config), args.steps, n_proc, device)
            rows.append((n_proc, statistics.median(data), statistics.median(model), sum(data), sum(model)))
    from segframe.config import load_config

    cfg = load_config(args.config)
    lines = [
        f"## One nnU-Net training step: data vs model ({cfg.model.backbone.name} {cfg.model.backbone_size} + "
        f"{cfg.model.decoder.name}, patch {cfg.train.patch_size}, batch {cfg.train.batch_size}, dataset "
        f"{args.dataset}, median of {args.steps} steps)",
        "",
        machine(device),
        "",
        "| augmentation | data wait (ms) | model step (ms) | data share of the step |",
        "|---|---:|---:|---:|",
    ]
    for n_proc, data, model, data_total, model_total in rows:
        where = "in the training process (nnUNet_n_proc_DA=0)" if n_proc == 0 else \
            f"{n_proc} background workers (nnUNet_n_proc_DA={n_proc})"
        lines.append(f"| {where} | {1e3 * data:.0f} | {1e3 * model:.0f} | "
                     f"{100 * data_total / (data_total + model_total):.0f}% |")
    publish(f"nnunet-step-{device.type}", lines, args.write)


if __name__ == "__main__":
    main()
