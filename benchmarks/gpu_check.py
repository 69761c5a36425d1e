"""The GPU check: one command that, on a CUDA machine, checks and measures what the CPU machines cannot.

Run: .venv/bin/python benchmarks/gpu_check.py [--data ../shared/data/CHASEDB1] [--work gpu_output]
     [--iterations 300] [--write]

1. the suite's CUDA-marked tests (`pytest -m cuda`: every head on the GPU against the CPU, the autocast
   precisions, torch.compile against eager, a results folder predicted on the GPU);
2. the demo config (configs/demo.yaml) trained on CHASE_DB1 for `--iterations` iterations with
   nnU-Net's compile on and off, in bf16 and fp16 (`train.precision`): wall time and the final pseudo Dice;
3. one training step's time and peak memory of segframe ViT-S/B/L (DINOv3 + UperNet, the demo's head)
   against nnU-Net's default 2D U-Net of the same plans, at 512x512 input and at the 192x192 patch;
4. one image predicted with `segframe predict`;
and writes the tables as section `gpu-check-cuda` of BENCHMARKS.md (`--write`). About 10 minutes on one
recent GPU. Without CUDA it says so and exits 0: nothing here can run on the CPU.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, machine, peak_bytes, publish, timed  # noqa: E402

SEGFRAME = [sys.executable, "-m", "segframe.cli"]


def run(cmd: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    done = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"gpu_check: {' '.join(map(str, cmd))} failed ({done.returncode}):\n"
                         f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done, seconds


def cuda_tests(env: dict[str, str]) -> list[str]:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:xdist",
                           str(ROOT / "tests" / "test_cuda.py")], env=env, capture_output=True, text=True,
                          cwd=ROOT)
    summary = (done.stdout.strip().splitlines() or ["no output"])[-1]
    print(done.stdout[-3000:], flush=True)
    return [f"`pytest -m cuda`: {summary}" + ("" if done.returncode == 0 else " (FAILED)")]


def prepare(data: Path, work: Path) -> tuple[dict[str, str], str]:
    """CHASE_DB1 converted and planned under `work`, as the demo does; (environment, dataset name)."""
    env = dict(os.environ)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[var] = str(work / var)
        (work / var).mkdir(parents=True, exist_ok=True)
    name = "Dataset502_CHASEDB1"
    if not (work / "nnUNet_raw" / name).is_dir():
        run([*SEGFRAME, "data", "chase", "--source", data, "--raw", work / "nnUNet_raw"], env)
    if not (work / "nnUNet_preprocessed" / name / "nnUNetPlans.json").is_file():
        run([str(Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"), "-d", "502", "-c", "2d"], env)
    return env, name


def training(env: dict[str, str], work: Path, iterations: int) -> list[str]:
    """The demo config for `iterations` iterations, compile on/off x bf16/fp16 (each in its own plans)."""
    import yaml

    base = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    epochs = max(1, iterations // 50)
    lines = ["| compile | precision | iterations | wall (s) | s / iteration | final pseudo Dice |",
             "|---|---|---:|---:|---:|---:|"]
    for compile_on in (False, True):
        for precision in ("bf16", "fp16"):
            tag = f"gpu_{'compiled' if compile_on else 'eager'}_{precision}"
            cfg = {**base, "train": {**base.get("train", {}), "precision": precision, "num_epochs": epochs,
                                     "num_iterations_per_epoch": 50, "num_val_iterations_per_epoch": 5}}
            config = work / f"{tag}.yaml"
            config.write_text(yaml.safe_dump(cfg))
            done, seconds = run([*SEGFRAME, "train", "502", "2d", "0", "--config", config, "-device", "cuda",
                                 "--overwrite"], {**env, "nnUNet_compile": "t" if compile_on else "f"})
            dice = re.findall(r"Pseudo dice \[.*?([0-9.]+)\)?\]", done.stdout)
            lines.append(f"| {'on' if compile_on else 'off'} | {precision} | {epochs * 50} | {seconds:.0f} | "
                         f"{seconds / (epochs * 50):.3f} | {dice[-1] if dice else '?'} |")
    return lines


def step_table(env: dict[str, str], name: str, repeats: int = 10) -> list[str]:
    """One AdamW step (batch 2) of segframe ViT-S/B/L and nnU-Net's default 2D U-Net: time and peak memory."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from segframe.config import validate_config
    from segframe.model import ViTSegModel

    plans = PlansManager(str(Path(env["nnUNet_preprocessed"]) / name / "nnUNetPlans.json"))
    conf = plans.get_configuration("2d")
    device = torch.device("cuda")

    def unet():
        return get_network_from_plans(conf.network_arch_class_name, conf.network_arch_init_kwargs,
                                      conf.network_arch_init_kwargs_req_import, 3, 2,
                                      deep_supervision=False)

    def vit(size: str):
        cfg = {"model": {"backbone": "dinov3", "backbone_size": size, "decoder": {"name": "upernet"}}}
        return ViTSegModel(validate_config(cfg), in_channels=3, num_classes=2)

    lines = ["| network | input | params (M) | step (ms) | vs U-Net | peak memory (MiB) |",
             "|---|---|---:|---:|---:|---:|"]
    for side in (512, 192):
        x = torch.rand(2, 3, side, side, device=device)
        y = torch.randint(0, 2, (2, side, side), device=device)
        measured = {}
        for label, make in [("nnU-Net 2D U-Net", unet), *((f"segframe ViT-{s[0].upper()}", lambda s=s: vit(s))
                                                          for s in ("small", "base", "large"))]:
            model = make().to(device).train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def step(model=model, optimizer=optimizer, x=x, y=y):
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = model(x)
                torch.nn.functional.cross_entropy(out.float(), y).backward()
                optimizer.step()

            memory = peak_bytes(step, device)
            times = [timed(step, device) for _ in range(repeats)]
            measured[label] = statistics.median(times)
            params = sum(p.numel() for p in model.parameters()) / 1e6
            ratio = measured[label] / measured["nnU-Net 2D U-Net"]
            lines.append(f"| {label} | {side}x{side} | {params:.1f} | {1e3 * measured[label]:.1f} | "
                         f"{ratio:.2f} | {memory / 2**20:.0f} |")
            del model, optimizer
            torch.cuda.empty_cache()
    return lines


