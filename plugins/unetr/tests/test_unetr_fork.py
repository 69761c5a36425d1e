"""The configurable UNETR decoder (`decoder_channels`) against the older nnU-Net fork's UNETR
(`nnunetv2/model/model_unetr.py`, imported through tests/fork_reference.py): the same weights copied
by name give the same logits, and every fork config's head has the fork's parameter count."""

from __future__ import annotations

import pytest
import torch
from fork_reference import FORK_ROOT, build_fork_model, fork_module, no_pretrained, read_fork_config
from segframe_unetr import ConfigurableUnetrDecoder, UnetrParams, build

from segframe import ConfigError
from segframe.config import validate_config
from segframe.model import ViTSegModel
from segframe.plugins import DecoderInputs, HeadContext

HIDDEN = 64
# the fork reads blocks 0..3 of 4; layer scale 1 (not timm's 1e-5) makes them differ, so a
# mix-up of levels shows
ARCH = {"embed_dim": HIDDEN, "depth": 4, "num_heads": 2, "init_values": 1.0}
# GroupNorm of 8, 4, 4, 2 and 1 groups
CHANNELS = [40, 20, 12, 6, 5]


def context(patch: int) -> HeadContext:
    return HeadContext(backbone="dinov3", patch_size=patch, embed_dim=HIDDEN, num_levels=4,
                       has_cls_token=True, num_register_tokens=0, image_channels=3, neck="identity")


def fork_unetr(backbone: str, num_classes: int, **decoder):
    """The fork's UNETRSegmentationModel on a tiny timm backbone, with random GroupNorm affines."""
    fork = fork_module("model_unetr")
    torch.manual_seed(0)
    with no_pretrained(ARCH):
        model = fork.create_segmentation_model(backbone_name=backbone, backbone_size="small",
                                               num_classes=num_classes, use_lora=False, **decoder)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return fork, model


def copy_head(fork_model, head) -> None:
    """The key map: the fork's `encoder.*` and `decoder.*` are the head's, name for name (strict)."""
    head.load_state_dict({k: v for k, v in fork_model.state_dict().items() if not k.startswith("backbone.")})


def param_counts(module: torch.nn.Module) -> dict[str, int]:
    return {name: sum(p.numel() for p in child.parameters()) for name, child in module.named_children()}


@pytest.mark.parametrize(("backbone", "patch"), [("dinov3", 16), ("dinov2", 14)])
@pytest.mark.parametrize("upsample_mode", ["deconv", "bilinear"])
def test_logits_equal_the_forks(backbone, patch, upsample_mode, monkeypatch):
    """An odd image through the fork's whole forward (reflect pad, its ViT levels, crop); the head gets
    the very levels the fork's decoder got. Patch 14: the fork crops its 16x-token-grid logits at the
    top left, so the head's logits are compared on that corner (the model resizes them instead)."""
    fork, ref = fork_unetr(backbone, 3, decoder_channels=CHANNELS, negative_slope=0.2,
                           upsample_mode=upsample_mode)
    levels = []
    real = fork.get_vit_features
    monkeypatch.setattr(fork, "get_vit_features", lambda *a, **k: levels.extend(real(*a, **k)) or levels)
    params = UnetrParams(decoder_channels=CHANNELS, negative_slope=0.2, upsample_mode=upsample_mode)
    head = build(params, [HIDDEN] * 4, [patch] * 4, 3, context(patch))
    assert isinstance(head, ConfigurableUnetrDecoder) and head.inputs == frozenset()
    copy_head(ref, head)
    theirs_counts = param_counts(ref)
    assert param_counts(head) == {"encoder": theirs_counts["encoder"], "decoder": theirs_counts["decoder"]}
    x = torch.randn(2, 3, 45, 77)
    with torch.no_grad():
        theirs = ref(x)
        ours = head(DecoderInputs(features=list(levels)))
    h, w = levels[0].shape[-2:]
    assert (h, w) == (-(-45 // patch), -(-77 // patch))
    assert ours.shape == (2, 3, 16 * h, 16 * w) and head.output_stride == (1 if patch == 16 else 0.875)
    assert theirs.shape == (2, 3, 45, 77)
    assert (ours[..., :45, :77] - theirs).abs().max() < 1e-4
    # the comparison can fail: one changed weight of the shallowest chain changes the logits
    with torch.no_grad():
        head.encoder["z1_blocks"][3].conv.weight[0, 0, 1, 1] += 0.5
        assert (head(DecoderInputs(features=list(levels)))[..., :45, :77] - theirs).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["unetr.yaml", "unetr_test_dinov3.yaml"])
def test_fork_configs_build_the_forks_head(name):
    """The fork's config, its `decoder:` keys as the plugin's params: the head of the fork's ViT-L
    network (one block, full width) has the same parameters, module by module."""
    path = FORK_ROOT / "nnunetv2" / "configs" / name
    decoder = dict(read_fork_config(path).model.decoder)
    ref = build_fork_model(path, num_classes=3, arch={"depth": 1})
    width = ref.backbone.embed_dim
    head = build(UnetrParams(**decoder), [width] * 4, [16] * 4, 3, context(16))
    ours, theirs = param_counts(head), param_counts(ref)
    assert ours == {"encoder": theirs["encoder"], "decoder": theirs["decoder"]}
    assert sum(ours.values()) > 10_000_000  # the fork's 11.6M head, not MONAI's 2.3M


def test_model_with_decoder_channels_trains_every_parameter():
    """In ViTSegModel: no image is computed for the head, odd sizes come back at the input size."""
    cfg = validate_config({"model": {"backbone": "dinov2", "backbone_size": "tiny", "decoder": {
        "name": "unetr", "decoder_channels": CHANNELS}}})
    torch.manual_seed(0)
    model = ViTSegModel(cfg, in_channels=1, num_classes=2).train()
    assert model.decoder_inputs == frozenset()
    out = model(torch.rand(2, 1, 33, 47))
    assert out.shape == (2, 2, 33, 47) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.decoder.parameters())


@pytest.mark.parametrize(("decoder", "match"), [
    ({"negative_slope": 0.1}, r"model\.decoder: only the configurable decoder reads negative_slope: set "
                              r"decoder_channels"),
    ({"upsample_mode": "bilinear"}, r"reads upsample_mode: set decoder_channels"),
    ({"decoder_channels": CHANNELS, "feature_size": 32}, r"only MONAI's decoder reads feature_size"),
    ({"decoder_channels": CHANNELS, "norm": "batch", "res_block": False}, r"reads norm and res_block"),
    ({"decoder_channels": [64, 32]}, r"model\.decoder\.decoder_channels: List should have at least 5"),
    ({"decoder_channels": CHANNELS, "negative_slope": -0.1}, r"model\.decoder\.negative_slope"),
    ({"decoder_channels": CHANNELS, "upsample_mode": "nearest"}, r"model\.decoder\.upsample_mode"),
])
def test_bad_layout_keys_are_refused(decoder, match):
    with pytest.raises(ConfigError, match=match):
        validate_config({"model": {"backbone_size": "tiny", "decoder": {"name": "unetr", **decoder}}})
