"""The detail path (`model.detail`): a light U-Net on the image that brings the head's logits back to
full resolution with the image's own detail at strides 1, 2, 4 and 8, for 1-3 px structures.

A ViT sees a thin vessel as a fraction of one token, and an upsampler that reads only the head's
logits cannot bring it back. `DetailPath` encodes the normalised, padded image with a small
convolutional encoder (`units` conv3x3 - norm - LeakyReLU units per stride, two by default,
the first of a stage strided; nnU-Net's building blocks), then decodes from stride 8 to stride 1
U-Net style: each decoder stage reads the upsampled previous stage, the encoder features of its
stride and the head's logits resized to that stride (so any head output stride works: 16, 3.5,
0.875, ...).
A 1x1 conv gives class logits that are added to the bilinear upsampling of the head's logits
(a residual path); the last conv starts small, so the model starts close to "head + bilinear"
and the path learns the detail on top.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from segframe.upsample import norm_groups, resize

STRIDES = (1, 2, 4, 8)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(norm_groups(channels), channels)
    return nn.BatchNorm2d(channels)


def _unit(ch_in: int, ch_out: int, norm: str, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(ch_in, ch_out, 3, stride=stride, padding=1, bias=False),
        _norm(norm, ch_out),
        nn.LeakyReLU(0.01, inplace=True),
    )


def _block(ch_in: int, ch_out: int, norm: str, units: int, stride: int = 1) -> nn.Sequential:
    rest = [_unit(ch_out, ch_out, norm) for _ in range(units - 1)]
    return nn.Sequential(_unit(ch_in, ch_out, norm, stride), *rest)


class DetailPath(nn.Module):
    """Image encoder at strides 1, 2, 4, 8 and a U-Net decoder joined with the head's logits.

    forward(image (B, C, H, W), logits (B, K, h, w) at any stride) -> logits (B, K, H, W).

    `channels[i]` is the width at stride `STRIDES[i]` of both encoder and decoder, `units[i]` the
    number of conv units of both stages there (`model.detail` gives both); `norm` is
    instance (nnU-Net's choice), group or batch. With `checkpointing`, each block is recomputed
    in backward (the full-resolution activations dominate its memory).
    """

    def __init__(self, in_channels: int, num_classes: int, channels: list[int] | tuple[int, ...],
                 units: list[int] | tuple[int, ...], norm: str = "instance", checkpointing: bool = False):
        super().__init__()
        c, n = list(channels), list(units)
        k = num_classes
        self.checkpointing = checkpointing
        self.encoder = nn.ModuleList(
            [_block(in_channels, c[0], norm, n[0])]
            + [_block(c[i - 1], c[i], norm, n[i], stride=2) for i in range(1, len(c))]
        )
        # decoder stage i (stride STRIDES[i]) reads [stage i+1 upsampled, encoder i, head logits]
        self.decoder = nn.ModuleList(
            [_block(c[i] + (c[i + 1] if i + 1 < len(c) else 0) + k, c[i], norm, n[i]) for i in range(len(c))]
        )
        self.out = nn.Conv2d(c[0], k, kernel_size=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=0.01)
        # small, not zero: every parameter gets a gradient from the first step (DDP, liveness). A
        # full-scale init learnt 1-px lines faster at lr 3e-4 but did worse on generated vessels
        # (docs/detail.md, "Choosing the defaults")
        nn.init.normal_(self.out.weight, std=0.01)
        nn.init.zeros_(self.out.bias)

    def _run(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward(self, image: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        skips = []
        x = image
        for block in self.encoder:
            x = self._run(block, x)
            skips.append(x)
        x = None
        for i in reversed(range(len(skips))):
            size = skips[i].shape[-2:]
            head = resize(logits, size).to(skips[i].dtype)
            parts = ([] if x is None else [resize(x, size)]) + [skips[i], head]
            x = self._run(self.decoder[i], torch.cat(parts, dim=1))
        size = image.shape[-2:]
        return resize(logits, size) + self.out(x).to(logits.dtype)
