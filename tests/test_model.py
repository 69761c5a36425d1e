"""ViTSegModel: every registered backbone x decoder x neck, padding, channels, normalisation,
bad input, gradient checkpointing, autocast, torch.compile, parameter groups, pretrained loading.

Backbones and decoders are taken from the registry, so newly registered ones are covered.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from pydantic import BaseModel, ConfigDict

from segframe import DecoderSpec, hookimpl
from segframe.config import validate_config
from segframe.errors import ConfigError, PluginError, SegframeError
from segframe.model import ViTSegModel, create_segmentation_model
from segframe.plugins import get_registry

REGISTRY = get_registry()
BACKBONES = list(REGISTRY.backbones())
DECODERS = list(REGISTRY.decoders())


def decoder_section(name: str) -> dict:
    """Small heads where the decoder has a width (hidden_size); defaults otherwise."""
    params = REGISTRY.decoder(name).spec.params.model_fields
    return {"name": name, **({"hidden_size": 32} if "hidden_size" in params else {})}


def build(backbone="dinov2", decoder="upernet", in_channels=3, num_classes=3, seed=0, lora=None, **model):
    torch.manual_seed(seed)
    cfg = tiny_config(backbone, decoder_section(decoder) if isinstance(decoder, str) else decoder, **model)
    if lora:
        cfg["lora"] = lora
    return ViTSegModel(validate_config(cfg), in_channels=in_channels, num_classes=num_classes)


def clone_weights(src: ViTSegModel, dst: ViTSegModel) -> ViTSegModel:
    dst.load_state_dict(src.state_dict())
    return dst


# Softmax over the keys ignores a shift common to all of them, so an attention key bias has a gradient
# that is zero in exact arithmetic: float32 gives it rounding noise, no evidence either way.
KEY_BIAS = re.compile(r"\.k_proj\.bias$")


def without_graph_gradient(model: torch.nn.Module) -> list[str]:
    """Trainable parameters that got no gradient at all from the last backward (not in the graph:
    DDP without find_unused_parameters fails on those)."""
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def dead_parameters(model: torch.nn.Module, x: torch.Tensor) -> list[str]:
    """Trainable parameters the eval-mode logits do not depend on (zero gradient). Eval mode because in
    training mode a bias that feeds a BatchNorm (the pyramid neck's, SegFormer's projections) has a
    gradient that is zero in exact arithmetic, the batch mean removes it, and float32 leaves rounding
    noise whose size and sign depend on the CPU and thread count; on running statistics nothing
    cancels. Leaves the model in eval mode with its gradients replaced."""
    model.zero_grad(set_to_none=True)
    model.eval()(x).square().mean().backward()
    return [n for n, p in model.named_parameters() if p.requires_grad and not KEY_BIAS.search(n)
            and (p.grad is None or not p.grad.abs().sum() > 0)]


# ---------------------------------------------------------------- the matrix

@pytest.mark.parametrize("neck", ["identity", "pyramid"])
@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_decoder_neck(backbone, decoder, neck):
    """Shape, no NaN, every trainable parameter in the training graph and moving the eval logits, for
    any H, W. A head that cannot use a neck refuses it at build time with an error naming model.neck;
    a head that owns its loss is trained through its loss."""
    try:
        model = build(backbone, decoder, neck=neck).train()
    except ConfigError as exc:
        assert "model.neck" in str(exc), exc
        return
    x = torch.rand(2, 3, 32, 48)
    out = model(x)
    if model.owns_loss:
        loss = model.training_loss(out, torch.randint(0, 3, (2, 1, 32, 48)))[0]
    else:
        assert out.shape == (2, 3, 32, 48)
        assert torch.isfinite(out).all()
        loss = out.square().mean()
        assert model.upsampler.num_stages >= 1 or model.decoder.output_stride < 2
    assert torch.isfinite(loss)
    loss.backward()
    assert not without_graph_gradient(model)
    assert not dead_parameters(model, x)
    with torch.no_grad():
        odd = model(torch.rand(1, 3, 17, 5))
    assert odd.shape == (1, 3, 17, 5) and torch.isfinite(odd).all()


@pytest.mark.parametrize("backbone", BACKBONES)
def test_unused_backbone_parameters_are_frozen(backbone):
    """Blocks after the last chosen layer (and an unused final norm) would get no gradient: they are
    not built, so every trainable parameter is used (DDP without find_unused_parameters requires that)."""
    model = build(backbone, layers=[0, 2], intermediate_norm=False)
    model(torch.rand(2, 3, 32, 32)).mean().backward()
    assert len(model.backbone.vit.blocks) == 3
    assert not list(model.backbone.vit.norm.parameters())
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- padding and cropping

@pytest.mark.parametrize("backbone", BACKBONES)
def test_output_equals_hand_padded_input_cropped(backbone):
    """The model's own pad + crop equals padding by hand (torch's reflect) and cropping the result.

    A ViT attends globally, so every output pixel depends on the whole padded input: outputs of
    two different paddings are not expected to agree anywhere. What must hold is that the
    model pads the way it says and upsamples to the padded size before cropping (upsampling
    straight to (H, W) would shift every pixel).
    """
    model = build(backbone, neck="pyramid").eval()
    p = model.patch_size
    x = torch.rand(1, 3, 2 * p + 3, 3 * p - 5)
    h, w = x.shape[-2:]
    padded = F.pad(x, (0, -w % p, 0, -h % p), mode="reflect")
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(padded)[..., :h, :w], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("h, w, modes", [
    (30, 44, ("reflect", "reflect")), (5, 30, ("replicate", "reflect")),
    (28, 3, ("reflect", "replicate")), (1, 1, ("replicate", "replicate")),
])
def test_pad_reflects_or_replicates_per_side(h, w, modes):
    model = build("dinov2")
    x = torch.rand(1, 3, h, w)
    ref = F.pad(x, (0, -w % 14, 0, 0), mode=modes[1]) if w % 14 else x
    ref = F.pad(ref, (0, 0, 0, -h % 14), mode=modes[0]) if h % 14 else ref
    torch.testing.assert_close(model.pad(x), ref)
    assert model.pad(torch.rand(1, 3, 28, 42)).shape[-2:] == (28, 42)


@pytest.mark.parametrize("neck", ["identity", "pyramid"])
def test_one_patch_input_with_large_pool_scales(neck):
    """UperNet's pooling (scales up to 6) on a 1x1 token grid, and a 1x1-pixel image."""
    model = build("dinov2", {"name": "upernet", "hidden_size": 16, "pool_scales": [1, 2, 3, 6]}, neck=neck)
    out = model.train()(torch.rand(2, 3, 14, 14))
    assert out.shape == (2, 3, 14, 14) and torch.isfinite(out).all()
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 3, 1, 1)).shape == (1, 3, 1, 1)


