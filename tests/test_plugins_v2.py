"""Decoder contract version 2: heads that ask for prefix tokens and the image get exactly those,
checked against timm's own outputs; a head that owns its loss; version-1 heads unchanged."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import tiny_config
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from segframe import DecoderSpec, hookimpl
from segframe.backbones.base import Backbone
from segframe.config import validate_config
from segframe.errors import ConfigError, PluginError, SegframeError
from segframe.model import ViTSegModel
from segframe.plugins import BackboneSpec, DecoderInputs, HeadContext

BACKBONES = {  # name -> (options, register/storage tokens): the released layouts
    "dinov3": ({}, 4),
    "dinov2": ({}, 0),
    "dinov2_reg": ({"registers": True}, 4),
    "retfound": ({}, 0),
    "retfound_dinov2": ({"variant": "dinov2"}, 0),
    "visionfm": ({}, 0),
}


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    read_cls: bool = Field(True, description="add the CLS token to every patch feature")


class Recorder(nn.Module):
    """A v2 head that keeps what it was given and adds the CLS token and the image's mean."""

    def __init__(self, params, in_channels, in_strides, num_classes, context: HeadContext):
        super().__init__()
        self.context = context
        self.inputs = {"prefix_tokens", "image"} if params.read_cls else {"image"}
        self.conv = nn.Conv2d(in_channels[0], num_classes, 1)
        self.output_stride = in_strides[0]
        self.seen: DecoderInputs | None = None

    def forward(self, inputs: DecoderInputs) -> torch.Tensor:
        self.seen = inputs
        x = inputs.features[0]
        if inputs.cls_tokens is not None:
            x = x + inputs.cls_tokens[0][..., None, None]
        return self.conv(x) + inputs.image.mean()


class RecorderPlugin:
    @hookimpl
    def segframe_decoders(self):
        return [DecoderSpec(name="recorder", description="records its inputs", params=Params,
                            inputs={"prefix_tokens", "image"}, build=Recorder)]


@pytest.fixture
def recorder(registry):
    registry.register(RecorderPlugin(), "recorder")
    return registry


def _model(backbone: str, **model) -> ViTSegModel:
    options, _ = BACKBONES[backbone]
    name = backbone.split("_")[0]
    torch.manual_seed(0)
    cfg = tiny_config({"name": name, **options}, decoder="recorder", **model)
    return ViTSegModel(validate_config(cfg), in_channels=3, num_classes=2).eval()


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_prefix_tokens_and_image_match_timm(recorder, backbone):
    """CLS and register tokens per chosen block are timm's prefix tokens, normed like the patches;
    the image is the normalised input, padded."""
    model = _model(backbone)
    _, registers = BACKBONES[backbone]
    x = torch.rand(2, 3, 30, 45)
    with torch.no_grad():
        model(x)
    seen = model.decoder.seen
    vit, p = model.backbone.vit, model.patch_size
    mean = torch.tensor(model.backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.backbone.std).view(1, 3, 1, 1)
    image = (x - mean) / std
    image = F.pad(image, (0, -45 % p, 0, 0), mode="reflect")
    image = F.pad(image, (0, 0, 0, -30 % p), mode="reflect")
    torch.testing.assert_close(seen.image, image)
    with torch.no_grad():
        ref = vit.forward_intermediates(image, indices=model.layers, norm=model.intermediate_norm,
                                        return_prefix_tokens=True, intermediates_only=True)
    assert len(seen.cls_tokens) == len(seen.register_tokens) == len(model.layers)
    for (patches, prefix), cls, regs, feat in zip(ref, seen.cls_tokens, seen.register_tokens, seen.features,
                                                   strict=True):
        assert prefix.shape[1] == 1 + registers and regs.shape == (2, registers, model.backbone.embed_dim)
        torch.testing.assert_close(cls, prefix[:, 0])
        torch.testing.assert_close(regs, prefix[:, 1:])
        torch.testing.assert_close(feat, patches)
    # DINOv3 keeps its CLS token apart from the storage tokens: timm's cls_token is the first one
    if backbone == "dinov3":
        block0 = vit.forward_intermediates(image, indices=[0], norm=False, return_prefix_tokens=True,
                                           intermediates_only=True)[0][1]
        assert not torch.allclose(block0[:, 0], block0[:, 1])
    ctx = model.decoder.context
    assert (ctx.patch_size, ctx.embed_dim, ctx.num_register_tokens, ctx.has_cls_token) == (
        p, model.backbone.embed_dim, registers, True)
    assert (ctx.image_channels, ctx.num_levels, ctx.neck) == (3, len(model.layers), "identity")


