"""Overhead of ViTSegModel: forward+backward against the same backbone and head called by hand, and
against transformers' UperNetForSemanticSegmentation with a DINOv2 backbone of the same size.

Run: .venv/bin/python benchmarks/overhead.py [--size small] [--input 224] [--batch 2] [--repeats 10] [--write]

All models are randomly initialised (nothing is downloaded). Variants are timed interleaved
(one step of each per round) so that drifting machine load hits all of them alike; the table
gives medians. Memory: on CUDA the peak of torch.cuda.max_memory_allocated over a step; on
CPU the bytes of the tensors autograd saves for backward in one step (distinct storages),
which is what dominates training memory and is deterministic.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Dinov2Config, UperNetConfig, UperNetForSemanticSegmentation

from segframe.config import validate_config
from segframe.model import ViTSegModel

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, memory_label, peak_bytes, publish, timed  # noqa: E402

# DINOv2 sizes as transformers' Dinov2Config: hidden, layers, heads
HF_SIZES = {"small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}


def segframe_model(size: str, classes: int, neck: str, upsampler: str) -> ViTSegModel:
    cfg = validate_config({"model": {
        "backbone": "dinov2", "backbone_size": size,
        "decoder": {"name": "upernet", "hidden_size": 512}, "neck": neck, "upsampler": upsampler,
    }})
    return ViTSegModel(cfg, in_channels=3, num_classes=classes)


class ByHand(torch.nn.Module):
    """The same backbone and head modules as `model`, called directly: normalise, ViT blocks,
    head, bilinear to the input size (the input is already a multiple of the patch)."""

    def __init__(self, model: ViTSegModel):
        super().__init__()
        self.vit, self.head, self.layers = model.backbone.vit, model.decoder, model.layers
        self.register_buffer("mean", model.mean.clone())
        self.register_buffer("std", model.std.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.vit.forward_intermediates(
            (x - self.mean) / self.std, indices=self.layers, norm=True, output_fmt="NCHW",
            intermediates_only=True,
        )
        return F.interpolate(self.head(feats), size=x.shape[-2:], mode="bilinear", align_corners=False)


class HFUperNet(torch.nn.Module):
    """transformers' UperNet + Dinov2Backbone, blocks 3, 6, 9, 12 (= segframe's default [2, 5, 8, 11])."""

    def __init__(self, size: str, classes: int):
        super().__init__()
        hidden, layers, heads = HF_SIZES[size]
        step = layers // 4
        backbone = Dinov2Config(
            hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, patch_size=14,
            image_size=518, out_features=[f"stage{step * (i + 1)}" for i in range(4)],
            apply_layernorm=True, reshape_hidden_states=True,
        )
        config = UperNetConfig(backbone_config=backbone, hidden_size=512, num_labels=classes,
                               use_auxiliary_head=False)
        self.model = UperNetForSemanticSegmentation(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def step(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), target).backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=list(HF_SIZES))
    parser.add_argument("--input", type=int, default=224, help="square input side (multiple of 14)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--write", action="store_true", help="also update this section of BENCHMARKS.md")
    args = parser.parse_args()
    if args.input % 14:
        parser.error("--input must be a multiple of 14 so that no variant pads")
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    torch.manual_seed(0)

    ours = segframe_model(args.size, args.classes, "identity", "bilinear")
    variants = {
        "ViTSegModel (identity neck, bilinear)": ours,
        "same backbone + head by hand": ByHand(ours),
        "transformers UperNet + Dinov2Backbone": HFUperNet(args.size, args.classes),
        "ViTSegModel (pyramid neck, progressive)": segframe_model(
            args.size, args.classes, "pyramid", "progressive"),
    }
    for m in variants.values():
        m.to(device).train()
    x = torch.rand(args.batch, 3, args.input, args.input, device=device)
    target = torch.randint(0, args.classes, (args.batch, args.input, args.input), device=device)

    memory = {name: peak_bytes(lambda m=m: step(m, x, target), device) for name, m in variants.items()}
    for _ in range(args.warmup):
        for m in variants.values():
            step(m, x, target)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, m in variants.items():
            times[name].append(timed(lambda m=m: step(m, x, target), device))

    median = {name: statistics.median(t) for name, t in times.items()}
    ref, hf = median["same backbone + head by hand"], median["transformers UperNet + Dinov2Backbone"]
    lines = [
        f"## ViTSegModel overhead: DINOv2-{args.size}, UperNet 512, input {args.batch}x3x{args.input}x"
        f"{args.input}, {args.classes} classes, forward+backward, median of {args.repeats}",
        "",
        machine(device),
        "",
        "| variant | params (M) | time (ms) | min (ms) | vs by hand | vs transformers | "
        f"{memory_label(device)} |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in variants.items():
        params = sum(p.numel() for p in m.parameters()) / 1e6
        lines.append(f"| {name} | {params:.1f} | {1e3 * median[name]:.1f} | {1e3 * min(times[name]):.1f} | "
                     f"{median[name] / ref:.3f} | {median[name] / hf:.3f} | {memory[name] / 2**20:.0f} |")
    publish(f"overhead-{device.type}", lines, args.write)


if __name__ == "__main__":
    main()
