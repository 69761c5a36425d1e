"""Backbone families: released architectures, features, norms, input statistics, resizing, LoRA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from timm.layers import resample_abs_pos_embed

from segframe.backbones import default_layers, dinov2, dinov3, retfound, visionfm
from segframe.backbones.bicubic import bicubic_resize
from segframe.errors import ConfigError, SegframeError
from segframe.plugins import get_registry

P = {"dinov3": dinov3.DinoV3Params, "dinov2": dinov2.DinoV2Params, "retfound": retfound.RetFoundParams,
     "visionfm": visionfm.VisionFMParams}
BUILD = {"dinov3": dinov3.build, "dinov2": dinov2.build, "retfound": retfound.build,
         "visionfm": visionfm.build}

# Every released size: (family, size, options) -> embed, depth, heads, patch, register tokens,
# published parameter count in millions (the families' READMEs / papers), MLP type.
RELEASED = [
    ("dinov3", "small", {}, 384, 12, 6, 16, 4, 21, "Mlp"),
    ("dinov3", "small_plus", {}, 384, 12, 6, 16, 4, 29, "SwiGLU"),
    ("dinov3", "base", {}, 768, 12, 12, 16, 4, 86, "Mlp"),
    ("dinov3", "large", {}, 1024, 24, 16, 16, 4, 300, "Mlp"),
    ("dinov3", "large", {"weights": "sat493m"}, 1024, 24, 16, 16, 4, 300, "Mlp"),
    ("dinov3", "huge_plus", {}, 1280, 32, 20, 16, 4, 840, "SwiGLU"),
    ("dinov3", "7b", {}, 4096, 40, 32, 16, 4, 6716, "SwiGLU"),
    ("dinov2", "small", {}, 384, 12, 6, 14, 0, 21, "Mlp"),
    ("dinov2", "base", {}, 768, 12, 12, 14, 0, 86, "Mlp"),
    ("dinov2", "large", {"registers": True}, 1024, 24, 16, 14, 4, 300, "Mlp"),
    ("dinov2", "giant", {}, 1536, 40, 24, 14, 0, 1100, "GluMlp"),
    ("retfound", "large", {}, 1024, 24, 16, 16, 0, 303, "Mlp"),
    ("retfound", "large", {"variant": "dinov2"}, 1024, 24, 16, 14, 0, 304, "Mlp"),
    ("visionfm", "base", {}, 768, 12, 12, 16, 0, 86, "Mlp"),
]


def tiny(family: str, **opts):
    return BUILD[family]("tiny", P[family](**opts)).eval()


TINIES = [("dinov3", {}), ("dinov2", {}), ("dinov2", {"registers": True}), ("retfound", {}),
          ("retfound", {"variant": "dinov2"}), ("visionfm", {})]


def test_registry_has_every_family_with_tiny():
    found = get_registry().backbones()
    for name in P:
        assert name in found and "tiny" in found[name].spec.sizes


@pytest.mark.parametrize("family,size,opts,dim,depth,heads,patch,regs,mparams,mlp", RELEASED)
def test_released_architectures(family, size, opts, dim, depth, heads, patch, regs, mparams, mlp):
    with torch.device("meta"):  # no memory, no init cost: the 7B builds in a fraction of a second
        b = BUILD[family](size, P[family](**opts))
    vit = b.vit
    got = (b.embed_dim, b.num_layers, vit.blocks[0].attn.num_heads, b.patch_size)
    assert got == (dim, depth, heads, patch)
    assert tuple(vit.patch_embed.proj.weight.shape[-2:]) == (patch, patch)
    reg = getattr(vit, "reg_token", None)
    assert (reg.shape[1] if reg is not None else 0) == regs
    n = sum(p.numel() for p in b.parameters()) / 1e6
    assert abs(n - mparams) / mparams < 0.06, f"{n:.1f}M parameters, published {mparams}M"
    assert type(vit.blocks[0].mlp).__name__ == mlp
    assert b.default_layers == default_layers(depth)
    if family == "dinov3":
        assert all(blk.attn.qkv_bias_separate for blk in vit.blocks)
        assert (vit.blocks[0].attn.q_bias is None) == (size == "7b")  # 7B has no qkv bias
        assert vit.rope is not None and vit.norm.eps == 1e-5
    if family in ("visionfm", "retfound") and opts.get("variant") != "dinov2":
        assert vit.norm.eps == 1e-6 and isinstance(vit.blocks[0].ls1, torch.nn.Identity)  # no LayerScale
    if family == "dinov2" or opts.get("variant") == "dinov2":
        assert not isinstance(vit.blocks[0].ls1, torch.nn.Identity)


def test_default_layers_by_depth():
    assert default_layers(12) == [2, 5, 8, 11]
    assert default_layers(24) == [5, 11, 17, 23]
    assert default_layers(32) == [7, 15, 23, 31]
    assert default_layers(40) == [9, 19, 29, 39]


@pytest.mark.parametrize("family,opts", TINIES)
def test_features_shape_and_layers(family, opts):
    b = tiny(family, **opts)
    p = b.patch_size
    x = torch.randn(2, 3, 3 * p, 5 * p)
    out = b.features(x)
    assert [tuple(f.shape) for f in out] == [(2, 64, 3, 5)] * len(b.default_layers)
    assert len(b.features(x, layers=[1, 3])) == 2
    with pytest.raises(SegframeError, match="model.layers"):
        b.features(x, layers=[4])
    with pytest.raises(SegframeError, match=f"not a multiple of the patch size {p}"):
        b.features(torch.randn(1, 3, 3 * p + 1, 5 * p))


@pytest.mark.parametrize("family,opts", TINIES)
def test_blocks_after_the_last_layer_are_not_run(family, opts):
    """features([0, 1]) runs blocks 0 and 1 only, and equals timm's run of every block."""
    b = tiny(family, **opts).eval()
    ran = []
    for i, block in enumerate(b.vit.blocks):
        block.register_forward_hook(lambda module, args, out, i=i: ran.append(i))
    x = torch.randn(1, 3, 4 * b.patch_size, 3 * b.patch_size)
    with torch.no_grad():
        ours = b.features(x, layers=[0, 1], prefix_tokens=b.num_prefix_tokens > 0)
        assert ran == [0, 1]
        theirs = b.vit.forward_intermediates(x, indices=[0, 1], norm=b.intermediate_norm, output_fmt="NCHW",
                                             intermediates_only=True,
                                             return_prefix_tokens=b.num_prefix_tokens > 0)
    assert ran == [0, 1, 0, 1, 2, 3]  # timm's default: every block
    if b.num_prefix_tokens:  # ours: (features, prefix tokens); timm's: one (features, prefix) per layer
        theirs = [f for f, _ in theirs], [t for _, t in theirs]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("family,opts,normed", [
    ("dinov3", {}, True), ("dinov2", {}, True), ("visionfm", {}, True),
    ("retfound", {}, False), ("retfound", {"variant": "dinov2"}, True),
])
def test_intermediate_norm_default_and_switch(family, opts, normed):
    b = tiny(family, **opts)
    with torch.no_grad():
        for p in b.vit.norm.parameters():
            p.normal_()  # a non-identity final norm
        x = torch.randn(1, 3, 2 * b.patch_size, 3 * b.patch_size)
        raw = b.features(x, norm=False)
        by_hand = [b.vit.norm(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) for f in raw]
        torch.testing.assert_close(b.features(x, norm=True), by_hand)
        default = b.features(x)
    assert b.intermediate_norm is normed
    torch.testing.assert_close(default, by_hand if normed else raw)


