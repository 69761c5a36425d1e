"""SegFormer decoder plugin for segframe: the all-MLP head of SegFormer (Xie et al., 2021).

The head is written here rather than imported, because transformers' `SegformerDecodeHead`
changed class and state-dict layout between 4.x and 5.x; a test checks it against the
installed transformers head with copied weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from torch import nn

from segframe import ConfigError, DecoderSpec, hookimpl


class SegformerParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hidden_size: PositiveInt = Field(
        256, description="channels every level is projected to, and of the fuse conv"
    )
    dropout: float = Field(0.1, ge=0, lt=1, description="channel dropout (Dropout2d) before the classifier")


class SegformerDecoder(nn.Module):
    """Project each level to `hidden_size` (a linear map per pixel), resize all to the first
    level, concatenate (deepest first, as the original), fuse with 1x1 conv + BN + ReLU,
    dropout, 1x1 classifier. Logits come at the first level's resolution (`output_stride`).
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
        self.output_stride = in_strides[0]
        self.projections = nn.ModuleList(nn.Conv2d(c, d, kernel_size=1) for c in in_channels)
        self.fuse = nn.Conv2d(d * len(in_channels), d, kernel_size=1, bias=False)
        self.norm = nn.BatchNorm2d(d)
        self.activation = nn.ReLU()
        self.dropout = nn.Dropout2d(params.dropout)
        self.classifier = nn.Conv2d(d, num_classes, kernel_size=1)
        self._init_weights()

    def _init_weights(self) -> None:
        # SegFormer: truncated N(0, 0.02) for the MLPs; mmseg: Kaiming for conv+BN, N(0, 0.01) classifier
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
        x = self.activation(self.norm(self.fuse(torch.cat(levels[::-1], dim=1))))
        return self.classifier(self.dropout(x))


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
