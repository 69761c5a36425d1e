"""Mask2Former decoder plugin for segframe: a head that owns its training loss.

transformers' Mask2Former parts (multi-scale deformable-attention pixel decoder, masked-attention
transformer decoder, class and mask predictors, Hungarian-matched loss with point sampling) on a
pyramid of the ViT features. Training returns the raw query predictions, scored by
`training_loss`; eval returns dense per-class logits for nnU-Net. transformers is imported only
by `build` (segframe_mask2former.head).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from segframe import DecoderSpec, hookimpl

if TYPE_CHECKING:
    from torch import nn

    from segframe.plugins import HeadContext


class Mask2FormerParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_queries: PositiveInt = Field(100, description="object queries (at least num_classes)")
    hidden_size: PositiveInt = Field(
        256, multiple_of=2,
        description="width of the pixel decoder, mask features and queries (Mask2Former's hidden_dim); "
                    "even; GroupNorms use 32 groups for multiples of 32 from 64, fewer below",
    )
    num_heads: PositiveInt = Field(8, description="attention heads (hidden_size must be divisible by it)")
    decoder_layers: PositiveInt = Field(
        9, description="masked-attention decoder layers (transformers' Mask2FormerConfig.decoder_layers - 1)"
    )
    pixel_decoder_layers: PositiveInt = Field(6, description="deformable-attention encoder layers")
    class_weight: float = Field(2.0, ge=0, description="weight of the class cross-entropy (loss, matching)")
    mask_weight: float = Field(5.0, ge=0, description="weight of the mask sigmoid cross-entropy")
    dice_weight: float = Field(5.0, ge=0, description="weight of the mask Dice loss")
    no_object_weight: float = Field(0.1, ge=0, description="class-loss weight of the no-object class")
    num_points: PositiveInt = Field(12544, description="points sampled per mask for matching and mask losses")
    deep_supervision: bool = Field(True, description="add the loss of every intermediate decoder layer")

    @field_validator("num_heads")
    @classmethod
    def _heads_divide_width(cls, v: int, info: ValidationInfo) -> int:
        width = info.data.get("hidden_size")
        if width and width % v:
            raise ValueError(f"hidden_size {width} must be divisible by num_heads {v}")
        return v

    @model_validator(mode="after")
    def _some_loss(self) -> Mask2FormerParams:
        if self.class_weight == self.mask_weight == self.dice_weight == 0:
            raise ValueError("class_weight, mask_weight and dice_weight cannot all be 0")
        return self


def build(
    params: Mask2FormerParams, in_channels: list[int], in_strides: list[float], num_classes: int,
    context: HeadContext,
) -> nn.Module:
    from segframe_mask2former.head import Mask2FormerHead

    return Mask2FormerHead(params, in_channels, in_strides, num_classes, context)


@hookimpl
def segframe_decoders() -> list[DecoderSpec]:
    return [
        DecoderSpec(
            name="mask2former",
            description="Mask2Former: deformable pixel decoder, masked-attention queries, Hungarian loss",
            params=Mask2FormerParams,
            build=build,
            contract=2,
        )
    ]