# ---------------------------------------------------------------- channels and normalisation

def test_gray_input_is_repeated_to_rgb():
    rgb = build("dinov2", in_channels=3).eval()
    gray = clone_weights(rgb, build("dinov2", in_channels=1, seed=1)).eval()
    x = torch.rand(2, 1, 30, 44)
    with torch.no_grad():
        torch.testing.assert_close(gray(x), rgb(x.repeat(1, 3, 1, 1)))


def test_backbone_normalisation_against_hand_computation():
    model = build("dinov2", normalize="backbone").eval()
    raw = clone_weights(model, build("dinov2", normalize="none", seed=1)).eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # ImageNet, DINOv2's statistics
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = torch.rand(1, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), raw((x - mean) / std), rtol=1e-5, atol=1e-5)


def test_other_channel_counts_build_the_backbone_with_them():
    model = build("visionfm", in_channels=4).eval()
    assert model.backbone.vit.patch_embed.proj.weight.shape[1] == 4
    bb = model.backbone
    torch.testing.assert_close(model.mean.flatten(), torch.full((4,), sum(bb.mean) / 3))
    torch.testing.assert_close(model.std.flatten(), torch.full((4,), sum(bb.std) / 3))
    with torch.no_grad():
        assert model(torch.rand(1, 4, 20, 20)).shape == (1, 3, 20, 20)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("x, match", [
    (torch.rand(3, 32, 32), r"\(B, C, H, W\), got shape \(3, 32, 32\).*batch dimension"),
    (torch.rand(1, 1, 3, 32, 32), r"got shape \(1, 1, 3, 32, 32\)"),
    (torch.rand(2, 4, 32, 32), r"expected 3 input channels, got 4 \(shape \(2, 4, 32, 32\)\)"),
    (torch.rand(1, 3, 0, 32), r"empty dimension: shape \(1, 3, 0, 32\)"),
    (torch.full((1, 3, 8, 8), float("nan")), r"shape \(1, 3, 8, 8\) contains NaN"),
    (torch.full((1, 3, 8, 8), float("inf")), r"contains infinite"),
    (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), r"floating-point input, got torch.uint8"),
])
def test_bad_input_is_a_clear_error(x, match):
    with pytest.raises(SegframeError, match=match):
        build("dinov2")(x)


