"""Necks between the ViT and the head, and the upsamplers that bring logits back to full resolution.

Necks turn the backbone's same-stride feature maps into what the head reads:
`IdentityNeck` (every level at the patch stride) or `FeaturePyramidNeck` (the ViTDet/BEiT
simple pyramid: strides p/4, p/2, p, 2p). Upsamplers map the head's logits to the padded
input size: `BilinearUpsampler`, `ProgressiveUpsampler` (learned 2x stages, then bilinear), or
`ForkUpsampler` (the older nnU-Net fork's, for migrated configs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from segframe.errors import ConfigError


def resize(x: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, C, h, w) maps to `size`; `x` itself when the sizes are equal.

    The comparison never adds a guard while torch.export traces symbolic sizes: where it cannot be
    decided it interpolates, which at equal sizes is the identity (align_corners=False, scale 1).
    """
    size = tuple(size)
    if all(statically_known_true(a == b) for a, b in zip(x.shape[-2:], size, strict=True)):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The top-left `height` x `width` of (B, C, H, W) maps; `x` itself when nothing is cut.

    The cut is a negative pad, which torch.export traces for symbolic sizes (a slice view makes it
    guard on whether anything was cut); as in `resize`, the no-op is taken only where it is known.
    """
    cut = (0, width - x.shape[-1], 0, height - x.shape[-2])
    return x if all(statically_known_true(c == 0) for c in cut) else F.pad(x, cut)


def _stride(value: float) -> int | float:
    """Pixel strides as ints where they are whole numbers (3.5 stays a float for patch 14)."""
    return int(value) if float(value).is_integer() else float(value)


class IdentityNeck(nn.Module):
    """All levels stay at the patch stride with the backbone's width (the plain-ViT layout)."""

    def __init__(self, embed_dim: int, patch_size: int, num_levels: int):
        super().__init__()
        self.out_channels = [embed_dim] * num_levels
        self.out_strides = [_stride(patch_size)] * num_levels

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(features)


