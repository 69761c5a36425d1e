"""The UperNet plugin against transformers' own UperNetForSemanticSegmentation, with identical weights."""

import math

import pytest
import torch
from segframe_upernet import UperNetParams, build
from transformers import ConvNextConfig, UperNetConfig, UperNetForSemanticSegmentation

from segframe import ConfigError

CHANNELS = [8, 16, 24, 32]


def _randomize_norms(module: torch.nn.Module) -> None:
    """Give every BatchNorm non-trivial statistics and affine weights, so eval mode is a real test."""
    g = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    backbone = ConvNextConfig(
        hidden_sizes=CHANNELS, depths=[1, 1, 1, 1], out_features=["stage1", "stage2", "stage3", "stage4"]
    )
    config = UperNetConfig(
        backbone_config=backbone, hidden_size=16, pool_scales=[1, 2, 3, 6], num_labels=3,
        use_auxiliary_head=True, auxiliary_channels=8,
    )
    model = UperNetForSemanticSegmentation(config).eval()
    _randomize_norms(model)
    return model


def test_logits_equal_transformers(reference):
    params = UperNetParams(hidden_size=16, auxiliary_head=True, auxiliary_channels=8)
    head = build(params, CHANNELS, [4, 8, 16, 32], num_classes=3)
    head.head.load_state_dict(reference.decode_head.state_dict())
    head.auxiliary_head.load_state_dict(reference.auxiliary_head.state_dict())
    head.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = list(reference.backbone(x).feature_maps)
        ours = head(feats)
        theirs = reference.decode_head(feats)
        full = reference(x).logits
    assert ours.shape == (2, 3, 16, 16)
    assert (ours - theirs).abs().max() < 1e-5
    # the whole transformers model is the head followed by a bilinear resize to the image
    up = torch.nn.functional.interpolate(ours, size=(64, 64), mode="bilinear", align_corners=False)
    assert (up - full).abs().max() < 1e-5
    assert head.output_stride == 4
    assert torch.is_tensor(ours)  # the auxiliary logits only in training mode

    head.train()
    reference.auxiliary_head.train()
    ours, aux = head(feats)
    assert (aux - reference.auxiliary_head(feats)).abs().max() < 1e-5
    assert aux.shape[-2:] == feats[2].shape[-2:] and head.auxiliary_stride == 16


def test_weights_are_initialised():
    torch.manual_seed(0)
    head = build(UperNetParams(hidden_size=64), [96] * 4, [14] * 4, num_classes=5)
    fpn = head.head.fpn_bottleneck.conv.weight  # 3x3, fan_out = 64 * 9
    assert abs(fpn.std().item() - math.sqrt(2 / (64 * 9))) < 0.1 * math.sqrt(2 / (64 * 9))
    assert abs(head.head.classifier.weight.std().item() - 0.01) < 0.003
    assert torch.all(head.head.classifier.bias == 0)
    assert torch.all(head.head.bottleneck.batch_norm.weight == 1)


def test_auxiliary_index_out_of_range():
    with pytest.raises(ConfigError, match="auxiliary_in_index 2 is out of range for 2"):
        build(UperNetParams(hidden_size=8, auxiliary_head=True), [16, 16], [14, 14], num_classes=2)


@pytest.mark.parametrize("scale", [1, 2, 3, 6])
def test_pyramid_pooling_is_adaptive_average_pooling(scale):
    """AdaptiveAvgPool (exportable for every size) against torch's nn.AdaptiveAvgPool2d, at sizes that
    divide the scale, do not, and are smaller than it (overlapping bins)."""
    from segframe_upernet import AdaptiveAvgPool

    for size in [(1, 1), (2, 3), (6, 12), (7, 13), (17, 19), (33, 40)]:
        x = torch.randn(2, 3, *size) * 10
        expected = torch.nn.AdaptiveAvgPool2d(scale)(x)
        assert torch.allclose(AdaptiveAvgPool(scale)(x), expected, rtol=1e-5, atol=1e-5), size
