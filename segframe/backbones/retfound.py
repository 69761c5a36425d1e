"""RETFound backbones (retinal foundation models, UCL/Moorfields) on timm.

Two releases: the MAE ViT-L/16 (`variant: mae`; files `RETFound_cfp_weights.pth`,
`RETFound_oct_weights.pth`, `RETFound_mae_{natureCFP,natureOCT,meh,shanghai}.pth`, stored as
{'model': ...} with the MAE decoder) and the DINOv2 ViT-L/14 (`variant: dinov2`; files
`RETFound_dinov2_{meh,shanghai}.pth`, stored as {'teacher': {'backbone.*', heads}}).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from segframe.backbones.checkpoint import CheckpointFormat
from segframe.backbones.dinov2 import DINO_DROP
from segframe.backbones.lazy_timm import vit_filter
from segframe.spec import BackboneSpec

if TYPE_CHECKING:
    from segframe.backbones.base import Backbone

TINY = {"embed_dim": 64, "depth": 4, "num_heads": 2}
# variant -> size -> (timm name, overrides); "tiny" is for tests and smoke runs only.
SIZES = {
    "mae": {"large": ("vit_large_patch16_224", {}), "tiny": ("vit_large_patch16_224", TINY)},
    "dinov2": {"large": ("vit_large_patch14_dinov2", {}), "tiny": ("vit_small_patch14_dinov2", TINY)},
}
PATCH = {"mae": 16, "dinov2": 14}

FORMATS = {
    # timm would take MAE's mask_token for a DINOv2 file, so it is removed before converting.
    "mae": CheckpointFormat(
        family="retfound (mae)",
        filter_fn=vit_filter,
        containers=("model", "teacher", "student", "state_dict", "module"),
        drop=(r"mask_token$", r"decoder_", r"head\."),
        files="RETFound_cfp_weights.pth, RETFound_oct_weights.pth, "
        "RETFound_mae_{natureCFP,natureOCT,meh,shanghai}.pth",
    ),
    "dinov2": CheckpointFormat(
        family="retfound (dinov2)",
        filter_fn=vit_filter,
        drop=DINO_DROP,
        converter_needs=frozenset({"mask_token"}),
        files="RETFound_dinov2_meh.pth, RETFound_dinov2_shanghai.pth",
    ),
}


class RetFoundParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    variant: Literal["mae", "dinov2"] = Field(
        "mae", description="mae: the MAE ViT-L/16 release; dinov2: the DINOv2 ViT-L/14 release"
    )
    pos_embed_resize: Literal["official", "timm"] = Field(
        "official",
        description="resizing the position embedding to other inputs: official = RETFound's fine-tuning "
        "code (bicubic, no antialias); timm = timm's antialiased bicubic",
    )


def build(size: str, params: RetFoundParams, in_chans: int = 3) -> Backbone:
    import timm

    from segframe.backbones.base import Backbone, check_size, set_pos_embed_resize

    sizes = SIZES[params.variant]
    check_size(sizes, size, f"retfound ({params.variant})")
    name, arch = sizes[size]
    vit = timm.create_model(
        name, pretrained=False, num_classes=0, dynamic_img_size=True, in_chans=in_chans, **arch
    )
    if params.pos_embed_resize == "official":
        set_pos_embed_resize(vit, "plain")
    # MAE: RETFound's own fine-tuning drops the pretrained final norm (global pooling with a new
    # fc_norm), and MAE's norm was trained to feed the pixel decoder: features stay un-normed.
    # DINOv2: the final norm is part of what DINOv2 trains, as in the dinov2 family.
    return Backbone(vit, family="retfound", size=size, patch_size=PATCH[params.variant],
                    intermediate_norm=params.variant == "dinov2", checkpoint_format=FORMATS[params.variant],
                    # RETFound's main_finetune.py resizes any square grid (MAE's interpolate_pos_embed:
                    # bicubic, no antialias, exact size) for both releases
                    pos_embed_load_resize="plain")


SPEC = BackboneSpec(
    name="retfound",
    description="RETFound retinal ViT-L: MAE (patch 16) or DINOv2 (patch 14) release",
    params=RetFoundParams,
    sizes=["large", "tiny"],
    build=build,
)
