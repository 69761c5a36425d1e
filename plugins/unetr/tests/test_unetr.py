"""The UNETR plugin against MONAI's UNETR(spatial_dims=2) with copied weights, and its behaviour in
ViTSegModel: patch 14 (the 16x-token-grid canvas), odd sizes, the neck and layer-count refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import UNETR
from segframe_unetr import UnetrParams, build
from torch import nn

from segframe import ConfigError
from segframe.config import validate_config
from segframe.model import ViTSegModel
from segframe.plugins import DecoderInputs, HeadContext

HIDDEN = 64


def context(patch: int = 16, neck: str = "identity", image_channels: int = 3) -> HeadContext:
    return HeadContext(backbone="dinov3", patch_size=patch, embed_dim=HIDDEN, num_levels=4,
                       has_cls_token=True, num_register_tokens=0, image_channels=image_channels, neck=neck)


def reference(img_size: tuple[int, int], norm: str, res_block: bool, conv_block: bool = True,
              in_channels: int = 3, num_classes: int = 3) -> UNETR:
    torch.manual_seed(0)
    model = UNETR(in_channels, num_classes, img_size, feature_size=8, hidden_size=HIDDEN, mlp_dim=128,
                  num_heads=4, norm_name=norm, res_block=res_block, conv_block=conv_block, spatial_dims=2)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():  # non-trivial batch-norm statistics and affine weights
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model


def ours_like(ref: UNETR, norm: str, res_block: bool, conv_block: bool = True, patch: int = 16,
              in_channels: int = 3, num_classes: int = 3) -> nn.Module:
    params = UnetrParams(feature_size=8, norm=norm, res_block=res_block, conv_block=conv_block)
    head = build(params, [HIDDEN] * 4, [patch] * 4, num_classes, context(patch, image_channels=in_channels))
    # strict: every decoder tensor of MONAI's UNETR has the same name and shape in ours, and no other
    head.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("vit.")})
    return head


def as_map(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


@pytest.mark.parametrize(("norm", "res_block", "conv_block"), [
    ("instance", True, True), ("instance", False, True), ("batch", True, True), ("batch", False, True),
    ("instance", True, False),
])
@pytest.mark.parametrize("train", [False, True])
def test_logits_equal_monai(norm, res_block, conv_block, train):
    """MONAI's own ViT gives the hidden states (3, 6, 9 and the normed last); the same image goes to both."""
    ref = reference((48, 80), norm, res_block, conv_block).train(train)
    head = ours_like(ref, norm, res_block, conv_block).train(train)
    image = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        last, hidden = ref.vit(image)
        features = [as_map(t, 3, 5) for t in (hidden[3], hidden[6], hidden[9], last)]
        theirs = ref(image)
        ours = head(DecoderInputs(features=features, image=image))
    assert ours.shape == theirs.shape == (2, 3, 48, 80)
    assert (ours - theirs).abs().max() < 1e-5
    assert head.output_stride == 1


def test_a_perturbed_weight_breaks_parity():
    """The parity check can fail: one changed weight deep in the decoder changes the logits."""
    ref = reference((32, 32), "instance", True).eval()
    head = ours_like(ref, "instance", True).eval()
    with torch.no_grad():
        head.decoder4.conv_block.conv2.conv.weight[0, 0, 1, 1] += 0.5
        image = torch.randn(1, 3, 32, 32)
        last, hidden = ref.vit(image)
        features = [as_map(t, 2, 2) for t in (hidden[3], hidden[6], hidden[9], last)]
        diff = (head(DecoderInputs(features=features, image=image)) - ref(image)).abs().max()
    assert diff > 1e-3


class _GivenStates(nn.Module):
    """Stands in for MONAI's ViT: returns the given (last, hidden states) whatever the input."""

    def __init__(self, last: torch.Tensor, hidden: list[torch.Tensor]):
        super().__init__()
        self.out = (last, hidden)

    def forward(self, x: torch.Tensor):
        return self.out