def test_input_statistics():
    assert tiny("dinov3").mean == (0.485, 0.456, 0.406)
    sat = tiny("dinov3", weights="sat493m")
    assert (sat.mean, sat.std) == ((0.430, 0.411, 0.296), (0.213, 0.156, 0.143))
    oct_ = tiny("visionfm", modality="oct")
    assert oct_.mean[0] == pytest.approx(0.21091926) and oct_.std[2] == pytest.approx(0.17598893)
    assert tiny("visionfm").mean[1] == pytest.approx(0.2609460651874542)  # fundus
    assert tiny("retfound").std == (0.229, 0.224, 0.225)


def test_option_errors():
    with pytest.raises(ConfigError, match="sat493m.*large, 7b"):
        dinov3.build("small", dinov3.DinoV3Params(weights="sat493m"))
    with pytest.raises(ConfigError, match="choose one of"):
        retfound.build("base", retfound.RetFoundParams())
    with pytest.raises(ValueError):
        visionfm.VisionFMParams(modality="xray")


# ---------------------------------------------------------------- position embedding resizing

# segframe's bicubic matrices sum the taps in another order than PyTorch's kernels (and BLAS may fuse):
# up to 1.2e-5 apart on N(0, 1) grids, depending on the CPU; a wrong kernel or scale is ~1e-2 off
RESIZE_TOL = {"atol": 5e-5, "rtol": 1e-5}


