"""VisionFM backbones (ophthalmic foundation model, iBOT-pretrained ViT-B/16) on timm.

One encoder per imaging modality, all ViT-B/16 without LayerScale (LN eps 1e-6, learned
224 position embedding). Files `VFM_<Modality>_weights.pth` are iBOT training checkpoints:
{'teacher': {'backbone.*', 'head.*'}, 'student': {'module.backbone.*', 'module.head.*'}, ...}.
The teacher is used (as VisionFM's own evaluation code does); `head.*` is the iBOT projection
head, dropped (after stripping `backbone.` it would look like a classifier).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from segframe.backbones.checkpoint import CheckpointFormat
from segframe.backbones.lazy_timm import vit_filter
from segframe.spec import BackboneSpec

if TYPE_CHECKING:
    from segframe.backbones.base import Backbone

SIZES = {
    "base": ("vit_base_patch16_224", {}),
    "tiny": ("vit_base_patch16_224", {"embed_dim": 64, "depth": 4, "num_heads": 2}),
}

# VisionFM utils.get_stats: mean and std per modality (images in [0, 1], RGB).
STATS = {
    "fundus": ((0.423737496137619, 0.2609460651874542, 0.128403902053833),
               (0.29482534527778625, 0.20167365670204163, 0.13668020069599152)),
    "oct": ((0.21091926, 0.21091926, 0.21091919), (0.17598894, 0.17598891, 0.17598893)),
    "ffa": ((0.2020487, 0.20205145, 0.20201068), (0.17406046, 0.17404206, 0.17401208)),
    "ultrasound": ((0.05989236, 0.05978666, 0.056694973), (0.154277, 0.15504874, 0.14464583)),
    "external": ((0.4936253, 0.36324808, 0.25956994), (0.32001, 0.27109432, 0.21991591)),
    "slitlamp": ((0.5556667, 0.40288574, 0.38857886), (0.26516676, 0.23311588, 0.23903583)),
    "mri": ((0.17368862, 0.17368862, 0.17368862), (0.16198656, 0.16198656, 0.16198656)),
    "ubm": ((0.096110865, 0.096110865, 0.096110865), (0.20977867, 0.20977867, 0.20977867)),
}

FORMAT = CheckpointFormat(
    family="visionfm",
    filter_fn=vit_filter,
    containers=("teacher", "student", "model", "state_dict", "module"),
    drop=(r"head\.", r"masked_embed$", r"mask_token$"),
    files="VFM_{Fundus,OCT,FFA,Ultrasound,External,SlitLamp,MRI,UBM}_weights.pth",
)


class VisionFMParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    modality: Literal["fundus", "oct", "ffa", "ultrasound", "external", "slitlamp", "mri", "ubm"] = Field(
        "fundus", description="imaging modality of the encoder file; selects VisionFM's input mean/std"
    )
    pos_embed_resize: Literal["official", "timm"] = Field(
        "official",
        description="resizing the 14x14 position embedding to other inputs: official = VisionFM's "
        "segmentation code (bicubic, no antialias); timm = timm's antialiased bicubic",
    )


def build(size: str, params: VisionFMParams, in_chans: int = 3) -> Backbone:
    import timm

    from segframe.backbones.base import Backbone, check_size, set_pos_embed_resize

    check_size(SIZES, size, "visionfm")
    name, arch = SIZES[size]
    vit = timm.create_model(
        name, pretrained=False, num_classes=0, dynamic_img_size=True, in_chans=in_chans, **arch
    )
    if params.pos_embed_resize == "official":
        set_pos_embed_resize(vit, "plain")
    mean, std = STATS[params.modality]
    # VisionFM's get_intermediate_layers applies the final norm (its segmentation heads use it).
    return Backbone(vit, family="visionfm", size=size, patch_size=16, mean=mean, std=std,
                    intermediate_norm=True, checkpoint_format=FORMAT)


SPEC = BackboneSpec(
    name="visionfm",
    description="VisionFM ophthalmic ViT-B/16 (iBOT), one encoder per modality",
    params=VisionFMParams,
    sizes=list(SIZES),
    build=build,
)
