"""DINOv2 backbones (patch 14, learned position embedding, optional 4 registers) on timm.

Official files: `dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`, bare state dicts in the
official key layout (`register_tokens`, `mask_token`, giant's SwiGLU `mlp.w12`/`w3`);
timm's `vision_transformer.checkpoint_filter_fn` converts them. Also read: timm state dicts
(`vit_*_patch14[_reg4]_dinov2`) and Hugging Face `Dinov2Model` / `Dinov2WithRegistersModel`
folders (see hf.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from segframe.backbones.checkpoint import CheckpointFormat
from segframe.backbones.lazy_timm import vit_filter
from segframe.spec import BackboneSpec

if TYPE_CHECKING:
    from segframe.backbones.base import Backbone

# size -> (timm base name, architecture overrides); "tiny" is for tests and smoke runs only.
SIZES = {
    "small": ("vit_small_patch14", {}),
    "base": ("vit_base_patch14", {}),
    "large": ("vit_large_patch14", {}),
    "giant": ("vit_giant_patch14", {}),
    "tiny": ("vit_small_patch14", {"embed_dim": 64, "depth": 4, "num_heads": 2}),
}

# Keys only pretraining uses; timm's converter needs `mask_token` to recognise the layout.
DINO_DROP = (r"mask_token$", r"dino_head\.", r"ibot_head\.", r"head\.")

FORMAT = CheckpointFormat(
    family="dinov2",
    filter_fn=vit_filter,
    drop=DINO_DROP,
    converter_needs=frozenset({"mask_token"}),
    files="dinov2_vit{s,b,l,g}14_pretrain.pth, dinov2_vit{s,b,l,g}14_reg4_pretrain.pth",
    official_keys=("mask_token", "register_tokens"),
    hf_model_types=("dinov2", "dinov2_with_registers"),
)


class DinoV2Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    registers: bool = Field(False, description="the _reg4 release with 4 register tokens")
    pos_embed_resize: Literal["official", "timm"] = Field(
        "official",
        description="resizing the 37x37 position embedding to other inputs: official = DINOv2's code "
        "(bicubic, no antialias, +0.1 offset; the _reg4 models use antialias and no offset, which is "
        "what timm does); timm = timm's antialiased bicubic",
    )


def build(size: str, params: DinoV2Params, in_chans: int = 3) -> Backbone:
    import timm

    from segframe.backbones.base import Backbone, check_size, set_pos_embed_resize

    check_size(SIZES, size, "dinov2")
    base, arch = SIZES[size]
    name = f"{base}_reg4_dinov2" if params.registers else f"{base}_dinov2"
    vit = timm.create_model(
        name, pretrained=False, num_classes=0, dynamic_img_size=True, in_chans=in_chans, **arch
    )
    official = params.pos_embed_resize == "official" and not params.registers
    set_pos_embed_resize(vit, "offset" if official else "antialias")  # timm's own resize guards on the size
    return Backbone(vit, family="dinov2", size=size, patch_size=14, intermediate_norm=True,
                    checkpoint_format=FORMAT)


SPEC = BackboneSpec(
    name="dinov2",
    description="DINOv2 ViT (Meta), patch 14; S/B/L/g, with or without 4 registers",
    params=DinoV2Params,
    sizes=list(SIZES),
    build=build,
)
