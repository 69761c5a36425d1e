"""Linear decoder plugin for segframe: the linear evaluation head of the DINOv2 / DINOv3 papers.

Every chosen level (optionally with its CLS token appended to each patch feature, as DINOv2's
`linear4` and DINOv3's `LinearHead(use_cls_token=True)` do) is resized to the first level,
concatenated, then Dropout2d -> BatchNorm -> 1x1 conv, in DINOv3's order. The baseline every
foundation-model paper reports: a per-pixel linear map of the frozen features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from segframe import ConfigError, DecoderSpec, hookimpl
from segframe.plugins import DecoderInputs, HeadContext


class LinearParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    use_cls_token: bool = Field(
        False, description="append each level's CLS token to every patch feature (DINOv2 linear4)"
    )
    dropout: float = Field(0.1, ge=0, lt=1, description="channel dropout (Dropout2d) before the BatchNorm")
    batchnorm: bool = Field(True, description="BatchNorm over the concatenated channels before the 1x1 conv")


class LinearDecoder(nn.Module):
    """Concat levels [+ CLS] at the first level's size -> Dropout2d -> BN -> 1x1 conv.

    Channel order of the concatenation: level 0 patch features, level 0 CLS, level 1 patch
    features, level 1 CLS, ... (DINOv3's). Levels at another resolution (pyramid neck) are resized
    bilinearly (align_corners=False) to level 0; the CLS token is broadcast over its level.
    In training mode with a single value per channel (batch of one, 1x1 map) the BatchNorm uses
    its running statistics. `inputs` is `{"prefix_tokens"}` only with `use_cls_token`.
    """

    def __init__(
        self, params: LinearParams, in_channels: list[int], in_strides: list[float], num_classes: int,
        context: HeadContext,
    ):
        super().__init__()
        if not in_channels or len(in_channels) != len(in_strides):
            raise ConfigError(f"linear needs one stride per feature level, got {in_channels} / {in_strides}")
        if params.use_cls_token and not context.has_cls_token:
            raise ConfigError(
                f"model.decoder.use_cls_token: backbone {context.backbone} has no CLS token; "
                "set use_cls_token: false"
            )
        self.use_cls_token = params.use_cls_token
        self.inputs = frozenset({"prefix_tokens"}) if self.use_cls_token else frozenset()
        self.output_stride = in_strides[0]
        channels = sum(in_channels) + (context.embed_dim * len(in_channels) if self.use_cls_token else 0)
        self.dropout = nn.Dropout2d(params.dropout)
        self.norm = nn.BatchNorm2d(channels) if params.batchnorm else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.classifier.weight, mean=0, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def concat(self, inputs: DecoderInputs) -> torch.Tensor:
        """The levels (each followed by its broadcast CLS token) at level 0's size, concatenated."""
        size = inputs.features[0].shape[-2:]
        levels = []
        for i, f in enumerate(inputs.features):
            if self.use_cls_token:
                cls = inputs.cls_tokens[i].to(f.dtype)[:, :, None, None].expand(-1, -1, *f.shape[-2:])
                f = torch.cat([f, cls], dim=1)
            if f.shape[-2:] != size:
                f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            levels.append(f)
        return torch.cat(levels, dim=1)

    def forward(self, inputs: DecoderInputs) -> torch.Tensor:
        x = self.dropout(self.concat(inputs))
        norm = self.norm
        if isinstance(norm, nn.BatchNorm2d) and self.training and x[:, 0].numel() == 1:
            x = F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias,
                             training=False, eps=norm.eps)
        else:
            x = norm(x)
        return self.classifier(x)


def build(
    params: LinearParams, in_channels: list[int], in_strides: list[float], num_classes: int,
    context: HeadContext,
) -> nn.Module:
    return LinearDecoder(params, in_channels, in_strides, num_classes, context)


@hookimpl
def segframe_decoders() -> list[DecoderSpec]:
    return [
        DecoderSpec(
            name="linear",
            description="DINOv2/DINOv3 linear head: concat levels (+ CLS), Dropout2d, BatchNorm, 1x1 conv",
            params=LinearParams,
            build=build,
            inputs={"prefix_tokens"},
        )
    ]