def test_bad_construction_is_a_clear_error(registry):
    with pytest.raises(ConfigError, match="4 block indices"):
        build("dinov2", neck="pyramid", layers=[1, 3])
    with pytest.raises(SegframeError, match=r"model.layers \[0, 9\] invalid .* 0\.\.3"):
        build("dinov2", layers=[0, 9])
    with pytest.raises(SegframeError, match=r"model.layers \[3, 1\] must be strictly increasing.*\[1, 3\]"):
        build("dinov2", layers=[3, 1])
    with pytest.raises(ConfigError, match="in_channels"):
        build("dinov2", in_channels=0)

    class NoParams(BaseModel):
        model_config = ConfigDict(extra="forbid")

    class NoStride:
        @hookimpl
        def segframe_decoders(self):
            return [DecoderSpec(name="nostride", description="head without output_stride",
                                params=NoParams, build=lambda p, c, s, k: torch.nn.Conv2d(c[0], k, 1))]

    registry.register(NoStride(), "nostride")
    with pytest.raises(PluginError, match="nostride.*output_stride"):
        ViTSegModel(tiny_config(decoder="nostride"), num_classes=2)


# ---------------------------------------------------------------- memory, precision, compile

def test_grad_checkpointing_recomputes_blocks_and_keeps_gradients():
    ref = build("dinov3", neck="pyramid", lora={"enabled": True, "r": 2}).train()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    ckpt = copy.deepcopy(ref)
    ckpt.backbone.set_grad_checkpointing(True)
    assert build("dinov3", grad_checkpointing=True).backbone.vit.grad_checkpointing

    calls = []
    ckpt.backbone.vit.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    x = torch.rand(2, 3, 32, 32)
    torch.manual_seed(0)
    ref(x).square().mean().backward()
    torch.manual_seed(0)
    ckpt(x).square().mean().backward()
    assert len(calls) == 2  # forward, and again in backward: the block was checkpointed
    grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in grads)
    for n, p in ckpt.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backbone", ["dinov2", "dinov3"])
def test_autocast_bfloat16_on_cpu(backbone):
    model = build(backbone, neck="pyramid").eval()
    x = torch.rand(1, 3, 30, 44)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    err = (out.float() - ref).abs().max().item()
    assert err < 0.05 * ref.abs().max().item(), err  # bfloat16 keeps ~3 significant digits


def test_torch_compile_on_cpu_matches_eager():
    """The default pipeline (pyramid, UperNet, progressive, LoRA) through torch.compile: dynamo's graph
    capture, AOTAutograd and inductor's decompositions and partitioner, the stages that read segframe's
    code, compared with eager. The backend stops short of inductor's C++ kernels: compiling those is
    torch's own code and took 160 s of a 2-core suite for this one network."""
    model = build("dinov2", neck="pyramid", lora={"enabled": True, "r": 2}).eval()
    x = torch.rand(1, 3, 30, 44)
    compiled = torch.compile(model, backend="aot_eager_decomp_partition")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- optimizer groups