class CeilMaxPool(nn.Module):
    """nn.MaxPool2d(2, 2, ceil_mode=True) for symbolic sizes: the input padded by one row and column of
    -inf, then pooled in floor mode. Ceil mode's output size is a condition on the input size, which
    torch.export cannot keep symbolic; the padding gives the same windows and values at every size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=float("-inf")), kernel_size=2, stride=2)


class FeaturePyramidNeck(nn.Module):
    """BEiT/MAE `Feature2Pyramid` on four same-stride maps: x4, x2, x1, x0.5 of the token grid.

    Level 0: ConvT(2, s2) - BN - GELU - ConvT(2, s2); level 1: ConvT(2, s2); level 2: identity;
    level 3: 2x2 max-pool (ceil mode, so odd grids and a single patch keep every token).
    Channels stay `embed_dim`. The strides are relative to the token grid, so they are exact
    for any patch size: 4, 8, 16, 32 for patch 16 and 3.5, 7, 14, 28 for patch 14.
    """

    scales = (4, 2, 1, 0.5)
    # the fewest tokens per side an exported graph with a dynamic size takes: from 3 on, the pooled level
    # is at least 2x2, so torch.export needs no guard that it is not 1x1 (a 1x1 map takes other paths)
    min_tokens = 3

    def __init__(self, embed_dim: int, patch_size: int, num_levels: int = 4):
        super().__init__()
        if num_levels != 4:
            raise ConfigError(
                f"model.neck: pyramid builds 4 levels from 4 backbone blocks, got {num_levels} "
                "(set model.layers to 4 block indices, or use neck: identity)"
            )
        d = embed_dim
        self.levels = nn.ModuleList([
            nn.Sequential(
                nn.ConvTranspose2d(d, d, kernel_size=2, stride=2),
                nn.BatchNorm2d(d),
                nn.GELU(),
                nn.ConvTranspose2d(d, d, kernel_size=2, stride=2),
            ),
            nn.ConvTranspose2d(d, d, kernel_size=2, stride=2),
            nn.Identity(),
            CeilMaxPool(),
        ])
        self.out_channels = [d] * 4
        self.out_strides = [_stride(patch_size / s) for s in self.scales]

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return [level(f) for level, f in zip(self.levels, features, strict=True)]


def build_neck(kind: str, embed_dim: int, patch_size: int, num_levels: int) -> nn.Module:
    """`identity` or `pyramid` (model.neck)."""
    if kind == "identity":
        return IdentityNeck(embed_dim, patch_size, num_levels)
    if kind == "pyramid":
        return FeaturePyramidNeck(embed_dim, patch_size, num_levels)
    raise ConfigError(f"model.neck {kind!r} is unknown; use identity or pyramid")


class BilinearUpsampler(nn.Module):
    """Bilinear interpolation of the logits to the target size (no parameters)."""

    num_stages = 0

    def forward(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return resize(logits, size)


def norm_groups(channels: int, most: int = 8) -> int:
    """GroupNorm groups for a width: the largest power of two up to `most` that divides it."""
    return next(g for g in (32, 16, 8, 4, 2, 1) if g <= most and channels % g == 0)


class ProgressiveUpsampler(nn.Module):
    """Learned 2x stages on the logits, then bilinear to the exact size, added to plain bilinear.

    `num_stages = floor(log2(output_stride))` (stride 16 -> 4 stages, 14 -> 3, 3.5 -> 1);
    each stage is bilinear 2x, then two conv3x3 - GroupNorm - ReLU units; the width starts at
    `hidden` and halves per stage down to `min_hidden`, which keeps full-resolution activations
    small. A 1x1 conv maps back to the classes. The result is a correction to the bilinear
    upsampling of the head's logits, so the upsampler starts close to bilinear and learns
    sharper boundaries.
    """

    def __init__(self, num_classes: int, output_stride: float, hidden: int = 64, min_hidden: int = 16):
        super().__init__()
        if output_stride <= 0:
            raise ConfigError(f"the decoder's output_stride must be positive, got {output_stride}")
        self.num_stages = int(math.floor(math.log2(output_stride))) if output_stride >= 2 else 0
        stages = []
        ch_in = num_classes
        for i in range(self.num_stages):
            ch = max(hidden >> i, min_hidden)
            stages.append(nn.Sequential(
                nn.Conv2d(ch_in, ch, 3, padding=1, bias=False), nn.GroupNorm(norm_groups(ch), ch), nn.ReLU(),
                nn.Conv2d(ch, ch, 3, padding=1, bias=False), nn.GroupNorm(norm_groups(ch), ch), nn.ReLU(),
            ))
            ch_in = ch
        self.stages = nn.ModuleList(stages)
        self.out = nn.Conv2d(ch_in, num_classes, kernel_size=1)
        nn.init.normal_(self.out.weight, std=0.01)
        nn.init.zeros_(self.out.bias)

    def forward(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = logits
        for stage in self.stages:
            x = stage(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        return resize(logits, size) + self.out(resize(x, size))


class ForkUpsampler(nn.Module):
    """The older nnU-Net fork's upsampler (`model.upsampler: fork_progressive`), for configs migrated
    from it: `num_stages` times bilinear 2x then conv3x3 - GroupNorm - ReLU - Dropout2d - conv3x3 -
    GroupNorm - ReLU (convs without bias, up to 32 groups), the first stage `width` wide and each
    next one half as wide (at least 32), bilinear to the exact size, then a 1x1 conv to the classes.

    Unlike `ProgressiveUpsampler` there is no bilinear shortcut and the stage count does not follow
    the stride (the fork always made two stages). `in_channels` is the number of classes on logits.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int, num_stages: int = 2,
                 dropout: float = 0.1):
        super().__init__()
        self.num_stages = num_stages
        widths = [max(width >> i, 32) for i in range(num_stages)]
        stages, ch_in = [], in_channels
        for ch in widths:
            groups = norm_groups(ch, most=32)
            stages.append(nn.Sequential(
                nn.Conv2d(ch_in, ch, 3, padding=1, bias=False), nn.GroupNorm(groups, ch), nn.ReLU(),
                nn.Dropout2d(dropout),
                nn.Conv2d(ch, ch, 3, padding=1, bias=False), nn.GroupNorm(groups, ch), nn.ReLU(),
            ))
            ch_in = ch
        self.stages = nn.ModuleList(stages)
        self.out = nn.Conv2d(ch_in, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        for stage in self.stages:
            x = stage(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        return self.out(resize(x, size))


UPSAMPLERS = ("progressive", "bilinear", "fork_progressive")


def build_upsampler(kind: str, num_classes: int, output_stride: float, width: int = 256) -> nn.Module:
    """`progressive`, `bilinear` or `fork_progressive` (model.upsampler; `width`: model.upsampler_width)."""
    if kind == "bilinear":
        return BilinearUpsampler()
    if kind == "progressive":
        return ProgressiveUpsampler(num_classes, output_stride)
    if kind == "fork_progressive":
        return ForkUpsampler(num_classes, num_classes, width)
    raise ConfigError(f"model.upsampler {kind!r} is unknown; use {', '.join(UPSAMPLERS)}")
