"""UNETR decoder plugin for segframe: the 2D decoder of UNETR (Hatamizadeh et al., 2022).

By default written in plain torch, module for module as MONAI's `monai.networks.nets.UNETR`
builds it (`UnetrBasicBlock`, `UnetrPrUpBlock`, `UnetrUpBlock`, `UnetOutBlock`, with the same
submodule names), so MONAI's decoder weights load one to one; MONAI itself is only a test
dependency. Like MONAI, the weights keep PyTorch's default initialisation. With
`decoder_channels` it builds the older nnU-Net fork's configurable UNETR decoder instead
(GroupNorm deconvolution chains, no image skip), with that decoder's submodule names.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveInt, model_validator
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
    decoder_channels: Annotated[list[PositiveInt], Field(min_length=5, max_length=5)] | None = Field(
        None,
        description="five widths, deep to shallow (the older nnU-Net fork's default: [512, 256, 128, 64, "
        "32]): build that fork's configurable decoder instead of MONAI's (null: MONAI's, set by the four "
        "keys above)",
    )
    negative_slope: NonNegativeFloat | None = Field(
        None, description="LeakyReLU slope of the configurable decoder (null: 0.01); needs decoder_channels"
    )
    upsample_mode: Literal["deconv", "bilinear"] | None = Field(
        None,
        description="the 2x steps of the configurable decoder's U-Net half: transposed conv (deconv) or "
        "bilinear (null: deconv); needs decoder_channels",
    )

    @model_validator(mode="after")
    def _one_layout(self) -> UnetrParams:
        if self.decoder_channels is None:
            names = " and ".join(k for k in FORK_ONLY_KEYS if getattr(self, k) is not None)
            if names:
                raise ValueError(
                    f"only the configurable decoder reads {names}: set decoder_channels too (the older "
                    f"nnU-Net fork's default is [512, 256, 128, 64, 32]) or remove {names}"
                )
        else:
            fields = type(self).model_fields
            names = " and ".join(k for k in MONAI_KEYS if getattr(self, k) != fields[k].default)
            if names:
                raise ValueError(
                    f"only MONAI's decoder reads {names}, and decoder_channels replaces it with the "
                    f"configurable one: remove {names} or decoder_channels"
                )
        return self


# the keys of MONAI's layout, and those of the configurable one that decoder_channels selects
MONAI_KEYS = ("feature_size", "norm", "res_block", "conv_block")
FORK_ONLY_KEYS = ("negative_slope", "upsample_mode")


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


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the most groups of 8, 4, 2 that divide the channels (else 1)."""
    return nn.GroupNorm(next(g for g in (8, 4, 2, 1) if channels % g == 0), channels)


def _deconv_step(cin: int, cout: int, slope: float) -> nn.Sequential:
    """2x transposed conv (bias), conv3x3 (no bias), GroupNorm, LeakyReLU."""
    return nn.Sequential(OrderedDict(
        deconv=nn.ConvTranspose2d(cin, cout, 2, stride=2),
        conv=nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        norm=_group_norm(cout),
        act=nn.LeakyReLU(slope, inplace=True),
    ))


def _double_conv(cin: int, cout: int, slope: float) -> nn.Sequential:
    """(conv3x3 without bias, GroupNorm, LeakyReLU) twice."""
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(cin, cout, 3, padding=1, bias=False), norm1=_group_norm(cout),
        act1=nn.LeakyReLU(slope, inplace=True),
        conv2=nn.Conv2d(cout, cout, 3, padding=1, bias=False), norm2=_group_norm(cout),
        act2=nn.LeakyReLU(slope, inplace=True),
    ))


class ConfigurableUnetrDecoder(nn.Module):
    """The older nnU-Net fork's UNETR decoder on four same-stride ViT levels, with its module names.

    `decoder_channels` c0..c4 run deep to shallow. Each level goes through a chain of 2x
    deconvolution steps (`encoder.z1_blocks` .. `z4_blocks`: 4, 3, 2, 1 steps, widths c3, c2, c1,
    c0), giving skips at 16x, 8x, 4x and a bottleneck at 2x the token grid. The U-Net decoder
    (`decoder.up4`/`conv4` .. `up2`/`conv2`) doubles the bottleneck three times, each time joined
    with a skip; `conv1` and the 1x1 `seg_head` end at 16x the token grid. There is no image skip.
    With `upsample_mode: bilinear` the 2x steps of the U-Net decoder are bilinear and keep the
    width. Weights keep PyTorch's default initialisation, as in the fork.
    """

    inputs: frozenset[str] = frozenset()

    def __init__(self, params: UnetrParams, in_channels: list[int], num_classes: int, context: HeadContext):
        super().__init__()
        c = params.decoder_channels
        slope = 0.01 if params.negative_slope is None else params.negative_slope
        deconv = (params.upsample_mode or "deconv") == "deconv"
        self.output_stride = _stride(context.patch_size / CANVAS)
        # level 3 (deepest) takes 1 step to width c0, ..., level 0 takes 4 steps to width c3
        self.encoder = nn.ModuleDict()
        for level in (3, 2, 1, 0):
            width = c[3 - level]
            steps = [_deconv_step(in_channels[level], width, slope)]
            steps += [_deconv_step(width, width, slope) for _ in range(3 - level)]
            self.encoder[f"z{level + 1}_blocks"] = nn.Sequential(*steps)
        self.decoder = nn.ModuleDict()
        for stage, deep, shallow in ((4, c[0], c[1]), (3, c[1], c[2]), (2, c[2], c[3])):
            if deconv:  # the transposed conv already narrows to the skip's width
                up, joined = nn.ConvTranspose2d(deep, shallow, 2, stride=2), 2 * shallow
            else:
                up, joined = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), deep + shallow
            self.decoder[f"up{stage}"] = up
            self.decoder[f"conv{stage}"] = _double_conv(joined, shallow, slope)
        self.decoder["conv1"] = _double_conv(c[3], c[4], slope)
        self.decoder["seg_head"] = nn.Conv2d(c[4], num_classes, 1)

    def forward(self, inputs: DecoderInputs) -> torch.Tensor:
        skip1, skip2, skip3, x = (
            self.encoder[f"z{i + 1}_blocks"](level) for i, level in enumerate(inputs.features)
        )
        dec = self.decoder
        for stage, skip in ((4, skip3), (3, skip2), (2, skip1)):
            x = dec[f"conv{stage}"](torch.cat((dec[f"up{stage}"](x), skip), dim=1))
        return dec["seg_head"](dec["conv1"](x))


def _stride(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def build(
    params: UnetrParams, in_channels: list[int], in_strides: list[float], num_classes: int,
    context: HeadContext,
) -> nn.Module:
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
    if params.decoder_channels is not None:
        return ConfigurableUnetrDecoder(params, in_channels, num_classes, context)
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
