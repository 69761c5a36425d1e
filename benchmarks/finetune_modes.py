"""Full fine-tuning vs LoRA vs frozen backbone: trainable parameters, training memory and step time.

Run: .venv/bin/python benchmarks/finetune_modes.py [--sizes small base large] [--input 224] [--write]

DINOv2 + UperNet (hidden 256, identity neck, bilinear upsampler), one AdamW step per timing
(forward, backward, optimizer). The three modes of a size are timed interleaved, one step of
each per round; the table gives medians. Memory: see common.peak_bytes; "optimizer + grads"
is 12 bytes per trainable parameter (fp32 gradient and AdamW's two moments).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from segframe.config import validate_config
from segframe.model import ViTSegModel

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, memory_label, peak_bytes, publish, timed  # noqa: E402

MODES = {
    "full fine-tuning": {"model": {}, "lora": {"enabled": False}},
    "LoRA r=8 on qkv": {"model": {}, "lora": {"enabled": True, "r": 8}},
    "frozen backbone": {"model": {"freeze_backbone": True}, "lora": {"enabled": False}},
}


def build(size: str, mode: dict, classes: int) -> ViTSegModel:
    cfg = validate_config({
        "model": {"backbone": "dinov2", "backbone_size": size,
                  "decoder": {"name": "upernet", "hidden_size": 256}, "neck": "identity",
                  "upsampler": "bilinear", **mode["model"]},
        "lora": mode["lora"],
    })
    return ViTSegModel(cfg, in_channels=3, num_classes=classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["small", "base", "large"])
    parser.add_argument("--input", type=int, default=224, help="square input side (multiple of 14)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--write", action="store_true", help="also update this section of BENCHMARKS.md")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    x = torch.rand(args.batch, 3, args.input, args.input, device=device)
    y = torch.randint(0, args.classes, (args.batch, args.input, args.input), device=device)
    lines = [
        f"## Fine-tuning modes: DINOv2 + UperNet 256, input {args.batch}x3x{args.input}x{args.input}, "
        f"AdamW step, median of {args.repeats}",
        "",
        machine(device),
        "",
        f"| size | mode | trainable (M) | total (M) | {memory_label(device)} | optimizer + grads (MiB) | "
        "step (ms) | vs full |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for size in args.sizes:
        torch.manual_seed(0)
        runs = {}
        for name, mode in MODES.items():
            model = build(size, mode, args.classes).to(device).train()
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4)

            def step(model=model, opt=opt):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()

            step()  # warm-up; creates the optimizer state
            runs[name] = (model, step, sum(p.numel() for p in params), peak_bytes(step, device))
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, (_, step, _, _) in runs.items():
                times[name].append(timed(step, device))
        full = statistics.median(times["full fine-tuning"])
        for name, (model, _, trainable, memory) in runs.items():
            total = sum(p.numel() for p in model.parameters())
            median = statistics.median(times[name])
            lines.append(f"| {size} | {name} | {trainable / 1e6:.2f} | {total / 1e6:.1f} | "
                         f"{memory / 2**20:.0f} | {12 * trainable / 2**20:.0f} | {1e3 * median:.0f} | "
                         f"{median / full:.2f} |")
        print("\n".join(lines[-3:]), flush=True)
        del runs
    publish(f"finetune-modes-{device.type}", lines, args.write)


if __name__ == "__main__":
    main()
