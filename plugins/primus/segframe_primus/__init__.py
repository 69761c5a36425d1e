"""Primus decoder plugin for segframe: nnU-Net's ViT decoder (`PatchDecode`) in 2D.

Primus (dynamic_network_architectures) decodes the final token grid with transposed-conv
stages of kernel and stride 2, LayerNorm over channels and GELU between them, straight to
per-class logits at full resolution. Its `PatchDecode` is 3D-only and needs a power-of-two
patch; this head is the same module tree with `ConvTranspose2d`, so PatchDecode's weights
(ConvTranspose3d (..., 2, 2, 1)) copy one to one. A patch that is not a power of two (14) is
decoded by the next (or previous) power of two; the model's upsampler resizes the logits.
With `multiscale` set (false or true) it builds MedDINOv3's 2D Primus decoder instead, as the
older nnU-Net fork does: widths halving at each stage, a 1x1 classifier, on the last level or on
all levels concatenated, with an optional 1x1 projection to `embed_dim` per level.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator
from torch import nn

from segframe import ConfigError, DecoderSpec, hookimpl
from segframe.plugins import DecoderInputs, HeadContext


class PrimusParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    patch_rounding: Literal["up", "down"] = Field(
        "up",
        description="for a patch that is not a power of two (14): decode x16 ('up', logits at stride "
        "14/16 = 0.875, resized down to the image) or x8 ('down', stride 1.75, upsampled)",
    )
    multiscale: bool | None = Field(
        None,
        description="null: nnU-Net's PatchDecode on the last level; false / true: MedDINOv3's Primus "
        "decoder on the last level / on all levels of model.layers concatenated (the older nnU-Net fork's)",
    )
    embed_dim: PositiveInt | None = Field(
        None,
        description="MedDINOv3's layout: decoder width per level; when it differs from the tokens' width "
        "a 1x1 conv projects them (null: the tokens' width, no projection); needs multiscale",
    )
    patch_embed_size: PositiveInt | None = Field(
        None,
        description="MedDINOv3's layout: the decoder's upsampling factor, a power of two (null: the patch, "
        "rounded as patch_rounding says); needs multiscale",
    )

    @model_validator(mode="after")
    def _meddinov3_keys(self) -> PrimusParams:
        if self.multiscale is None:
            names = " and ".join(k for k in ("embed_dim", "patch_embed_size") if getattr(self, k) is not None)
            if names:
                raise ValueError(
                    f"only MedDINOv3's layout reads {names}: set multiscale (false: the last level, true: "
                    f"all levels concatenated) or remove {names}"
                )
        if self.patch_embed_size is not None:
            if not math.log2(self.patch_embed_size).is_integer() or self.patch_embed_size < 2:
                raise ValueError(f"patch_embed_size must be a power of two of at least 2, got "
                                 f"{self.patch_embed_size}")
            if self.patch_rounding != "up":
                raise ValueError("patch_rounding has no effect with patch_embed_size (the factor it gives); "
                                 "remove one of them")
        return self


def decode_factor(stride: float, rounding: str = "up") -> int:
    """The power of two the decoder upsamples by: the stride itself, or the next ('up') or previous
    ('down') power of two."""
    exponent = math.log2(stride)
    if exponent.is_integer():
        return int(stride)
    return 2 ** (math.ceil(exponent) if rounding == "up" else math.floor(exponent))


def channel_schedule(factor: int, embed_dim: int, out_channels: int) -> list[int]:
    """PatchDecode's widths: log2(factor) stages shrinking geometrically from embed_dim towards
    2 * out_channels, each rounded to a multiple of 8 (at least 8); the last is out_channels."""
    num_stages = int(math.log(factor) / math.log(2))
    reduction = (embed_dim / (2 * out_channels)) ** (1 / num_stages)
    channels = [embed_dim] + [
        int(max(8, round((embed_dim / reduction ** (i + 1) + 1e-6) / 8) * 8)) for i in range(num_stages)
    ]
    channels[-1] = out_channels
    return channels


class PrimusDecoder(nn.Module):
    """Primus' decoder in 2D: (B, D, h, w) -> logits (B, K, f*h, f*w).

    With `multiscale` null, `decode` is nnU-Net's PatchDecode with ConvTranspose2d on the last
    level: stages 0..n-2 are ConvTranspose(2, s2) - LayerNormNd - GELU, the last is a
    ConvTranspose(2, s2) to the classes. With `multiscale` false / true it is MedDINOv3's layout on
    the last level / on all levels concatenated: the optional 1x1 `proj` (to `embed_dim` per level),
    then log2(f) ConvTranspose(2, s2) - LayerNormNd - GELU stages halving the width, then a 1x1
    conv to the classes. Weights are initialised as Primus does (He normal, negative slope 0.01,
    zero biases). `output_stride` is stride / f (1 for patch 16, 0.875 or 1.75 for patch 14).
    """

    def __init__(
        self, params: PrimusParams, in_channels: list[int], in_strides: list[float], num_classes: int
    ):
        super().__init__()
        from dynamic_network_architectures.building_blocks.patch_encode_decode import LayerNormNd
        from dynamic_network_architectures.initialization.weight_init import InitWeights_He

        stride = in_strides[-1]
        if stride < 2:
            raise ConfigError(f"primus decodes from a stride of at least 2, got {stride} (model.neck)")
        self.factor = params.patch_embed_size or decode_factor(stride, params.patch_rounding)
        self.output_stride = stride / self.factor
        if float(self.output_stride).is_integer():
            self.output_stride = int(self.output_stride)
        self.multiscale = bool(params.multiscale)
        self.proj: nn.Conv2d | None = None
        if params.multiscale is None:
            channels = channel_schedule(self.factor, in_channels[-1], num_classes)
            last: nn.Module = nn.ConvTranspose2d(channels[-2], channels[-1], kernel_size=2, stride=2)
            channels = channels[:-1]
        else:
            levels = in_channels if self.multiscale else in_channels[-1:]
            width = sum(levels)
            if params.embed_dim is not None and params.embed_dim != in_channels[-1]:
                self.proj = nn.Conv2d(width, params.embed_dim * len(levels), kernel_size=1)
                width = params.embed_dim * len(levels)
            channels = [width // 2 ** i for i in range(int(math.log2(self.factor)) + 1)]
            last = nn.Conv2d(channels[-1], num_classes, kernel_size=1)
        stages: list[nn.Module] = [
            nn.Sequential(
                nn.ConvTranspose2d(channels[s], channels[s + 1], kernel_size=2, stride=2),
                LayerNormNd(channels[s + 1]),
                nn.GELU(),
            )
            for s in range(len(channels) - 1)
        ]
        self.decode = nn.Sequential(*stages, last)
        self.decode.apply(InitWeights_He(1e-2))
        if self.proj is not None:
            self.proj.apply(InitWeights_He(1e-2))

    def forward(self, inputs: DecoderInputs) -> torch.Tensor:
        x = torch.cat(inputs.features, dim=1) if self.multiscale else inputs.features[-1]
        return self.decode(x if self.proj is None else self.proj(x))


def build(
    params: PrimusParams, in_channels: list[int], in_strides: list[float], num_classes: int,
    context: HeadContext,
) -> nn.Module:
    if context.neck != "identity":
        raise ConfigError(
            f"model.neck: primus decodes the ViT's token grid (the last block of model.layers, at the "
            f"patch stride) and would leave the {context.neck} neck's other levels untrained; "
            "set model.neck: identity"
        )
    return PrimusDecoder(params, in_channels, in_strides, num_classes)


@hookimpl
def segframe_decoders() -> list[DecoderSpec]:
    return [
        DecoderSpec(
            name="primus",
            description="Primus (nnU-Net's ViT decoder): transposed-conv stages from tokens to pixels",
            params=PrimusParams,
            build=build,
            contract=2,
        )
    ]
