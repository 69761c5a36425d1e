"""DPT decoder plugin for segframe: transformers' DPTNeck (reassemble + fusion) and DPT segmentation head.

DPT (Ranftl et al., 2021) reads the chosen ViT blocks as token sequences, CLS token first: the
readout (`ignore` | `add` | `project`) folds the CLS token into the patch tokens, each level is
projected and resized by its reassemble factor of the token grid, a top-down fusion (x2 per level)
joins them, and the head (conv-BN-ReLU-dropout-conv, x2) gives logits at 16x the token grid for the
default factors. The factors act on the token grid, never on pixels, so patch 14 works like patch 16.

The deepest fusion layer's `residual_layer1`, which transformers builds but never calls, is removed
(state-dict keys `neck.fusion_stage.layers.0.residual_layer1.*`), so every parameter gets a gradient.
transformers initialises these modules only through `post_init()` of its own wrapper model, so the
plugin initialises them the same way (N(0, initializer_range) convs and linears, zero biases, unit
BatchNorms). transformers is imported in `build`, so listing plugins stays fast.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator
from torch import nn

from segframe import ConfigError, DecoderSpec, hookimpl

if TYPE_CHECKING:
    from segframe.plugins import DecoderInputs, HeadContext

MAX_FACTOR_LOG2 = 4  # reassemble factors 1/16 .. 16


class DPTParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hidden_size: PositiveInt = Field(
        256, description="channels of the fusion stage and the head (transformers' fusion_hidden_size)"
    )
    neck_hidden_sizes: list[PositiveInt] | None = Field(
        None, min_length=1,
        description="channels each level is projected to before its resize, one per level; null = "
        "D/8, D/4, D/2, D for backbone width D (DPT-Base's [96, 192, 384, 768] on ViT-B)",
    )
    readout: Literal["ignore", "add", "project"] = Field(
        "project",
        description="how the CLS token enters the patch tokens: ignore it, add it, or concat + linear + GELU",
    )
    reassemble_factors: list[float] = Field(
        [4, 2, 1, 0.5], min_length=1,
        description="resize of each level relative to the token grid, powers of two "
        "(4 = transposed conv x4, 0.5 = conv stride 2)",
    )
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout before the head's classifier")
    use_batch_norm_in_fusion_residual: bool = Field(
        False, description="BatchNorm after each conv of the fusion stage's residual units (their convs "
        "then have no bias), as the older nnU-Net fork built DPT",
    )
    auxiliary_head: bool = Field(
        False, description="add DPT's auxiliary head; a training forward returns (logits, its logits)"
    )
    auxiliary_loss_weight: float = Field(
        0.4, ge=0, description="weight of the auxiliary loss (read by the trainer as `auxiliary_loss_weight`)"
    )

    @field_validator("reassemble_factors")
    @classmethod
    def _powers_of_two(cls, v: list[float]) -> list[float]:
        for f in v:
            k = math.log2(f) if f > 0 else None
            if k is None or not (k.is_integer() and abs(k) <= MAX_FACTOR_LOG2):
                raise ValueError(
                    f"factor {f} is not a power of two between 1/16 and 16 (e.g. 4, 2, 1, 0.5); "
                    "DPT resizes with a transposed conv of stride f or a conv of stride 1/f"
                )
        return v


def _stride(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def init_weights(module: nn.Module, std: float) -> None:
    """What transformers' `DPTPreTrainedModel.post_init()` does to these modules: N(0, std) weights
    for convs, transposed convs and linears, zero biases, unit BatchNorms with fresh statistics."""
    for m in module.modules():
        if isinstance(m, nn.Linear | nn.Conv2d | nn.ConvTranspose2d):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
            m.reset_running_stats()


class DPTDecoder(nn.Module):
    """DPT neck + segmentation head on the backbone's levels (identity neck) and their CLS tokens.

    forward(DecoderInputs) -> logits for a token grid h x w. The neck and head end at s x the grid,
    s = reassemble_factors[-1] * 2 ** (levels + 1) (16 for the defaults). Logits finer than the
    image (s > patch: patch 14) are resized once to the padded image (`output_stride` 1), else
    they keep s*h x s*w (`output_stride` patch / s: 1 for patch 16). On odd grids the 0.5-factor
    level comes out at ceil(h/2), transformers resizes each level to the fused map it joins, and
    the logits are resized to exactly that size.

    `inputs` is {"prefix_tokens"} for readout add/project and empty for `ignore` (no CLS token
    is computed). With `auxiliary_head`, a training-mode forward returns (logits, transformers'
    DPTAuxiliaryHead logits on the last fused map, stride `auxiliary_stride` = 2 * patch / s): the
    decoder contract's auxiliary output, whose loss the trainer weights by `auxiliary_loss_weight`.
    In eval mode it returns the logits alone.
    """

    def __init__(
        self, params: DPTParams, in_channels: list[int], in_strides: list[float], num_classes: int,
        context: HeadContext,
    ):
        super().__init__()
        from transformers import DPTConfig
        from transformers.models.dpt.modeling_dpt import (
            DPTAuxiliaryHead,
            DPTNeck,
            DPTSemanticSegmentationHead,
        )

        if context.neck != "identity":
            raise ConfigError(
                f"model.neck: {context.neck} cannot apply to decoder dpt: DPT reassembles the ViT tokens "
                "into its own pyramid (model.decoder.reassemble_factors); set model.neck: identity"
            )
        levels = len(in_channels)
        if len(set(in_channels)) != 1 or len(set(in_strides)) != 1 or in_channels[0] != context.embed_dim:
            raise ConfigError(
                f"dpt reads same-stride ViT levels of width {context.embed_dim}, got channels {in_channels} "
                f"at strides {in_strides}; set model.neck: identity"
            )
        d = context.embed_dim
        sizes = params.neck_hidden_sizes or [max(1, d >> (levels - 1 - i)) for i in range(levels)]
        for key, value in (("neck_hidden_sizes", sizes), ("reassemble_factors", params.reassemble_factors)):
            if len(value) != levels:
                raise ConfigError(
                    f"model.decoder.{key} has {len(value)} entries but the backbone gives "
                    f"{levels} levels (model.layers); give one entry per level"
                )
        if params.readout != "ignore" and not context.has_cls_token:
            raise ConfigError(
                f"model.decoder.readout: {params.readout} reads the CLS token, but backbone "
                f"{context.backbone} has none; set model.decoder.readout: ignore"
            )
        factors = [int(f) if float(f).is_integer() else float(f) for f in params.reassemble_factors]
        config = DPTConfig(
            hidden_size=d,
            neck_hidden_sizes=list(sizes),
            fusion_hidden_size=params.hidden_size,
            readout_type=params.readout,
            reassemble_factors=factors,
            num_labels=num_classes,
            semantic_classifier_dropout=params.dropout,
            use_auxiliary_head=params.auxiliary_head,
            use_batch_norm_in_fusion_residual=params.use_batch_norm_in_fusion_residual,
            auxiliary_loss_weight=params.auxiliary_loss_weight,
        )
        self.neck = DPTNeck(config)
        # the deepest fusion layer is called without a residual, so transformers' residual_layer1 there
        # never runs; its parameters would get no gradient, which DDP (as nnU-Net runs it) rejects
        del self.neck.fusion_stage.layers[0].residual_layer1
        self.head = DPTSemanticSegmentationHead(config)
        self.auxiliary_head = DPTAuxiliaryHead(config) if params.auxiliary_head else None
        self.auxiliary_loss_weight = params.auxiliary_loss_weight
        self.readout = params.readout
        self.inputs = frozenset() if params.readout == "ignore" else frozenset({"prefix_tokens"})
        # each fusion layer and the head upsample x2, starting from the last level's map
        self.scale = factors[-1] * 2 ** (levels + 1)
        # never finer than the image: one resize straight to it, not two (as the fork's DPT on patch 14)
        self.logits_scale = min(self.scale, context.patch_size)
        self.output_stride = _stride(context.patch_size / self.logits_scale)
        self.auxiliary_stride = _stride(context.patch_size / self.scale * 2)
        init_weights(self, config.initializer_range)

    def _tokens(self, inputs: DecoderInputs) -> list[torch.Tensor]:
        """(B, 1 + h*w, D) sequences, CLS first, as transformers' DPTNeck reads them."""
        cls = inputs.cls_tokens
        if cls is None:  # readout ignore: transformers splits the first token off and drops it
            cls = [f.new_zeros(f.shape[:2]) for f in inputs.features]
        return [torch.cat([c[:, None], f.flatten(2).transpose(1, 2)], dim=1)
                for c, f in zip(cls, inputs.features, strict=True)]

    def _at_scale(self, x: torch.Tensor, scale: float, grid: tuple[int, int]) -> torch.Tensor:
        size = tuple(int(g * scale) for g in grid)
        if not float(scale).is_integer() or tuple(x.shape[-2:]) == size:
            return x
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def forward(self, inputs: DecoderInputs) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        grid = tuple(inputs.features[0].shape[-2:])
        fused = self.neck(self._tokens(inputs), grid[0], grid[1])
        logits = self._at_scale(self.head(fused), self.logits_scale, grid)
        if self.auxiliary_head is not None and self.training:
            return logits, self._at_scale(self.auxiliary_head(fused[-1]), self.scale / 2, grid)
        return logits


def build(
    params: DPTParams, in_channels: list[int], in_strides: list[float], num_classes: int, context: HeadContext
) -> nn.Module:
    return DPTDecoder(params, in_channels, in_strides, num_classes, context)


@hookimpl
def segframe_decoders() -> list[DecoderSpec]:
    return [
        DecoderSpec(
            name="dpt",
            description="DPT: reassemble ViT tokens (CLS readout) to a pyramid, fuse top-down, classify",
            params=DPTParams,
            build=build,
            inputs=frozenset({"prefix_tokens"}),
        )
    ]
