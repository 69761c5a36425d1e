"""UperNet decoder plugin for segframe: transformers' UperNetHead (and optional FCN auxiliary head).

transformers initialises these heads only through `post_init()` of its own wrapper model,
so the weights are initialised here (mmseg's scheme: Kaiming for conv+BN units, N(0, 0.01)
for the classifier). The pyramid pooling module's adaptive pooling is `AdaptiveAvgPool`, which
follows the input size in an exported graph.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from torch import nn

from segframe import ConfigError, DecoderSpec, hookimpl


class UperNetParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hidden_size: PositiveInt = Field(512, description="channels of the PPM/FPN convolutions")
    pool_scales: list[PositiveInt] = Field(
        [1, 2, 3, 6], min_length=1, description="pyramid pooling output sizes (on the last level)"
    )
    auxiliary_head: bool = Field(
        False, description="add an FCN auxiliary head; a training forward returns (logits, its logits)"
    )
    auxiliary_in_index: int = Field(2, ge=0, description="feature level the auxiliary head reads")
    auxiliary_channels: PositiveInt = Field(256, description="channels of the auxiliary head's conv")
    auxiliary_loss_weight: float = Field(
        0.4, ge=0, description="weight of the auxiliary loss (read by the trainer as `auxiliary_loss_weight`)"
    )


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal convs (ReLU), unit BN, zero biases; the 1x1 classifiers get N(0, 0.01)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for head in module.children():
        if isinstance(getattr(head, "classifier", None), nn.Conv2d):
            nn.init.normal_(head.classifier.weight, std=0.01)


class AdaptiveAvgPool(nn.Module):
    """nn.AdaptiveAvgPool2d(output_size) written with the bins' size arithmetic, one axis at a time.

    Output cell i of an axis of n positions averages positions floor(i*n/s) .. ceil((i+1)*n/s)-1, as
    AdaptiveAvgPool2d does, as a difference of cumulative sums. torch.export lowers AdaptiveAvgPool2d
    to gathers whose bin widths are fixed at the traced size (wrong logits or an onnxruntime error at
    other sizes); here the bins are tensor arithmetic on the symbolic size, and no reshape or matmul
    adds a guard on it, so the exported graph is right at every size.
    """

    def __init__(self, output_size: int):
        super().__init__()
        self.output_size = output_size

    def _pool_last_axis(self, x: torch.Tensor) -> torch.Tensor:
        n, s = x.shape[-1], self.output_size
        i = torch.arange(s, device=x.device)
        start, end = (i * n) // s, ((i + 1) * n + s - 1) // s
        sums = nn.functional.pad(x.cumsum(-1), (1, 0))  # sums[..., k]: the sum of the first k positions
        return (sums.index_select(-1, end) - sums.index_select(-1, start)) / (end - start).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._pool_last_axis(self._pool_last_axis(x).transpose(-1, -2)).transpose(-1, -2)


class UperNetDecoder(nn.Module):
    """UperNet head on a list of (B, C_i, H_i, W_i) maps; logits at the first level's resolution.

    A batch of one in training mode cannot batch-normalise the 1x1 pooled map of pool scale 1
    (one value per channel), so those BatchNorms then use their running statistics.

    With `auxiliary_head`, a training-mode forward returns (logits, the FCN head's logits at the
    resolution of level `auxiliary_in_index`, stride `auxiliary_stride`): the decoder contract's
    auxiliary output, whose loss the trainer weights by `auxiliary_loss_weight`. In eval mode it
    returns the logits alone.
    """

    def __init__(
        self, params: UperNetParams, in_channels: list[int], in_strides: list[int], num_classes: int
    ):
        super().__init__()
        if not in_channels or len(in_channels) != len(in_strides):
            raise ConfigError(f"upernet needs one stride per feature level, got {in_channels} / {in_strides}")
        # imported here so that listing plugins does not import transformers
        from transformers import UperNetConfig
        from transformers.models.upernet.modeling_upernet import UperNetFCNHead, UperNetHead

        config = UperNetConfig(
            hidden_size=params.hidden_size,
            pool_scales=list(params.pool_scales),
            num_labels=num_classes,
            auxiliary_channels=params.auxiliary_channels,
            auxiliary_num_convs=1,
            auxiliary_concat_input=False,
        )
        self.head = UperNetHead(config, in_channels=list(in_channels))
        for block in self.head.psp_modules.blocks:  # same state dict: the pooling has no weights
            block.layers[0] = AdaptiveAvgPool(block.layers[0].output_size)
            block.add_module("0", block.layers[0])
        self.output_stride = in_strides[0]
        self.auxiliary_head = None
        self.auxiliary_loss_weight = params.auxiliary_loss_weight
        if params.auxiliary_head:
            i = params.auxiliary_in_index
            if i >= len(in_channels):
                raise ConfigError(
                    f"model.decoder.auxiliary_in_index {i} is out of range for {len(in_channels)} "
                    f"feature levels; use 0..{len(in_channels) - 1}"
                )
            self.auxiliary_head = UperNetFCNHead(config, in_channels=list(in_channels), in_index=i)
            self.auxiliary_stride = in_strides[i]
        init_weights(self)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        logits = self._logits(features)
        if self.auxiliary_head is not None and self.training:
            return logits, self.auxiliary_head(features)
        return logits

    def _logits(self, features: list[torch.Tensor]) -> torch.Tensor:
        if not (self.training and features[-1].shape[0] == 1):
            return self.head(features)
        norms = [
            block.layers[1].batch_norm
            for block in self.head.psp_modules.blocks
            if block.layers[0].output_size in (1, (1, 1))
        ]
        for norm in norms:
            norm.eval()
        try:
            return self.head(features)
        finally:
            for norm in norms:
                norm.train()


def build(
    params: UperNetParams, in_channels: list[int], in_strides: list[int], num_classes: int
) -> nn.Module:
    return UperNetDecoder(params, in_channels, in_strides, num_classes)


@hookimpl
def segframe_decoders() -> list[DecoderSpec]:
    return [
        DecoderSpec(
            name="upernet",
            description="UperNet (pyramid pooling + FPN) head, transformers' UperNetHead",
            params=UperNetParams,
            build=build,
        )
    ]
