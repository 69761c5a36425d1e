"""The three `variant`s against the older nnU-Net fork's model_segformer_0/_1/_2 (their own code, read
from the reference folder): the fork's head weights copied in by a key map, the same parameters module by
module, and the fork's whole forward (head, upsampling, crop) equal to the plugin's head on the same
feature maps followed by the model's bilinear resize and crop, in eval and training mode."""

import math

import pytest
import torch
import torch.nn.functional as F
from fork_reference import TINY_ARCH, fork_module, no_pretrained
from segframe_segformer import SegformerParams, build

from segframe import ConfigError
from segframe.config import validate_config
from segframe.model import ViTSegModel
from segframe.upsample import crop, resize

VARIANTS = {"model_segformer_0": "standard", "model_segformer_1": "progressive",
            "model_segformer_2": "full_resolution"}
HIDDEN = 16


def fork_model(fork_file: str, backbone: str) -> torch.nn.Module:
    module = fork_module(fork_file)
    torch.manual_seed(0)
    with no_pretrained({**TINY_ARCH, "init_values": 1.0}):  # layer scale 1: the levels differ
        model = module.create_segmentation_model(
            backbone_name=backbone, backbone_size="large", num_classes=3, hidden_size=HIDDEN, use_lora=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # O(1) activations and non-trivial norms and BatchNorm statistics
        for p in model.parameters():
            std = 1 / math.sqrt(p[0].numel()) if p.ndim > 1 else 0.3
            p.copy_(torch.randn(p.shape, generator=g) * std)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def fork_head_state(fork: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The fork's decode head (transformers' SegformerDecodeHead, 4.x or 5.x names) and upsampler
    under the plugin's names; per-level linear projections become 1x1 convs, `seg_head` is `out`."""
    state = {}
    for key, value in fork.decode_head.state_dict().items():
        parts = key.split(".")
        if parts[0] in ("linear_c", "linear_projections"):  # <level>.proj.<weight|bias>
            key = f"projections.{parts[1]}.{parts[-1]}"
            value = value[:, :, None, None] if parts[-1] == "weight" else value
        else:
            key = {"linear_fuse": "fuse", "batch_norm": "norm"}.get(parts[0], parts[0]) + key[len(parts[0]):]
        state[key] = value
    if hasattr(fork, "upsampler"):
        state.update({"upsampler." + k.replace("seg_head.", "out."): v
                      for k, v in fork.upsampler.state_dict().items()})
    return state


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("backbone, size", [("visionfm", (45, 61)), ("dinov2", (45, 61))])
@pytest.mark.parametrize("fork_file", VARIANTS)
def test_variant_is_the_fork_head(fork_file, backbone, size):
    fork = fork_model(fork_file, backbone)
    patch, d = fork.backbone_patch_size, fork.backbone.embed_dim
    params = SegformerParams(hidden_size=HIDDEN, variant=VARIANTS[fork_file], dropout_type="element")
    head = build(params, [d] * 4, [patch] * 4, 3)
    head.load_state_dict(fork_head_state(fork))  # strict: the same modules and shapes, no more, no less
    fork_parts = [fork.decode_head] + ([fork.upsampler] if hasattr(fork, "upsampler") else [])
    assert numel(head) == sum(numel(m) for m in fork_parts)

    h, w = size
    x = torch.randn(2, 3, h, w)
    padded = F.pad(x, (0, -w % patch, 0, -h % patch), mode="reflect")  # the fork pads like ViTSegModel
    for mode in ("eval", "train"):
        for model in (fork, head):
            model.train(mode == "train")
            for m in model.modules():
                if isinstance(m, torch.nn.Dropout | torch.nn.Dropout2d):
                    m.p = 0.0  # training mode compares BatchNorm on batch statistics, not dropout masks
        with torch.no_grad():
            theirs = fork(x)
            features = fork_module("backbone").get_vit_features(fork.backbone, padded, fork.feature_indices)
            logits = head(list(features))
        assert logits.shape[-1] == round(padded.shape[-1] / head.output_stride)
        ours = crop(resize(logits, padded.shape[-2:]), h, w)
        assert theirs.shape == ours.shape == (2, 3, h, w)
        assert theirs.std() > 0.1
        assert (ours - theirs).abs().max() < 1e-4, mode


def test_output_strides_and_hidden_classifier():
    params = {v: SegformerParams(hidden_size=HIDDEN, variant=v) for v in VARIANTS.values()}
    heads = {v: build(p, [32] * 4, [14] * 4, 3) for v, p in params.items()}
    assert {v: h.output_stride for v, h in heads.items()} == {
        "standard": 14, "progressive": 3.5, "full_resolution": 1}
    assert build(params["progressive"], [32] * 4, [16] * 4, 3).output_stride == 4
    assert heads["progressive"].classifier.out_channels == HIDDEN
    assert heads["standard"].upsampler is None and heads["standard"].classifier.out_channels == 3
    features = [torch.randn(1, 32, 3, 5) for _ in range(4)]
    shapes = {v: tuple(h.eval()(features).shape) for v, h in heads.items()}
    assert shapes == {"standard": (1, 3, 3, 5), "progressive": (1, 3, 12, 20),
                      "full_resolution": (1, 3, 42, 70)}


def test_default_is_the_standard_head():
    """The default keeps the head as it was: standard, channel dropout, the same weights and no others."""
    head = build(SegformerParams(), [32] * 4, [16] * 4, 3)
    assert head.variant == "standard" and head.output_stride == 16
    assert type(head.dropout) is torch.nn.Dropout2d
    keys = {k.rsplit(".", 1)[0] for k in head.state_dict()}
    assert keys == {*(f"projections.{i}" for i in range(4)), "fuse", "norm", "classifier"}


@pytest.mark.parametrize("backbone", ["dinov2", "dinov3"])
@pytest.mark.parametrize("variant", ["progressive", "full_resolution"])
def test_variants_inside_the_model(variant, backbone):
    """Patch 14 and 16, an odd size, the model's bilinear upsampler: the image's size back, and every
    parameter of the head gets a gradient."""
    torch.manual_seed(0)
    decoder = {"name": "segformer", "hidden_size": 8, "variant": variant, "dropout_type": "element"}
    cfg = {"model": {"backbone": backbone, "backbone_size": "tiny", "decoder": decoder,
                     "upsampler": "bilinear"}}
    model = ViTSegModel(validate_config(cfg), num_classes=3).train()
    out = model(torch.rand(2, 3, 37, 51))
    assert out.shape == (2, 3, 37, 51)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.any() for p in model.decoder.parameters())


def test_unknown_variant_is_a_config_error():
    cfg = {"model": {"backbone": "dinov2", "backbone_size": "tiny",
                     "decoder": {"name": "segformer", "variant": "model_segformer_1"}}}
    with pytest.raises(ConfigError, match=r"model\.decoder\.variant"):
        validate_config(cfg)