def dinov2_official_interpolate(pos_embed, h, w, patch):
    """facebookresearch/dinov2 DinoVisionTransformer.interpolate_pos_encoding (interpolate_offset=0.1,
    interpolate_antialias=False), transcribed: x is (B, C, h, w) there, named w, h."""
    N = pos_embed.shape[1] - 1
    M = int(math.sqrt(N))
    w0, h0 = h // patch, w // patch
    sx, sy = float(w0 + 0.1) / M, float(h0 + 0.1) / M
    patch_pos = F.interpolate(pos_embed[:, 1:].float().reshape(1, M, M, -1).permute(0, 3, 1, 2),
                              scale_factor=(sx, sy), mode="bicubic", antialias=False)
    assert (w0, h0) == patch_pos.shape[-2:]
    return torch.cat([pos_embed[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, -1, pos_embed.shape[-1])], 1)


def mae_interpolate(pos_embed, h0, w0):
    """RETFound util/pos_embed.interpolate_pos_embed: bicubic to the new grid, align_corners=False."""
    M = int(math.sqrt(pos_embed.shape[1] - 1))
    grid = pos_embed[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(h0, w0), mode="bicubic", align_corners=False)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).flatten(1, 2)], 1)


def used_pos_embed(vit, h0, w0):
    """What the model adds to cls + patch tokens for an h0 x w0 grid (zero patch tokens, cls removed)."""
    with torch.no_grad():
        out = vit._pos_embed(torch.zeros(1, h0, w0, vit.embed_dim))
    return torch.cat([out[:, :1] - vit.cls_token, out[:, 1:]], 1)


def test_dinov2_official_pos_embed_resize():
    b = tiny("dinov2")
    with torch.no_grad():
        b.vit.pos_embed.normal_()
    pos = b.vit.pos_embed
    for h0, w0 in [(20, 30), (16, 16), (40, 23)]:
        ref = dinov2_official_interpolate(pos, h0 * 14, w0 * 14, 14)
        torch.testing.assert_close(used_pos_embed(b.vit, h0, w0), ref, **RESIZE_TOL)
        timm_way = resample_abs_pos_embed(pos, [h0, w0], [37, 37], 1)
        assert (timm_way - ref).abs().max() > 1e-2  # the option matters away from 518
    torch.testing.assert_close(used_pos_embed(b.vit, 37, 37), pos)  # 518 input: no resize at all


@pytest.mark.parametrize("opts", [{"pos_embed_resize": "timm"}, {"registers": True}])
def test_dinov2_timm_and_registers_resize_as_timm(opts):
    """pos_embed_resize: timm, and the _reg4 models (whose official code resizes with antialias and no
    offset, as timm does): the numbers of timm's own `resample_abs_pos_embed`."""
    b = tiny("dinov2", **opts)
    with torch.no_grad():
        b.vit.pos_embed.normal_()
    with torch.no_grad():
        out = b.vit._pos_embed(torch.zeros(1, 20, 30, b.vit.embed_dim))
    ref = resample_abs_pos_embed(b.vit.pos_embed, [20, 30], [37, 37], 0 if b.vit.no_embed_class else 1)
    torch.testing.assert_close(out[:, -600:], ref[:, -600:], **RESIZE_TOL)