def test_the_norm_setting_applies_to_prefix_tokens(recorder):
    normed, raw = _model("dinov2"), _model("dinov2", intermediate_norm=False)
    x = torch.rand(1, 3, 28, 28)
    with torch.no_grad():
        normed(x)
        raw(x)
    a, b = normed.decoder.seen.cls_tokens[-1], raw.decoder.seen.cls_tokens[-1]
    torch.testing.assert_close(a, normed.backbone.vit.norm(b[:, None])[:, 0])


def test_only_what_the_head_asks_for(recorder):
    """A head narrowing its inputs to the image gets no prefix tokens (and none are computed)."""
    model = ViTSegModel(tiny_config(decoder={"name": "recorder", "read_cls": False}), num_classes=2)
    calls = []
    original = model.backbone.features
    model.backbone.features = lambda *a, **k: calls.append(k) or original(*a, **k)
    model(torch.rand(1, 3, 28, 28))
    assert calls == [{"prefix_tokens": False}]
    assert model.decoder.seen.cls_tokens is None and model.decoder.seen.register_tokens is None
    assert model.decoder.seen.image is not None


def _no_cls_backbone(size, params, in_chans=3):
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, class_token=False,
                            global_pool="avg", embed_dim=64, depth=2, num_heads=2, dynamic_img_size=True,
                            in_chans=in_chans)
    return Backbone(vit, family="nocls", size=size, patch_size=16)


class NoClsPlugin:
    @hookimpl
    def segframe_backbones(self):
        class P(BaseModel):
            model_config = ConfigDict(extra="forbid")

        return [BackboneSpec(name="nocls", description="a ViT without CLS token", params=P, sizes=["tiny"],
                             build=_no_cls_backbone)]


def test_a_missing_input_fails_at_build_naming_head_distribution_and_input(recorder):
    recorder.register(NoClsPlugin(), "nocls")
    cfg = {"model": {"backbone": "nocls", "backbone_size": "tiny", "decoder": "recorder"}}
    with pytest.raises(PluginError, match=r"decoder 'recorder' \(.*\) needs input 'prefix_tokens'.*nocls"):
        ViTSegModel(validate_config(cfg), num_classes=2)
    # the same head without the CLS token builds on it
    cfg["model"]["decoder"] = {"name": "recorder", "read_cls": False}
    assert ViTSegModel(validate_config(cfg), num_classes=2)(torch.rand(1, 3, 20, 20)).shape == (1, 2, 20, 20)


def test_a_head_asking_for_undeclared_inputs_is_a_plugin_error(registry):
    class Sneaky:
        @hookimpl
        def segframe_decoders(self):
            return [DecoderSpec(name="sneaky", description="reads the image undeclared", params=Params,
                                contract=2, build=Recorder)]

    registry.register(Sneaky(), "sneaky")
    with pytest.raises(PluginError, match=r"sneaky.*asks for \['image', 'prefix_tokens'\].*does not declare"):
        ViTSegModel(tiny_config(decoder="sneaky"), num_classes=2)


