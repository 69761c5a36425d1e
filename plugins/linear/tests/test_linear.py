"""The linear plugin against a hand computation: explicit BatchNorm (eval with set running stats, and
train with batch statistics after the same channel dropout), the 1x1 conv as a matrix product,
the CLS token broadcast over each level, the pyramid neck's resize, and its inputs and refusals."""

import pytest
import torch
import torch.nn.functional as F
from segframe_linear import LinearParams, build

from segframe import ConfigError
from segframe.config import validate_config
from segframe.model import ViTSegModel
from segframe.plugins import DecoderInputs, HeadContext

D = 8


def context(has_cls: bool = True, neck: str = "identity") -> HeadContext:
    return HeadContext(backbone="dinov2", patch_size=14, embed_dim=D, num_levels=3, has_cls_token=has_cls,
                       num_register_tokens=0, image_channels=3, neck=neck)


def set_norm(head, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    n = head.norm.num_features
    with torch.no_grad():
        head.norm.running_mean.copy_(torch.randn(n, generator=g))
        head.norm.running_var.copy_(torch.rand(n, generator=g) + 0.5)
        head.norm.weight.copy_(torch.randn(n, generator=g))
        head.norm.bias.copy_(torch.randn(n, generator=g))
        head.classifier.bias.copy_(torch.randn(head.classifier.bias.shape, generator=g))


def by_hand(features, cls_tokens, head, batch_stats: bool = False) -> torch.Tensor:
    """Concat (patch, CLS repeated at every pixel) per level at level 0's size, BN, x @ W^T + b."""
    h, w = features[0].shape[-2:]
    parts = []
    for i, f in enumerate(features):
        level = [f]
        if cls_tokens is not None:
            level.append(cls_tokens[i][:, :, None, None].repeat(1, 1, *f.shape[-2:]))
        f = torch.cat(level, dim=1)
        parts.append(f if f.shape[-2:] == (h, w) else
                     F.interpolate(f, size=(h, w), mode="bilinear", align_corners=False))
    x = torch.cat(parts, dim=1)
    return bn_conv(x, head, batch_stats)


def bn_conv(x, head, batch_stats: bool) -> torch.Tensor:
    bn = head.norm
    if batch_stats:
        mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    x = (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + bn.eps)
    x = x * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    pixels = x.permute(0, 2, 3, 1)  # (B, H, W, C)
    weight = head.classifier.weight[:, :, 0, 0]  # (K, C)
    return (pixels @ weight.T + head.classifier.bias).permute(0, 3, 1, 2)


@pytest.mark.parametrize("use_cls", [False, True])
def test_equals_hand_computation(use_cls):
    torch.manual_seed(0)
    head = build(LinearParams(use_cls_token=use_cls), [D] * 3, [14] * 3, 4, context()).eval()
    set_norm(head)
    assert head.norm.num_features == 3 * D * (2 if use_cls else 1)
    feats = [torch.randn(2, D, 5, 7) for _ in range(3)]
    cls = [torch.randn(2, D) for _ in range(3)] if use_cls else None
    with torch.no_grad():
        ours = head(DecoderInputs(features=feats, cls_tokens=cls))
        hand = by_hand(feats, cls, head)
    assert ours.shape == (2, 4, 5, 7) and head.output_stride == 14
    assert (ours - hand).abs().max() < 1e-5
    # the comparison can fail: one perturbed classifier weight (a CLS channel when used) changes it
    with torch.no_grad():
        head.classifier.weight[1, 2 * D - 1 if use_cls else D - 1] += 0.5
        assert (head(DecoderInputs(features=feats, cls_tokens=cls)) - hand).abs().max() > 1e-3


def test_pyramid_levels_are_resized_to_the_first():
    torch.manual_seed(0)
    head = build(LinearParams(use_cls_token=True), [D] * 3, [3.5, 7, 28], 3, context(neck="pyramid")).eval()
    set_norm(head)
    feats = [torch.randn(2, D, 12, 8), torch.randn(2, D, 6, 4), torch.randn(2, D, 2, 1)]
    cls = [torch.randn(2, D) for _ in range(3)]
    with torch.no_grad():
        ours = head(DecoderInputs(features=feats, cls_tokens=cls))
        hand = by_hand(feats, cls, head)
    assert ours.shape == (2, 3, 12, 8) and head.output_stride == 3.5
    assert (ours - hand).abs().max() < 1e-5


def test_training_is_dropout_then_batch_statistics():
    """DINOv3's order in training: Dropout2d on the concatenation, then BN with batch statistics."""
    head = build(LinearParams(dropout=0.5), [D] * 2, [16] * 2, 3, context()).train()
    set_norm(head)
    feats = [torch.randn(3, D, 4, 5) for _ in range(2)]
    torch.manual_seed(7)
    ours = head(DecoderInputs(features=feats))
    torch.manual_seed(7)
    dropped = F.dropout2d(torch.cat(feats, dim=1), 0.5, training=True)
    assert (dropped == 0).all(dim=(2, 3)).any()  # some channels really were dropped
    assert (ours - bn_conv(dropped, head, batch_stats=True)).abs().max() < 1e-5


def test_batch_of_one_single_pixel_trains_with_running_stats():
    """One value per channel cannot be batch-normalised: training then uses the running statistics."""
    head = build(LinearParams(dropout=0.0), [D], [16], 2, context()).train()
    set_norm(head)
    feats = [torch.randn(1, D, 1, 1)]
    out = head(DecoderInputs(features=feats))
    assert (out - bn_conv(feats[0], head, batch_stats=False)).abs().max() < 1e-5
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


@pytest.mark.parametrize("backbone", ["dinov2", "dinov3"])
def test_model_feeds_the_real_cls_token(backbone):
    """In the model the head reads each chosen block's CLS token (not a register / storage token);
    without use_cls_token it asks for no extra input."""
    cfg = {"model": {"backbone": backbone, "backbone_size": "tiny", "layers": [1, 3],
                     "decoder": {"name": "linear", "use_cls_token": True}}}
    torch.manual_seed(0)
    model = ViTSegModel(validate_config(cfg), num_classes=3).eval()
    assert model.decoder_inputs == {"prefix_tokens"}
    set_norm(model.decoder)
    x = model.pad(model._normalize(torch.rand(2, 3, 40, 30)))
    with torch.no_grad():
        feats, prefix = model.backbone.features(x, [1, 3], model.intermediate_norm, prefix_tokens=True)
        cls = [p[:, 0] for p in prefix]  # timm: the CLS token first, then registers / storage tokens
        ours = model.decoder(model._head_inputs(x))
        hand = by_hand(feats, cls, model.decoder)
    assert (ours - hand).abs().max() < 1e-5

    cfg["model"]["decoder"] = "linear"
    plain = ViTSegModel(validate_config(cfg), num_classes=3)
    assert plain.decoder_inputs == frozenset() and plain.decoder.norm.num_features == 2 * 64


def test_cls_token_needs_a_backbone_with_one():
    with pytest.raises(ConfigError, match="model.decoder.use_cls_token: backbone dinov2 has no CLS token"):
        build(LinearParams(use_cls_token=True), [D], [14], 2, context(has_cls=False))


def test_bad_dropout_names_the_key():
    with pytest.raises(ConfigError, match="model.decoder.dropout"):
        validate_config({"model": {"decoder": {"name": "linear", "dropout": 1.5}}})


def test_init_and_no_batchnorm():
    torch.manual_seed(0)
    head = build(LinearParams(batchnorm=False), [64] * 4, [16] * 4, 5, context())
    assert isinstance(head.norm, torch.nn.Identity)
    assert abs(head.classifier.weight.std().item() - 0.01) < 0.002 and torch.all(head.classifier.bias == 0)
