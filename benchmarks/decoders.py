"""Every installed decoder on DINOv3-S and DINOv2-S: forward+backward time and saved-activation memory.

Run: .venv/bin/python benchmarks/decoders.py [--input 224] [--batch 2] [--repeats 5] [--write]

One model per (backbone, decoder) at its default parameters, randomly initialised, identity neck,
default upsampler, 2 classes. Models are timed interleaved (one step of each per round, after a
warm-up round), so drifting machine load hits all of them alike; the table gives medians and the
ratio to UperNet on the same backbone. A head that owns its loss is timed through that loss (on a
random target), the others through cross-entropy on the logits. Memory: the bytes autograd saves
for backward in one step on CPU (peak CUDA memory on a GPU), as in overhead.py.
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
from segframe.plugins import get_registry

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, memory_label, peak_bytes, publish, timed  # noqa: E402

BACKBONES = {"dinov3": "DINOv3-S", "dinov2": "DINOv2-S"}


def build(backbone: str, decoder: str, device: torch.device) -> ViTSegModel:
    cfg = validate_config({"model": {"backbone": backbone, "backbone_size": "small", "decoder": decoder}})
    return ViTSegModel(cfg, in_channels=3, num_classes=2).to(device).train()


def step_of(model: ViTSegModel, x: torch.Tensor, y: torch.Tensor):
    def step() -> None:
        model.zero_grad(set_to_none=True)
        out = model(x)
        loss = model.training_loss(out, y[:, None])[0] if model.owns_loss else F.cross_entropy(out, y)
        loss.backward()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=int, default=224)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decoders", nargs="+", help="default: every installed decoder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--write", action="store_true", help="also update this section of BENCHMARKS.md")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    decoders = args.decoders or list(get_registry().decoders())
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, args.input, args.input, device=device)
    y = torch.randint(0, 2, (args.batch, args.input, args.input), device=device)
    models = {(b, d): build(b, d, device) for b in BACKBONES for d in decoders}
    steps = {key: step_of(m, x, y) for key, m in models.items()}
    for step in steps.values():  # warm-up
        step()
    times: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    for r in range(args.repeats):
        for key, step in steps.items():
            times[key].append(timed(step, device))
        print(f"round {r + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    memory = {key: peak_bytes(step, device) / 2**20 for key, step in steps.items()}

    lines = [
        f"## Decoders: forward+backward at {args.batch}x3x{args.input}x{args.input}, 2 classes, "
        f"default parameters, median of {args.repeats}, interleaved",
        "",
        machine(device),
        "",
        f"| backbone | decoder | head params (M) | step (ms) | vs UperNet | {memory_label(device)} |",
        "|---|---|---|---|---|---|",
    ]
    for b, label in BACKBONES.items():
        ref = statistics.median(times[(b, "upernet")]) if (b, "upernet") in times else None
        for d in decoders:
            med = statistics.median(times[(b, d)])
            params = sum(p.numel() for p in models[(b, d)].decoder.parameters()) / 1e6
            ratio = f"{med / ref:.2f}x" if ref else "-"
            mem = memory[(b, d)]
            lines.append(f"| {label} | {d} | {params:.2f} | {med * 1e3:.0f} | {ratio} | {mem:.0f} |")
    sizes = ", ".join(
        f"{label} {sum(p.numel() for p in models[(b, decoders[0])].backbone.parameters()) / 1e6:.1f} M"
        for b, label in BACKBONES.items())
    lines += ["", f"Head parameters exclude the backbone ({sizes}) and the upsampler."]
    publish("decoders", lines, args.write)


if __name__ == "__main__":
    main()
