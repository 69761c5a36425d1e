"""SegFormer decoder plugin for segframe: the all-MLP head of SegFormer (Xie et al., 2021).

The head is written here rather than imported, because transformers' `SegformerDecodeHead`
changed class and state-dict layout between 4.x and 5.x; a test checks it against the
installed transformers head with copied weights. `variant` also builds the two other heads the
older nnU-Net fork trained under the SegFormer name (`progressive`, `full_resolution`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from torch import nn

from segframe import ConfigError, DecoderSpec, hookimpl
from segframe.upsample import ForkUpsampler

Variant = Literal["standard", "progressive", "full_resolution"]


class SegformerParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hidden_size: PositiveInt = Field(
        256, description="channels every level is projected to, and of the fuse conv"
    )
    dropout: float = Field(
        0.1, ge=0, lt=1, description="dropout before the classifier (and Dropout2d in each progressive stage)"
    )
    dropout_type: Literal["channel", "element"] = Field(
        "channel",
        description="the dropout before the classifier: channel (Dropout2d, mmseg's SegFormer head) or "
        "element (Dropout, transformers' SegformerDecodeHead, which the older nnU-Net fork used)",
    )
    variant: Variant = Field(
        "standard",
        description="standard: logits at the first level's stride (the fork's model_segformer_0); "
        "progressive: hidden_size features, two learned x2 stages, then the classifier, logits at a "
        "quarter of that stride (model_segformer_1); full_resolution: the fused map resized to the "
        "padded image before BN, ReLU and the classifier, logits at stride 1 (model_segformer_2)",
    )


class SegformerDecoder(nn.Module):
    """Project each level to `hidden_size` (a linear map per pixel), resize all to the first
    level, concatenate (deepest first, as the original), fuse with 1x1 conv + BN + ReLU,
    dropout (`dropout_type`), 1x1 classifier. Logits come at the first level's resolution (`output_stride`).

    `variant: progressive`: the classifier gives `hidden_size` channels, and segframe's
    `ForkUpsampler` (two learned x2 stages, `hidden_size` then half as wide, at least 32, and a 1x1
    classifier) gives logits at a quarter of the first level's stride. The classifier runs there,
    not after the model's final bilinear resize as in the fork: a 1x1 conv commutes with that
    resize (its weights sum to 1), so the logits are the same at a fraction of the cost.
    `variant: full_resolution`: the fused map (before BN) is resized to the padded image, then BN,
    ReLU, dropout and the classifier run there: logits at stride 1. Projections, resize and the
    fuse conv are linear and the resize's weights sum to 1, so this equals resizing every level
    to the image before the head, as the fork's model_segformer_2 does, at a fraction of the cost.
    """

    def __init__(
        self, params: SegformerParams, in_channels: list[int], in_strides: list[int], num_classes: int
    ):
        super().__init__()
        if not in_channels or len(in_channels) != len(in_strides):
            raise ConfigError(
                f"segformer needs one stride per feature level, got {in_channels} / {in_strides}"
            )
        d = params.hidden_size
        self.variant = params.variant
        self.first_stride = in_strides[0]
        quarter = in_strides[0] / 4
        quarter = int(quarter) if quarter.is_integer() else quarter
        self.output_stride = {"standard": in_strides[0], "progressive": quarter, "full_resolution": 1}[
            params.variant]
        self.projections = nn.ModuleList(nn.Conv2d(c, d, kernel_size=1) for c in in_channels)
        self.fuse = nn.Conv2d(d * len(in_channels), d, kernel_size=1, bias=False)
        self.norm = nn.BatchNorm2d(d)
        self.activation = nn.ReLU()
        self.dropout = (nn.Dropout2d if params.dropout_type == "channel" else nn.Dropout)(params.dropout)
        progressive = params.variant == "progressive"
        self.classifier = nn.Conv2d(d, d if progressive else num_classes, kernel_size=1)
        self.upsampler = ForkUpsampler(d, num_classes, d, dropout=params.dropout) if progressive else None
        self._init_weights()

    def _init_weights(self) -> None:
        # SegFormer: truncated N(0, 0.02) for the MLPs; mmseg: Kaiming for conv+BN, N(0, 0.01) classifier;
        # the progressive upsampler keeps PyTorch's defaults, as the fork's
        for proj in self.projections:
            nn.init.trunc_normal_(proj.weight, std=0.02)
            nn.init.zeros_(proj.bias)
        nn.init.kaiming_normal_(self.fuse.weight, mode="fan_out", nonlinearity="relu")
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]
        levels = [
            F.interpolate(proj(f), size=size, mode="bilinear", align_corners=False)
            for proj, f in zip(self.projections, features, strict=True)
        ]
        x = self.fuse(torch.cat(levels[::-1], dim=1))
        if self.variant == "full_resolution":
            image = [round(s * self.first_stride) for s in size]
            x = F.interpolate(x, size=image, mode="bilinear", align_corners=False)
        x = self.classifier(self.dropout(self.activation(self.norm(x))))
        if self.upsampler is None:
            return x
        return self.upsampler(x, [s << self.upsampler.num_stages for s in x.shape[-2:]])


def build(
    params: SegformerParams, in_channels: list[int], in_strides: list[int], num_classes: int
) -> nn.Module:
    return SegformerDecoder(params, in_channels, in_strides, num_classes)


@hookimpl
def segframe_decoders() -> list[DecoderSpec]:
    return [
        DecoderSpec(
            name="segformer",
            description="SegFormer all-MLP head: per-level projection, resize, concat, fuse, classify",
            params=SegformerParams,
            build=build,
        )
    ]
