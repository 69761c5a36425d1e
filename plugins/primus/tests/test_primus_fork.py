"""MedDINOv3's Primus layout (`multiscale`, `embed_dim`, `patch_embed_size`) against the older nnU-Net
fork's `nnunetv2/model/primus.py` (imported through tests/fork_reference.py): the same weights copied
by a key map give the same logits, and every fork config's head has the fork's parameter count."""

from __future__ import annotations

import pytest
import torch
from fork_reference import FORK_ROOT, build_fork_model, fork_module, no_pretrained, read_fork_config
from segframe_primus import PrimusParams, build

from segframe import ConfigError
from segframe.config import validate_config
from segframe.model import ViTSegModel
from segframe.plugins import DecoderInputs, HeadContext

HIDDEN = 64
# the fork reads blocks 0..3 of 4; layer scale 1 (not timm's 1e-5) makes them differ, so a
# mix-up of levels shows
ARCH = {"embed_dim": HIDDEN, "depth": 4, "num_heads": 2, "init_values": 1.0}


def context(patch: int) -> HeadContext:
    return HeadContext(backbone="dinov3", patch_size=patch, embed_dim=HIDDEN, num_levels=4,
                       has_cls_token=True, num_register_tokens=4, image_channels=3, neck="identity")


def fork_head_state(model) -> dict[str, torch.Tensor]:
    """The key map: the fork's `proj.*` is the head's, its `up_projection.decode.*` the head's `decode.*`."""
    return {k.removeprefix("up_projection."): v for k, v in model.state_dict().items()
            if k.startswith(("proj.", "up_projection."))}


def head_counts(model) -> dict[str, int]:
    """Parameters per head module, the fork's modules under the head's names."""
    count = lambda m: sum(p.numel() for p in m.parameters()) if m is not None else 0  # noqa: E731
    decode = model.up_projection if hasattr(model, "up_projection") else model.decode
    return {"proj": count(model.proj), "decode": count(decode)}


@pytest.mark.parametrize(("backbone", "patch", "decoder"), [
    ("dinov3", 16, {"multiscale": False}),
    ("dinov3", 16, {"multiscale": False, "embed_dim": 40, "patch_embed_size": 8}),
    ("dinov3", 16, {"multiscale": True}),
    ("dinov3", 16, {"multiscale": True, "embed_dim": 24, "patch_embed_size": 16}),
    ("dinov2", 14, {"multiscale": True, "embed_dim": 48, "patch_embed_size": 16}),
])
def test_logits_equal_the_forks(backbone, patch, decoder, monkeypatch):
    """An odd image through the fork's whole forward (reflect pad, its ViT levels, proj, decode, crop);
    the head gets the very levels the fork's decoder got. Where the fork's decode factor is not the
    patch, it crops its logits at the top left, so the head's are compared on that corner (the model
    resizes them instead)."""
    fork = fork_module("primus")
    torch.manual_seed(0)
    with no_pretrained(ARCH):
        ref = fork.create_segmentation_model(backbone_name=backbone, backbone_size="small", num_classes=3,
                                             use_lora=False, **decoder)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial LayerNorm weights
        for p in ref.up_projection.parameters():
            if p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g))
    levels = []
    real = fork.get_vit_features
    monkeypatch.setattr(fork, "get_vit_features", lambda *a, **k: levels.extend(real(*a, **k)) or levels)

    head = build(PrimusParams(**decoder), [HIDDEN] * 4, [patch] * 4, 3, context(patch)).eval()
    head.load_state_dict(fork_head_state(ref))  # strict: the same modules and shapes, no other
    assert head_counts(head) == head_counts(ref)
    assert (head.proj is None) == (decoder.get("embed_dim") is None)
    x = torch.randn(2, 3, 45, 77)
    with torch.no_grad():
        theirs = ref.eval()(x)
        ours = head(DecoderInputs(features=list(levels)))
    assert len(levels) == (4 if decoder["multiscale"] else 1)
    h, w = levels[0].shape[-2:]
    f = decoder.get("patch_embed_size", patch)
    assert ours.shape == (2, 3, f * h, f * w) and head.output_stride == patch / f
    crop = ours[..., :45, :77]
    assert crop.shape == theirs.shape
    assert (crop - theirs).abs().max() < 1e-4
    # the comparison can fail: one changed weight of the first stage changes the logits
    with torch.no_grad():
        head.decode[0][0].weight[0, 0, 0, 0] += 0.5
        assert (head(DecoderInputs(features=list(levels)))[..., :45, :77] - theirs).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["primus.yaml", "primus_multiscale.yaml", "primus_test dinov2.yaml"])
def test_fork_configs_build_the_forks_head(name):
    """The fork's config, its `decoder:` keys as the plugin's params: the head of the fork's ViT-L
    network (one block, full width; four levels as segframe's default layers give) has the same
    parameters, module by module."""
    path = FORK_ROOT / "nnunetv2" / "configs" / name
    decoder = dict(read_fork_config(path).model.decoder)
    ref = build_fork_model(path, num_classes=3, arch={"depth": 1})
    width, patch = ref.backbone.embed_dim, ref.backbone_patch_size
    head = build(PrimusParams(**decoder), [width] * 4, [patch] * 4, 3, context(patch))
    assert head_counts(head) == head_counts(ref)
    if decoder["multiscale"]:
        assert sum(head_counts(head).values()) > 37_000_000  # the fork's 37.7M, not the last level's


def test_model_multiscale_trains_every_parameter():
    """In ViTSegModel: every level of model.layers reaches the head; odd sizes come back at the input
    size (patch 14 decoded x16, resized)."""
    decoder = {"name": "primus", "multiscale": True, "embed_dim": 32, "patch_embed_size": 16}
    cfg = validate_config({"model": {"backbone": "dinov2", "backbone_size": "tiny", "layers": [1, 3],
                                     "decoder": decoder}})
    torch.manual_seed(0)
    model = ViTSegModel(cfg, in_channels=1, num_classes=2).train()
    assert model.decoder.proj.in_channels == 2 * model.backbone.embed_dim
    assert model.decoder.output_stride == 0.875
    out = model(torch.rand(2, 1, 33, 47))
    assert out.shape == (2, 2, 33, 47) and torch.isfinite(out).all()
    out.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad


@pytest.mark.parametrize(("decoder", "match"), [
    ({"embed_dim": 256}, r"model\.decoder: only MedDINOv3's layout reads embed_dim: set multiscale"),
    ({"patch_embed_size": 16}, r"reads patch_embed_size: set multiscale"),
    ({"multiscale": True, "patch_embed_size": 12}, r"patch_embed_size must be a power of two"),
    ({"multiscale": False, "patch_embed_size": 1}, r"patch_embed_size must be a power of two"),
    ({"multiscale": False, "patch_embed_size": 16, "patch_rounding": "down"}, r"patch_rounding has no "),
    ({"multiscale": True, "embed_dim": 0}, r"model\.decoder\.embed_dim"),
])
def test_bad_layout_keys_are_refused(decoder, match):
    with pytest.raises(ConfigError, match=match):
        validate_config({"model": {"backbone_size": "tiny", "decoder": {"name": "primus", **decoder}}})
