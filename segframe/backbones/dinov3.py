"""DINOv3 backbones (patch 16, cls + 4 storage tokens, RoPE, LayerScale) on timm's EVA models.

Official files: `dinov3_vit{s16,s16plus,b16,l16,h16plus,7b16}_pretrain_{lvd1689m,sat493m}-<hash>.pth`,
bare state dicts (`storage_tokens`, `rope_embed.periods`, `blocks.i.ls1.gamma`,
`attn.qkv.bias_mask`, ...); timm's `eva.checkpoint_filter_fn` converts them. The RoPE
periods stored in the file (rounded to bfloat16 during pretraining) are copied exactly: timm
recomputes them in float32 and drops them from the file, which changes the features slightly.
Also read: timm state dicts (`vit_*_patch16_dinov3[_qkvb]`) and Hugging Face `DINOv3ViTModel`
folders (see hf.py); neither stores the periods, so they are recomputed in float32 as timm and
transformers do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from segframe.backbones.checkpoint import CheckpointFormat
from segframe.backbones.lazy_timm import eva_filter
from segframe.errors import ConfigError
from segframe.spec import BackboneSpec

if TYPE_CHECKING:
    from segframe.backbones.base import Backbone

# size -> (timm name, architecture overrides). The `_qkvb` models keep the released q/v biases.
SIZES = {
    "small": ("vit_small_patch16_dinov3_qkvb", {}),
    "small_plus": ("vit_small_plus_patch16_dinov3_qkvb", {}),
    "base": ("vit_base_patch16_dinov3_qkvb", {}),
    "large": ("vit_large_patch16_dinov3_qkvb", {}),
    "huge_plus": ("vit_huge_plus_patch16_dinov3_qkvb", {}),
    "7b": ("vit_7b_patch16_dinov3", {}),
    "tiny": ("vit_small_patch16_dinov3_qkvb", {"embed_dim": 64, "depth": 4, "num_heads": 2}),
}
SAT_SIZES = ("large", "7b", "tiny")

STATS = {
    "lvd1689m": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "sat493m": ((0.430, 0.411, 0.296), (0.213, 0.156, 0.143)),
}


PERIODS_NOTE = ("RoPE periods recomputed in float32 (the file has none, as timm and transformers save them; "
                "the official files store them rounded to bfloat16, which gives slightly different features)")
ZERO_BIAS_NOTE = ("no q/v attention biases in the file (e.g. timm's vit_*_dinov3 without _qkvb): "
                  "set to zero, the same model")


def _periods_and_biases(sd: dict[str, torch.Tensor], vit: torch.nn.Module) -> tuple[dict, list[str]]:
    """The file's RoPE periods, or timm's float32 ones; zero q/v biases when the file has none."""
    notes = []
    stored = next((sd[k] for k in ("rope_embed.periods", "rope.periods") if k in sd), None)
    if stored is not None:
        out = {"rope.periods": stored.float()}
    else:
        out = {"rope.periods": vit.rope._compute_periods(device="cpu", dtype=torch.float32)}
        notes.append(PERIODS_NOTE)
    has_bias = any(k.endswith((".attn.q_bias", ".attn.qkv.bias")) for k in sd)
    if vit.blocks[0].attn.q_bias is not None and not has_bias:
        for i, blk in enumerate(vit.blocks):
            for name in ("q_bias", "v_bias"):
                out[f"blocks.{i}.attn.{name}"] = torch.zeros(blk.attn.q_bias.shape)
        notes.append(ZERO_BIAS_NOTE)
    return out, notes


FORMAT = CheckpointFormat(
    family="dinov3",
    filter_fn=eva_filter,
    # local_cls_norm: only the L-SAT and 7B pretraining used it (local crops); bias_mask: the
    # constant mask zeroing the k bias, which timm keeps as a fixed zero k_bias.
    drop=(r"mask_token$", r"local_cls_norm\.", r"blocks\.\d+\.attn\.qkv\.bias_mask$",
          r"dino_head\.", r"ibot_head\.", r"head\."),
    extra=_periods_and_biases,
    official_keys=("storage_tokens", "rope_embed.periods"),
    hf_model_types=("dinov3_vit",),
    files="dinov3_vits16_pretrain_lvd1689m-08c60483.pth, dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth, ... "
    "(dinov3_vit{s16,s16plus,b16,l16,h16plus,7b16}_pretrain_<weights>-<hash>.pth)",
)


class DinoV3Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weights: Literal["lvd1689m", "sat493m"] = Field(
        "lvd1689m",
        description="pretraining data of the file: lvd1689m (web images, ImageNet mean/std) or sat493m "
        "(satellite; own mean/std; released for large and 7b)",
    )
    rope_rescale_coords: float | None = Field(
        None,
        ge=1.0,
        description="train-time random RoPE coordinate rescale in [1/r, r] as in DINOv3 pretraining "
        "(which used 2.0); null = off, the same positions in training and inference",
    )


def build(size: str, params: DinoV3Params, in_chans: int = 3) -> Backbone:
    import timm

    from segframe.backbones.base import Backbone, check_size

    check_size(SIZES, size, "dinov3")
    if params.weights == "sat493m" and size not in SAT_SIZES:
        raise ConfigError(
            f"DINOv3 sat493m weights are released only for {', '.join(SAT_SIZES[:2])}, not {size!r}: "
            "set model.backbone.weights: lvd1689m or choose another size"
        )
    name, arch = SIZES[size]
    vit = timm.create_model(
        name, pretrained=False, num_classes=0, dynamic_img_size=True, in_chans=in_chans, **arch
    )
    for blk in vit.blocks:
        # Same maths; timm's default F.linear(x, qkv.weight, bias) bypasses qkv.forward, so a
        # LoRA (peft) wrapped around `attn.qkv` would silently do nothing.
        blk.attn.qkv_bias_separate = True
    from segframe.backbones.rope import SymbolicGridRope

    vit.rope.__class__ = SymbolicGridRope  # the same numbers, and exports keep the image size dynamic
    # Persistent, so the file's exact periods load with the rest and travel with saved models.
    vit.rope.register_buffer("periods", vit.rope.periods, persistent=True)
    if params.rope_rescale_coords is not None:
        vit.rope.rescale_coords = params.rope_rescale_coords
        vit.rope.aug_active = True
    mean, std = STATS[params.weights]
    return Backbone(vit, family="dinov3", size=size, patch_size=16, mean=mean, std=std,
                    intermediate_norm=True, checkpoint_format=FORMAT)


SPEC = BackboneSpec(
    name="dinov3",
    description="DINOv3 ViT (Meta), patch 16, RoPE, 4 storage tokens; S/S+/B/L/H+/7B, LVD or SAT weights",
    params=DinoV3Params,
    sizes=list(SIZES),
    build=build,
)