def prediction(env: dict[str, str], work: Path, name: str) -> list[str]:
    results = next((Path(env["nnUNet_results"]) / name).glob("*gpu_eager_bf16*"))
    images = work / "one_image"
    images.mkdir(exist_ok=True)
    source = next((Path(env["nnUNet_raw"]) / name / "imagesTs").glob("*.png"))
    (images / source.name).write_bytes(source.read_bytes())
    _, seconds = run([*SEGFRAME, "predict", "-i", images, "-o", work / "predicted", "-m", results, "-f", "0",
                      "-device", "cuda", "--overwrite"], env)
    return [f"`segframe predict` of one {source.name} on the GPU (mirroring on): {seconds:.1f} s"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "CHASEDB1"))
    parser.add_argument("--work", default=str(ROOT / "gpu_output"))
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--write", action="store_true",
                        help="also write section gpu-check-cuda of BENCHMARKS.md")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: needs a CUDA GPU and none is visible here; nothing was run (on the CPU, "
              "`make test` and the other benchmarks are the checks)")
        return 0
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env, name = prepare(Path(args.data), work)
    lines = ["## GPU check: CUDA tests, demo training (compile x precision), step time and memory against "
             "nnU-Net's U-Net, one prediction", "", machine("cuda"), ""]
    lines += cuda_tests(env) + [""]
    lines += training(env, work, args.iterations) + [""]
    lines += step_table(env, name) + [""]
    lines += prediction(env, work, name)
    publish("gpu-check-cuda", lines, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