def test_spec_validation():
    with pytest.raises(ValueError, match="need contract 2"):
        DecoderSpec(name="x", description="d", params=Params, inputs={"image"}, contract=1, build=Recorder)
    with pytest.raises(ValueError, match="inputs"):
        DecoderSpec(name="x", description="d", params=Params, inputs={"cls"}, build=Recorder)
    spec = DecoderSpec(name="x", description="d", params=Params, inputs=["image"], build=Recorder)
    assert spec.contract == 2 and spec.inputs == frozenset({"image"})


# ---------------------------------------------------------------- a head that owns its loss

class LossHead(nn.Module):
    """Training: raw per-pixel scores at the token grid; loss = CE on the ignore-masked target
    resized by nearest neighbour. Eval: the same scores as logits."""

    def __init__(self, params, in_channels, in_strides, num_classes, context):
        super().__init__()
        self.conv = nn.Conv2d(in_channels[0], num_classes, 1)
        self.output_stride = in_strides[0]
        self.seen_target = None

    def forward(self, inputs):
        scores = self.conv(inputs.features[-1])
        return {"scores": scores} if self.training else scores

    def training_loss(self, outputs, target, ignore_index):
        self.seen_target = (target, ignore_index)
        scores = F.interpolate(outputs["scores"], size=target.shape[-2:], mode="nearest")
        loss = F.cross_entropy(scores, target[:, 0], ignore_index=ignore_index)
        return loss, {"ce": loss.detach()}


class LossPlugin:
    @hookimpl
    def segframe_decoders(self):
        class P(BaseModel):
            model_config = ConfigDict(extra="forbid")

        return [DecoderSpec(name="losshead", description="owns its loss", params=P, contract=2,
                            build=LossHead)]


def test_a_head_that_owns_its_loss(registry):
    registry.register(LossPlugin(), "losshead")
    model = ViTSegModel(tiny_config(decoder="losshead"), num_classes=3)
    assert model.owns_loss and type(model.upsampler).__name__ == "BilinearUpsampler"
    x, target = torch.rand(2, 3, 20, 30), torch.randint(0, 3, (2, 1, 20, 30)).float()
    out = model.train()(x)
    assert set(out) == {"scores"}  # raw training outputs, not logits
    loss, parts = model.training_loss(out, target)
    padded, ignore = model.decoder.seen_target
    assert ignore == 3 and padded.shape == (2, 1, 28, 42) and padded.dtype == torch.long
    assert (padded[..., 20:, :] == 3).all() and (padded[..., :20, 30:] == 3).all()
    assert torch.equal(padded[..., :20, :30], target.long())
    # by hand: CE over the unpadded pixels only
    scores = F.interpolate(out["scores"], size=(28, 42), mode="nearest")[..., :20, :30]
    torch.testing.assert_close(loss, F.cross_entropy(scores, target[:, 0].long()))
    assert set(parts) == {"ce"}
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # nnU-Net's ignore label passes through; eval gives dense logits at the input size
    target[0, 0, 0, 0] = 7
    model.training_loss(model(x), target, ignore_label=7)
    assert model.decoder.seen_target[1] == 7
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 3, 20, 30)


def test_loss_owning_head_errors(registry):
    registry.register(LossPlugin(), "losshead")
    model = ViTSegModel(tiny_config(decoder="losshead"), num_classes=3).train()
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(SegframeError, match=r"label\(s\) \[3, 5\] outside 0\.\.2 \(num_classes 3\)"):
        model.training_loss(model(x), torch.tensor([3.0, 5, 0, 1]).view(1, 1, 2, 2).expand(1, 1, 2, 2))
    with pytest.raises(ConfigError, match="model.upsampler: progressive cannot apply to decoder 'losshead'"):
        ViTSegModel(tiny_config(decoder="losshead", upsampler="progressive"), num_classes=3)
    plain = ViTSegModel(tiny_config(), num_classes=3)
    assert not plain.owns_loss
    with pytest.raises(SegframeError, match="no training_loss"):
        plain.training_loss(None, torch.zeros(1, 1, 4, 4))
