"""Necks and upsamplers: the pyramid against transformers' BEiT neck, strides for patch 14 and 16,
progressive stage counts, and the upsamplers against plain bilinear interpolation."""

import pytest
import torch
import torch.nn.functional as F
from transformers import BeitConfig
from transformers.models.beit.modeling_beit import BeitFPNNeck

from segframe.errors import ConfigError
from segframe.upsample import (
    BilinearUpsampler,
    FeaturePyramidNeck,
    IdentityNeck,
    ProgressiveUpsampler,
    build_neck,
    build_upsampler,
)


@pytest.mark.parametrize("train", [False, True])
def test_pyramid_matches_beit_neck(train):
    """Same weights as transformers' BeitFPNNeck (BEiT's Feature2Pyramid) -> same four maps."""
    torch.manual_seed(0)
    ref = BeitFPNNeck(BeitConfig(hidden_size=16))
    neck = FeaturePyramidNeck(16, patch_size=16)
    ref_sd = ref.state_dict()
    assert [v.shape for v in neck.state_dict().values()] == [v.shape for v in ref_sd.values()]
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    neck.load_state_dict(dict(zip(neck.state_dict(), ref.state_dict().values(), strict=True)))
    neck.train(train)
    ref.train(train)
    feats = [torch.randn(2, 16, 4, 6) for _ in range(4)]
    with torch.no_grad():
        for ours, theirs in zip(neck(feats), ref(feats), strict=True):
            torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("patch, strides", [(16, [4, 8, 16, 32]), (14, [3.5, 7, 14, 28])])
def test_pyramid_strides_follow_the_patch_grid(patch, strides):
    neck = FeaturePyramidNeck(8, patch_size=patch)
    assert neck.out_strides == strides and neck.out_channels == [8] * 4
    assert [type(s) for s in neck.out_strides][1:] == [int, int, int]
    g = (3, 5)  # odd grid: the x0.5 level keeps the last row/column (ceil mode)
    out = neck([torch.randn(1, 8, *g) for _ in range(4)])
    assert [tuple(o.shape[-2:]) for o in out] == [(12, 20), (6, 10), (3, 5), (2, 3)]
    one = neck([torch.randn(1, 8, 1, 1) for _ in range(4)])  # a single patch
    assert [tuple(o.shape[-2:]) for o in one] == [(4, 4), (2, 2), (1, 1), (1, 1)]


def test_neck_choices_and_errors():
    ident = build_neck("identity", 8, 14, 3)
    assert isinstance(ident, IdentityNeck) and ident.out_strides == [14] * 3
    feats = [torch.randn(1, 8, 2, 2) for _ in range(3)]
    assert all(a is b for a, b in zip(ident(feats), feats, strict=True))
    with pytest.raises(ConfigError, match="4 block indices"):
        build_neck("pyramid", 8, 14, 3)


@pytest.mark.parametrize(
    "stride, stages", [(1, 0), (2, 1), (3.5, 1), (4, 2), (7, 2), (14, 3), (16, 4), (32, 5)]
)
def test_progressive_stage_count(stride, stages):
    assert ProgressiveUpsampler(3, stride).num_stages == stages
    assert len(ProgressiveUpsampler(3, stride).stages) == stages


@pytest.mark.parametrize(
    "stride, grid, size", [(14, (2, 3), (28, 42)), (3.5, (8, 12), (28, 42)), (16, (1, 1), (16, 16))]
)
def test_progressive_is_bilinear_plus_a_learned_correction(stride, grid, size):
    torch.manual_seed(0)
    up = ProgressiveUpsampler(3, stride).train()
    logits = torch.randn(2, 3, *grid, requires_grad=True)
    bilinear = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    out = up(logits, size)
    assert out.shape == (2, 3, *size)
    assert (out - bilinear).abs().max() > 1e-4  # the learned path contributes
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in up.parameters())
    with torch.no_grad():
        up.out.weight.zero_()
        torch.testing.assert_close(up(logits, size), bilinear)


def test_bilinear_upsampler_and_choices():
    logits = torch.randn(1, 2, 3, 4)
    torch.testing.assert_close(
        BilinearUpsampler()(logits, (42, 56)), F.interpolate(logits, size=(42, 56), mode="bilinear")
    )
    assert BilinearUpsampler()(logits, (3, 4)) is logits
    assert isinstance(build_upsampler("bilinear", 2, 16), BilinearUpsampler)
    assert isinstance(build_upsampler("progressive", 2, 16), ProgressiveUpsampler)
    with pytest.raises(ConfigError, match="output_stride"):
        ProgressiveUpsampler(2, 0)