@pytest.mark.parametrize("grid", [37, 14])
@pytest.mark.parametrize("how", ["offset", "plain", "antialias"])
def test_bicubic_matrices_are_interpolate(grid, how):
    """segframe.backbones.bicubic against F.interpolate, up and down, square and not, down to 1x2."""
    g = torch.randn(1, 8, grid, grid, generator=torch.Generator().manual_seed(grid))
    kind = {"offset": 0.1 if how == "offset" else 0.0, "antialias": how == "antialias"}
    for h, w in [(20, 30), (16, 16), (40, 23), (5, 7), (80, 3), (1, 2)]:
        if how == "offset":
            ref = F.interpolate(g, scale_factor=((h + 0.1) / grid, (w + 0.1) / grid), mode="bicubic")
        else:
            ref = F.interpolate(g, size=(h, w), mode="bicubic", antialias=how == "antialias")
        torch.testing.assert_close(bicubic_resize(g[0], (h, w), **kind), ref[0], **RESIZE_TOL)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 under autocast too, as F.interpolate
        got = bicubic_resize(g[0], (20, 30), **kind)
    assert got.dtype == torch.float32 and torch.equal(got, bicubic_resize(g[0], (20, 30), **kind))


@pytest.mark.parametrize("family,opts", [("retfound", {}), ("visionfm", {})])
def test_retfound_visionfm_official_resize(family, opts):
    b = tiny(family, **opts)
    with torch.no_grad():
        b.vit.pos_embed.normal_()
    ref = mae_interpolate(b.vit.pos_embed, 20, 30)
    torch.testing.assert_close(used_pos_embed(b.vit, 20, 30), ref, **RESIZE_TOL)


# ---------------------------------------------------------------- DINOv3 specifics

def _random(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in b.vit.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return b


def test_dinov3_separate_qkv_bias_same_maths():
    b = _random(tiny("dinov3"))
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        ours = b.features(x)
        for blk in b.vit.blocks:
            blk.attn.qkv_bias_separate = False  # timm's default path
        theirs = b.features(x)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_dinov3_rope_rescale_only_in_training():
    b = _random(tiny("dinov3", rope_rescale_coords=2.0))
    plain = _random(tiny("dinov3"))
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        torch.testing.assert_close(b.features(x), plain.features(x))  # eval: no augmentation
        b.train()
        torch.manual_seed(0)
        a1 = b.features(x)
        a2 = b.features(x)
    assert max((u - v).abs().max().item() for u, v in zip(a1, a2, strict=True)) > 1e-4


# ---------------------------------------------------------------- LoRA reaches every family

def _with_lora(b, separate=True):
    if not separate:
        for blk in b.vit.blocks:
            blk.attn.qkv_bias_separate = False
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=r".*blocks\.\d+\.attn\.qkv"), b)
    names = [n for n, _ in b.named_modules() if n.endswith("attn.qkv")]
    assert len(names) == b.num_layers
    return b


@pytest.mark.parametrize("family,opts", TINIES)
def test_lora_on_qkv_changes_features(family, opts):
    b = _random(tiny(family, **opts))
    x = torch.randn(1, 3, 2 * b.patch_size, 3 * b.patch_size)
    with torch.no_grad():
        before = b.features(x)
        _with_lora(b)
        torch.testing.assert_close(b.features(x), before)  # B = 0 at init
        for name, p in b.named_parameters():
            if "lora_B" in name:
                p.fill_(0.5)
        after = b.features(x)
    assert max((u - v).abs().max().item() for u, v in zip(after, before, strict=True)) > 1e-3


def test_lora_is_silent_without_separate_qkv_bias():
    """The trap the dinov3 builder avoids: timm's fused-bias path bypasses the LoRA wrapper."""
    b = _random(tiny("dinov3"))
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        before = b.features(x)
        _with_lora(b, separate=False)
        for name, p in b.named_parameters():
            if "lora_B" in name:
                p.fill_(0.5)
        torch.testing.assert_close(b.features(x), before)


def test_gray_backbone_builds():
    b = dinov2.build("tiny", dinov2.DinoV2Params(), in_chans=1)
    assert b.in_chans == 1
    assert tuple(b.features(torch.randn(1, 1, 28, 28))[0].shape) == (1, 64, 2, 2)