def _unetr_model(backbone: str = "dinov2", in_channels: int = 3, **model) -> ViTSegModel:
    torch.manual_seed(0)
    cfg = validate_config({"model": {"backbone": backbone, "backbone_size": "tiny",
                                     "decoder": {"name": "unetr", "feature_size": 8}, **model}})
    return ViTSegModel(cfg, in_channels=in_channels, num_classes=2)


def test_patch_14_runs_monai_unetr_on_the_16x_canvas():
    """DINOv2 (patch 14): the head equals MONAI's UNETR fed the same levels and the padded image resized
    to 16x the token grid; its logits come at stride 14/16 and the model brings them to the input size."""
    model = _unetr_model("dinov2").eval()
    assert model.decoder.output_stride == 0.875
    seen = {}
    model.decoder.register_forward_hook(lambda mod, args, out: seen.update(inputs=args[0], out=out))
    x = torch.rand(1, 3, 97, 131)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (1, 2, 97, 131) and torch.isfinite(logits).all()
    inputs = seen["inputs"]
    assert inputs.image.shape[-2:] == (98, 140)  # padded to 7 x 10 patches of 14
    h, w = inputs.features[0].shape[-2:]
    assert (h, w) == (7, 10) and seen["out"].shape[-2:] == (112, 160)

    ref = UNETR(3, 2, (16 * h, 16 * w), feature_size=8, hidden_size=HIDDEN, mlp_dim=128, num_heads=4,
                spatial_dims=2).eval()
    ref.load_state_dict({**ref.state_dict(), **model.decoder.state_dict()})
    tokens = [f.flatten(2).transpose(1, 2) for f in inputs.features]
    ref.vit = _GivenStates(tokens[3], {3: tokens[0], 6: tokens[1], 9: tokens[2]})
    canvas = F.interpolate(inputs.image, size=(16 * h, 16 * w), mode="bilinear", align_corners=False)
    with torch.no_grad():
        theirs = ref(canvas)
    assert (seen["out"] - theirs).abs().max() < 1e-5


@pytest.mark.parametrize("backbone", ["dinov2", "dinov3"])
@pytest.mark.parametrize("size", [(97, 131), (1, 300), (1, 1)])
def test_odd_sizes_train_every_parameter(backbone, size):
    model = _unetr_model(backbone).train()
    out = model(torch.rand(2, 3, *size))
    assert out.shape == (2, 2, *size) and torch.isfinite(out).all()
    out.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not no_grad, no_grad


@pytest.mark.parametrize("in_channels", [1, 3, 5])
def test_image_skip_takes_the_model_channels(in_channels):
    model = _unetr_model("dinov3", in_channels=in_channels, freeze_backbone=True).eval()
    assert model.decoder.encoder1.layer.conv1.conv.in_channels == (3 if in_channels == 1 else in_channels)
    with torch.no_grad():
        assert model(torch.rand(1, in_channels, 20, 33)).shape == (1, 2, 20, 33)


def test_pyramid_neck_is_refused():
    with pytest.raises(ConfigError, match=r"model\.neck.*set model\.neck: identity"):
        _unetr_model("dinov3", neck="pyramid")


@pytest.mark.parametrize("layers", [[1, 3], [0, 1, 2]])
def test_other_level_counts_are_refused(layers):
    with pytest.raises(ConfigError, match=rf"model\.layers: unetr needs exactly 4 .* got {len(layers)}"):
        _unetr_model("dinov3", layers=layers)


def test_bad_params_name_the_key():
    with pytest.raises(ConfigError, match=r"model\.decoder\.norm"):
        validate_config({"model": {"backbone_size": "tiny", "decoder": {"name": "unetr", "norm": "group"}}})
    with pytest.raises(ConfigError, match=r"model\.decoder\.feature_size"):
        validate_config({"model": {"backbone_size": "tiny", "decoder": {"name": "unetr", "feature_size": 0}}})
