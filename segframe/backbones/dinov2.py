"""DINOv2 backbones (patch 14, learned position embedding, optional 4 registers) on timm."""

from __future__ import annotations

import timm
from pydantic import BaseModel, ConfigDict, Field

from segframe.backbones.base import Backbone
from segframe.plugins import BackboneSpec

# size -> (timm base name, architecture overrides); "tiny" is for tests and smoke runs only.
SIZES = {
    "small": ("vit_small_patch14", {}),
    "base": ("vit_base_patch14", {}),
    "large": ("vit_large_patch14", {}),
    "giant": ("vit_giant_patch14", {}),
    "tiny": ("vit_small_patch14", {"embed_dim": 64, "depth": 4, "num_heads": 2}),
}


class DinoV2Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    registers: bool = Field(False, description="the _reg4 release with 4 register tokens")


def build(size: str, params: DinoV2Params, in_chans: int = 3) -> Backbone:
    base, arch = SIZES[size]
    name = f"{base}_reg4_dinov2" if params.registers else f"{base}_dinov2"
    vit = timm.create_model(
        name, pretrained=False, num_classes=0, dynamic_img_size=True, in_chans=in_chans, **arch
    )
    return Backbone(vit, family="dinov2", size=size, patch_size=14, intermediate_norm=True)


SPEC = BackboneSpec(
    name="dinov2",
    description="DINOv2 ViT (Meta), patch 14; S/B/L/g, with or without 4 registers",
    params=DinoV2Params,
    sizes=list(SIZES),
    build=build,
)