def test_param_groups_layer_decay_by_hand():
    model = build("dinov2", neck="pyramid")
    groups = model.param_groups(lr=1.0, weight_decay=0.05, layer_decay=0.5, backbone_lr_scale=0.1)
    by_name = {n: g for g in groups for n in g["names"]}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(by_name) == sorted(trainable)  # each trainable parameter exactly once
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    # depth 4: layer ids 0 (embeddings) .. 5 (final norm); lr = 0.1 * 0.5 ** (5 - id)
    expect = {
        "backbone.vit.cls_token": (0.1 * 0.5**5, 0.0),
        "backbone.vit.pos_embed": (0.1 * 0.5**5, 0.0),
        "backbone.vit.patch_embed.proj.weight": (0.1 * 0.5**5, 0.05),
        "backbone.vit.blocks.0.attn.qkv.weight": (0.1 * 0.5**4, 0.05),
        "backbone.vit.blocks.0.attn.qkv.bias": (0.1 * 0.5**4, 0.0),
        "backbone.vit.blocks.3.mlp.fc2.weight": (0.1 * 0.5**1, 0.05),
        "backbone.vit.blocks.3.ls2.gamma": (0.1 * 0.5**1, 0.0),
        "backbone.vit.norm.weight": (0.1, 0.0),
        "neck.levels.0.0.weight": (1.0, 0.05),
        "neck.levels.0.1.weight": (1.0, 0.0),
        "upsampler.out.weight": (1.0, 0.05),
    }
    for name, (lr, wd) in expect.items():
        assert by_name[name]["lr"] == pytest.approx(lr) and by_name[name]["weight_decay"] == wd, name
    torch.optim.AdamW(groups, lr=1.0)  # extra keys (names, lr_scale) are accepted


# ---------------------------------------------------------------- factory and pretrained weights

def dinov2_file(path, seed=5):
    """A tiny DINOv2 file in the official layout (timm keys + mask_token) with random weights."""
    torch.manual_seed(seed)
    spec = REGISTRY.backbone("dinov2").spec
    writer = spec.build("tiny", spec.params(registers=False))
    with torch.no_grad():
        for p in writer.vit.parameters():
            p.normal_(std=0.2)
    sd = dict(writer.vit.state_dict())
    sd["mask_token"] = torch.zeros(1, writer.embed_dim)
    torch.save(sd, path)
    return writer


def test_factory_is_seed_compatible(tmp_path):
    writer = dinov2_file(tmp_path / "w.pth")
    model = create_segmentation_model(
        "dinov2", "tiny", num_classes=2, checkpoint_path=str(tmp_path / "w.pth"), freeze_backbone=False,
        use_lora=True, lora_rank=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=["qkv", "proj"],
        decoder="segformer", hidden_size=32,
    )
    cfg = model.config
    assert (cfg.model.decoder.name, cfg.model.decoder.params["hidden_size"]) == ("segformer", 32)
    assert (cfg.lora.enabled, cfg.lora.r, cfg.lora.target_modules) == (True, 4, ["qkv", "proj"])
    qkv = model.backbone.vit.blocks[1].attn.qkv
    torch.testing.assert_close(qkv.base_layer.weight, writer.vit.blocks[1].attn.qkv.weight)
    assert model.backbone.vit.blocks[1].attn.proj.lora_A["default"].weight.shape == (4, 64)
    with pytest.raises(ConfigError, match="hidden_sise: unknown key"):
        create_segmentation_model("dinov2", "tiny", decoder="upernet", hidden_sise=32)


def test_load_pretrained_before_and_after_lora(tmp_path):
    """Loading into the LoRA-wrapped model (as nnU-Net does at training start) equals loading into
    the plain model and adding LoRA afterwards."""
    dinov2_file(tmp_path / "w.pth")
    lora = {"enabled": True, "r": 2}
    after = build("dinov2", checkpoint_path=str(tmp_path / "w.pth"), lora=lora).eval()
    before = build("dinov2", checkpoint_path=str(tmp_path / "w.pth")).eval()
    assert after.load_pretrained().missing == []
    report = before.load_pretrained()
    assert "blocks.0.attn.qkv.weight" in report.loaded
    before.enable_lora()
    heads = {k: v for k, v in after.state_dict().items() if not k.startswith("backbone.")}
    before.load_state_dict(heads, strict=False)
    assert before.state_dict().keys() == after.state_dict().keys()
    x = torch.rand(1, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(after(x), before(x))
    assert build("dinov2").load_pretrained() is None  # no checkpoint_path: random init
