"""UperNet decoder plugin for segframe: transformers' UperNetHead behind a DecoderSpec."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers import UperNetConfig
from transformers.models.upernet.modeling_upernet import UperNetHead

from segframe import DecoderSpec, hookimpl


class UperNetParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hidden_size: int = Field(512, ge=1, description="channels of the PPM/FPN convolutions")
    pool_scales: list[int] = Field([1, 2, 3, 6], min_length=1, description="pyramid pooling output sizes")


class UperNetDecoder(nn.Module):
    def __init__(self, params: UperNetParams, in_channels: list[int], in_strides: list[int], num_classes: int):
        super().__init__()
        config = UperNetConfig(
            hidden_size=params.hidden_size, pool_scales=params.pool_scales, num_labels=num_classes
        )
        self.head = UperNetHead(config, in_channels=list(in_channels))
        self.output_stride = in_strides[0]

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.head(features)


def build(params: UperNetParams, in_channels, in_strides, num_classes) -> nn.Module:
    return UperNetDecoder(params, in_channels, in_strides, num_classes)


@hookimpl
def segframe_decoders():
    return [
        DecoderSpec(
            name="upernet",
            description="UperNet (PPM + FPN) head from transformers' UperNetHead",
            params=UperNetParams,
            build=build,
        )
    ]
