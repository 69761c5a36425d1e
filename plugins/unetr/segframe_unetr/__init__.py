"""UNETR decoder plugin for segframe: the 2D decoder of UNETR (Hatamizadeh et al., 2022).

Written in plain torch, module for module as MONAI's `monai.networks.nets.UNETR` builds it
(`UnetrBasicBlock`, `UnetrPrUpBlock`, `UnetrUpBlock`, `UnetOutBlock`, with the same submodule
names), so MONAI's decoder weights load one to one; MONAI itself is only a test dependency.
Like MONAI, the weights keep PyTorch's default initialisation.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from torch import nn

from segframe import ConfigError, DecoderSpec, hookimpl
from segframe.plugins import DecoderInputs, HeadContext

# MONAI's UNETR fixes the patch at 16: four 2x deconvolutions take the token grid to the image
CANVAS = 16


class UnetrParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    feature_size: PositiveInt = Field(
        16, description="channels of the full-resolution image skip; the deeper stages use 2x, 4x, 8x"
    )
    norm: Literal["instance", "batch"] = Field(
        "instance", description="normalisation in every conv block: instance (MONAI's default) or batch"
    )
    res_block: bool = Field(True, description="residual conv blocks (UnetResBlock) instead of plain ones")
    conv_block: bool = Field(
        True, description="a conv block after each deconvolution of the ViT-level chains (MONAI's conv_block)"
    )


def _conv(cin: int, cout: int, kernel: int, transposed: bool = False, bias: bool = False) -> nn.Sequential:
    """MONAI's `Convolution` with conv_only: a Sequential whose only child is `conv` (same padding)."""
    if transposed:
        layer = nn.ConvTranspose2d(cin, cout, kernel, stride=kernel, bias=bias)
    else:
        layer = nn.Conv2d(cin, cout, kernel, stride=1, padding=(kernel - 1) // 2, bias=bias)
    return nn.Sequential(OrderedDict(conv=layer))


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.InstanceNorm2d(channels) if kind == "instance" else nn.BatchNorm2d(channels)


class UnetBasicBlock(nn.Module):
    """conv3x3 - norm - LeakyReLU(0.01), twice (MONAI `UnetBasicBlock`, stride 1)."""

    def __init__(self, cin: int, cout: int, norm: str):
        super().__init__()
        self.conv1 = _conv(cin, cout, 3)
        self.conv2 = _conv(cout, cout, 3)
        self.lrelu = nn.LeakyReLU(0.01, inplace=True)
        self.norm1 = _norm(norm, cout)
        self.norm2 = _norm(norm, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lrelu(self.norm1(self.conv1(x)))
        return self.lrelu(self.norm2(self.conv2(x)))


class UnetResBlock(UnetBasicBlock):
    """The basic block with a residual (1x1 conv + norm where the width changes), MONAI `UnetResBlock`."""

    def __init__(self, cin: int, cout: int, norm: str):
        super().__init__(cin, cout, norm)
        self.downsample = cin != cout
        if self.downsample:
            self.conv3 = _conv(cin, cout, 1)
            self.norm3 = _norm(norm, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lrelu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        residual = self.norm3(self.conv3(x)) if self.downsample else x
        out += residual
        return self.lrelu(out)


def _block(cin: int, cout: int, params: UnetrParams) -> nn.Module:
    return (UnetResBlock if params.res_block else UnetBasicBlock)(cin, cout, params.norm)


class UnetrBasicBlock(nn.Module):
    """A conv block (MONAI `UnetrBasicBlock`, stride 1): UNETR's encoder on the image."""

    def __init__(self, cin: int, cout: int, params: UnetrParams):
        super().__init__()
        self.layer = _block(cin, cout, params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class UnetrPrUpBlock(nn.Module):
    """A 2x deconvolution, then `num_layer` more (each followed by a conv block with `conv_block`):
    a ViT level taken from the token grid to 2 ** (num_layer + 1) times its resolution."""

    def __init__(self, cin: int, cout: int, num_layer: int, params: UnetrParams):
        super().__init__()
        self.transp_conv_init = _conv(cin, cout, 2, transposed=True)
        if params.conv_block:
            self.blocks = nn.ModuleList(
                nn.Sequential(_conv(cout, cout, 2, transposed=True), _block(cout, cout, params))
                for _ in range(num_layer)
            )
        else:
            self.blocks = nn.ModuleList(_conv(cout, cout, 2, transposed=True) for _ in range(num_layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transp_conv_init(x)
        for block in self.blocks:
            x = block(x)
        return x


class UnetrUpBlock(nn.Module):
    """2x deconvolution, concatenation with the skip, conv block (MONAI `UnetrUpBlock`)."""

    def __init__(self, cin: int, cout: int, params: UnetrParams):
        super().__init__()
        self.transp_conv = _conv(cin, cout, 2, transposed=True)
        self.conv_block = _block(2 * cout, cout, params)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv_block(torch.cat((self.transp_conv(x), skip), dim=1))


class UnetOutBlock(nn.Module):
    """The 1x1 classifier with bias (MONAI `UnetOutBlock`)."""

    def __init__(self, cin: int, num_classes: int):
        super().__init__()
        self.conv = _conv(cin, num_classes, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UnetrDecoder(nn.Module):
    """UNETR's decoder on four same-stride ViT levels (shallow to deep) and the padded image.

    Levels 0, 1, 2 go through deconvolution chains to 8x, 4x, 2x the token grid (encoder2..4);
    level 3 is the deepest input of the U-Net decoder (decoder5..2), and a conv block on the image
    gives the full-resolution skip (encoder1). The decoder ends at 16x the token grid. For patch 16
    that is the padded image; for any other patch the image is resized (bilinear) to that canvas
    first, so `output_stride` is patch / 16 (0.875 for patch 14) and the model resizes the logits.
    """

    inputs = frozenset({"image"})

    def __init__(
        self, params: UnetrParams, in_channels: list[int], in_strides: list[float], num_classes: int,
        context: HeadContext,
    ):
        super().__init__()
        if context.neck != "identity":
            raise ConfigError(
                f"model.neck: unetr reads four same-stride ViT levels and builds its own resolutions, so it "
                f"cannot take the {context.neck} neck; set model.neck: identity"
            )
        if len(in_channels) != 4:
            raise ConfigError(
                f"model.layers: unetr needs exactly 4 backbone blocks (shallow to deep, e.g. [2, 5, 8, 11] "
                f"for 12 blocks), got {len(in_channels)} levels; set model.layers to 4 block indices"
            )
        f = params.feature_size
        c0, c1, c2, c3 = in_channels
        self.patch_size = context.patch_size
        self.output_stride = _stride(context.patch_size / CANVAS)
        self.encoder1 = UnetrBasicBlock(context.image_channels, f, params)
        self.encoder2 = UnetrPrUpBlock(c0, 2 * f, 2, params)
        self.encoder3 = UnetrPrUpBlock(c1, 4 * f, 1, params)
        self.encoder4 = UnetrPrUpBlock(c2, 8 * f, 0, params)
        self.decoder5 = UnetrUpBlock(c3, 8 * f, params)
        self.decoder4 = UnetrUpBlock(8 * f, 4 * f, params)
        self.decoder3 = UnetrUpBlock(4 * f, 2 * f, params)
        self.decoder2 = UnetrUpBlock(2 * f, f, params)
        self.out = UnetOutBlock(f, num_classes)

    def forward(self, inputs: DecoderInputs) -> torch.Tensor:
        x1, x2, x3, x4 = inputs.features
        image = inputs.image
        canvas = (CANVAS * x4.shape[-2], CANVAS * x4.shape[-1])
        if tuple(image.shape[-2:]) != canvas:
            image = F.interpolate(image, size=canvas, mode="bilinear", align_corners=False)
        enc1 = self.encoder1(image)
        enc2 = self.encoder2(x1)
        enc3 = self.encoder3(x2)
        enc4 = self.encoder4(x3)
        dec3 = self.decoder5(x4, enc4)
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        return self.out(self.decoder2(dec1, enc1))


def _stride(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def build(
    params: UnetrParams, in_channels: list[int], in_strides: list[float], num_classes: int,
    context: HeadContext,
) -> nn.Module:
    return UnetrDecoder(params, in_channels, in_strides, num_classes, context)


@hookimpl
def segframe_decoders() -> list[DecoderSpec]:
    return [
        DecoderSpec(
            name="unetr",
            description="UNETR: deconvolution chains on four ViT levels, a conv image skip, U-Net decoder",
            params=UnetrParams,
            build=build,
            inputs=frozenset({"image"}),
        )
    ]
