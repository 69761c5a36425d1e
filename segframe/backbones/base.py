"""The Backbone interface every family implements: a timm ViT plus what the model needs to know."""

from __future__ import annotations

import torch
from torch import nn

from segframe.errors import SegframeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_layers(depth: int) -> list[int]:
    """Four evenly spaced blocks ending at the last: 12 -> [2,5,8,11], 24 -> [5,11,17,23]."""
    step = depth // 4
    return [step * (i + 1) - 1 for i in range(4)] if step else list(range(depth))


class Backbone(nn.Module):
    """A ViT that returns NCHW features of chosen blocks.

    Attributes the model relies on: `embed_dim`, `patch_size`, `num_layers`, `mean`, `std`
    (pretraining input statistics for 3 channels in [0, 1]), `default_layers`,
    `intermediate_norm` (family default for applying the final norm to intermediate
    features) and `vit` (the timm module, for peft and gradient checkpointing).
    """

    def __init__(
        self,
        vit: nn.Module,
        *,
        family: str,
        size: str,
        patch_size: int,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        intermediate_norm: bool = True,
        layers: list[int] | None = None,
    ):
        super().__init__()
        self.vit = vit
        self.family = family
        self.size = size
        self.patch_size = patch_size
        self.embed_dim = int(vit.embed_dim)
        self.num_layers = len(vit.blocks)
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.intermediate_norm = intermediate_norm
        self.default_layers = layers or default_layers(self.num_layers)

    def check_layers(self, layers: list[int]) -> list[int]:
        bad = [i for i in layers if not 0 <= i < self.num_layers]
        if bad or not layers:
            raise SegframeError(
                f"model.layers {layers} invalid for {self.family} {self.size} with {self.num_layers} blocks: "
                f"use indices 0..{self.num_layers - 1} (default {self.default_layers})"
            )
        return list(layers)

    def features(
        self, x: torch.Tensor, layers: list[int] | None = None, norm: bool | None = None
    ) -> list[torch.Tensor]:
        """Outputs of blocks `layers` as (B, embed_dim, H/p, W/p); H and W must be multiples of p."""
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise SegframeError(
                f"input {h}x{w} is not a multiple of the patch size {p}: pad it first "
                "(ViTSegModel pads automatically)"
            )
        layers = self.check_layers(self.default_layers if layers is None else layers)
        norm = self.intermediate_norm if norm is None else norm
        return self.vit.forward_intermediates(
            x, indices=layers, norm=norm, output_fmt="NCHW", intermediates_only=True
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vit.set_grad_checkpointing(enable)
