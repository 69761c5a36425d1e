"""The Mask2Former plugin: parity with transformers' Mask2FormerForUniversalSegmentation (decoder
outputs and loss), dense targets, ignored pixels, the semantic-logit mapping, bad input, a gloo
DDP run with LoRA + a frozen backbone, and the README's minimal loss-owning head."""

from __future__ import annotations

import re
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from ddp import starting_model, train_ddp
from pydantic import BaseModel
from segframe_mask2former import Mask2FormerParams, build
from segframe_mask2former.head import (
    group_norm_groups,
    semantic_logits,
    targets_from_dense,
    valid_pixel_points,
)
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig
from transformers.models.mask2former.image_processing_mask2former import Mask2FormerImageProcessor

from segframe import ConfigError, SegframeError
from segframe.config import validate_config
from segframe.model import ViTSegModel
from segframe.plugins import HeadContext, get_registry, reset_registry

README = Path(__file__).resolve().parents[1] / "README.md"
K = 4  # classes in the parity tests
CHANNELS = [8, 16, 32, 64]  # the tiny Swin's stage widths: levels of different width at strides 4..32


@pytest.fixture
def registry():
    """A fresh registry (entry points loaded) that the test may register plugins on."""
    reset_registry()
    yield get_registry()
    reset_registry()


def tiny(decoder: dict | None = None, **model) -> dict:
    dec = {"name": "mask2former", "hidden_size": 32, "num_queries": 10, "decoder_layers": 2,
           "pixel_decoder_layers": 1, "num_heads": 4, "num_points": 256, **(decoder or {})}
    return {"model": {"backbone": "dinov2", "backbone_size": "tiny", "decoder": dec, **model}}


def context(neck: str = "pyramid") -> HeadContext:
    return HeadContext(backbone="test", patch_size=16, embed_dim=64, num_levels=4, has_cls_token=True,
                       num_register_tokens=0, image_channels=3, neck=neck)


def reference(deep_supervision: bool = True) -> Mask2FormerForUniversalSegmentation:
    """transformers' model with the configuration our params describe (written out here)."""
    swin = SwinConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=2,
                      out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(
        backbone_config=swin, feature_size=64, mask_feature_size=64, hidden_dim=64,
        encoder_feedforward_dim=256, dim_feedforward=512, encoder_layers=2, decoder_layers=3,
        num_attention_heads=4, num_queries=10, num_labels=K, train_num_points=300,
        use_auxiliary_loss=deep_supervision,
    )
    return Mask2FormerForUniversalSegmentation(config).eval()


def ours(deep_supervision: bool = True, jitter: float = 0.2):
    """Our head; every weight moved off its initialisation so the outputs are O(1), not ~1e-4."""
    params = Mask2FormerParams(hidden_size=64, num_queries=10, decoder_layers=2, pixel_decoder_layers=2,
                               num_heads=4, num_points=300, deep_supervision=deep_supervision)
    head = build(params, CHANNELS, [4, 8, 16, 32], K, context()).eval()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(jitter * torch.randn_like(p))
    return head


def copy_into(ref: Mask2FormerForUniversalSegmentation, head) -> None:
    ref.model.pixel_level_module.decoder.load_state_dict(head.parts.pixel_decoder.state_dict())
    ref.model.transformer_module.load_state_dict(head.parts.transformer_module.state_dict())
    ref.class_predictor.load_state_dict(head.parts.class_predictor.state_dict())


class GivenMaps(torch.nn.Module):
    """Stands in for the reference's backbone: hands its pixel decoder our feature maps."""

    def __init__(self, maps):
        super().__init__()
        self.maps = maps

    def forward(self, pixel_values):
        return SimpleNamespace(feature_maps=self.maps)


def feature_maps(seed: int = 0, size: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, c, size // 2**i, size // 2**i, generator=g) for i, c in enumerate(CHANNELS)]


def dense_target(size: int = 64) -> torch.Tensor:
    """Image 0: classes 0 and 2 (1 and 3 missing); image 1: all four classes."""
    t = torch.zeros(2, 1, size, size, dtype=torch.long)
    t[0, 0, 10:40, 5:30] = 2
    t[1, 0, :20, :] = 1
    t[1, 0, 30:, 30:] = 3
    t[1, 0, 40:, :10] = 2
    return t


def decided(scores: torch.Tensor, rel: float = 1e-5) -> torch.Tensor:
    """Pixels whose two best class scores (B, K, H, W) differ by more than `rel` of the best:
    there the argmax cannot turn on float rounding."""
    top2 = scores.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1] > rel * top2[:, 0].abs()


def hand_targets(t: torch.Tensor):
    masks, classes = [], []
    for image in t[:, 0]:
        present = sorted({int(v) for v in image.flatten().tolist()})
        masks.append(torch.stack([(image == c).float() for c in present]))
        classes.append(torch.tensor(present))
    return masks, classes


# ---------------------------------------------------------------- parity with transformers

def test_decoder_outputs_equal_transformers():
    torch.manual_seed(0)
    head, ref = ours(), reference()
    copy_into(ref, head)
    maps = feature_maps()
    ref.model.pixel_level_module.encoder = GivenMaps(maps)
    with torch.no_grad():
        theirs = ref(torch.zeros(2, 3, 64, 64), output_auxiliary_logits=True)
        mine = head.predictions(maps)
    assert mine["class_queries_logits"].shape == (2, 10, K + 1)
    assert mine["masks_queries_logits"].shape == (2, 10, 16, 16)
    assert mine["masks_queries_logits"].abs().mean() > 0.1 and mine["class_queries_logits"].abs().mean() > 0.1
    assert (mine["class_queries_logits"] - theirs.class_queries_logits).abs().max() < 1e-4
    assert (mine["masks_queries_logits"] - theirs.masks_queries_logits).abs().max() < 1e-4
    assert len(mine["auxiliary_predictions"]) == len(theirs.auxiliary_logits) == 2
    for a, b in zip(mine["auxiliary_predictions"], theirs.auxiliary_logits, strict=True):
        for key in ("class_queries_logits", "masks_queries_logits"):
            assert (a[key] - b[key]).abs().max() < 1e-4
    # the comparison can fail: one perturbed weight of the masked-attention decoder shows up
    with torch.no_grad():
        head.parts.transformer_module.decoder.layers[0].cross_attn.out_proj.weight[0, 0] += 0.5
        perturbed = head.predictions(maps)
    assert (perturbed["masks_queries_logits"] - theirs.masks_queries_logits).abs().max() > 1e-3


@pytest.mark.parametrize("deep_supervision", [True, False])
def test_loss_equals_transformers(deep_supervision):
    """Same outputs, same targets, same seed for the point sampling: the same loss."""
    torch.manual_seed(0)
    head, ref = ours(deep_supervision), reference(deep_supervision)
    copy_into(ref, head)
    maps = feature_maps(1)
    ref.model.pixel_level_module.encoder = GivenMaps(maps)
    target = dense_target()
    mask_labels, class_labels = hand_targets(target)
    torch.manual_seed(7)
    theirs = ref(torch.zeros(2, 3, 64, 64), mask_labels=mask_labels, class_labels=class_labels,
                 output_auxiliary_logits=True, output_hidden_states=True)
    # transformers' weighted terms; its wrapper always adds the layers, its get_loss_dict can leave them out
    torch.manual_seed(7)
    terms = ref.get_loss_dict(theirs.masks_queries_logits, theirs.class_queries_logits, mask_labels,
                              class_labels, theirs.auxiliary_logits if deep_supervision else None)
    terms = {k: v.detach() for k, v in terms.items()}
    expected = sum(terms.values())
    if deep_supervision:
        torch.testing.assert_close(expected, theirs.loss.detach())
    outputs = {"class_queries_logits": theirs.class_queries_logits,
               "masks_queries_logits": theirs.masks_queries_logits,
               "auxiliary_predictions": theirs.auxiliary_logits}
    torch.manual_seed(7)
    loss, parts = head.training_loss(outputs, target, ignore_index=K)
    assert torch.isfinite(loss) and loss > 0
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    # each part is transformers' term itself (the earlier layers' summed), and they add up to the loss
    last = {"class": "loss_cross_entropy", "mask": "loss_mask", "dice": "loss_dice"}
    for name, key in last.items():
        torch.testing.assert_close(parts[name], terms[key], rtol=1e-5, atol=1e-5)
    if deep_supervision:
        earlier = sum(v for k, v in terms.items() if k not in last.values())
        torch.testing.assert_close(parts["auxiliary"], earlier, rtol=1e-5, atol=1e-5)
        assert parts["auxiliary"] > 0.1 * loss
    else:
        assert set(parts) == set(last)  # no auxiliary part, not a rounding residual
    torch.testing.assert_close(sum(parts.values()), loss.detach(), rtol=1e-5, atol=1e-5)
    # and through our own forward (outputs equal to 1e-4, so the loss to a little more)
    torch.manual_seed(7)
    own, _ = head.training_loss(head.predictions(maps), target, ignore_index=K)
    torch.testing.assert_close(own, expected, rtol=1e-3, atol=1e-3)
    # the comparison can fail: a different no-object weight changes the class loss
    head.criterion.empty_weight[-1] = 0.5
    torch.manual_seed(7)
    assert (head.training_loss(outputs, target, ignore_index=K)[0] - expected).abs() > 1e-3


# ---------------------------------------------------------------- targets and ignored pixels

def test_targets_from_dense_labels():
    ignore = 9
    labels = torch.tensor([
        [[0, 0, 2], [2, 0, 0]],    # class 1 missing
        [[0, 0, 0], [0, 0, 0]],    # only background
        [[1, ignore, 3], [0, 2, ignore]],  # 4 classes and ignored pixels
        [[ignore] * 3] * 2,        # nothing but ignored pixels
    ])
    masks, classes = targets_from_dense(labels, ignore)
    assert [c.tolist() for c in classes] == [[0, 2], [0], [0, 1, 2, 3], []]
    assert masks[0].tolist() == [[[1, 1, 0], [0, 1, 1]], [[0, 0, 1], [1, 0, 0]]]
    assert masks[1].tolist() == [[[1, 1, 1], [1, 1, 1]]]
    assert masks[2].tolist() == [[[0, 0, 0], [1, 0, 0]], [[1, 0, 0], [0, 0, 0]],
                                 [[0, 0, 0], [0, 1, 0]], [[0, 0, 1], [0, 0, 0]]]
    assert masks[3].shape == (0, 2, 3) and classes[3].dtype == torch.long
    assert all(m.dtype == torch.float32 for m in masks)


def test_points_land_on_valid_pixel_centres():
    valid = torch.zeros(2, 5, 7, dtype=torch.bool)
    valid[0, 1, 3] = valid[0, 4, 0] = True
    valid[1, 2:, 4:] = True
    points = valid_pixel_points(valid, 500)
    col, row = points[..., 0] * 7 - 0.5, points[..., 1] * 5 - 0.5
    assert torch.allclose(col, col.round(), atol=1e-5) and torch.allclose(row, row.round(), atol=1e-5)
    for i in range(2):
        assert valid[i, row[i].round().long(), col[i].round().long()].all()
    assert {(int(r), int(c)) for r, c in zip(row[0].round(), col[0].round(), strict=True)} == {(1, 3), (4, 0)}


def _ignore_case(perturb: str):
    """Loss and mask-logit gradient, with masks at the target's resolution; `perturb` changes
    the predicted mask logits at ignored pixels, or at one valid pixel."""
    torch.manual_seed(0)
    head = ours()
    target = dense_target(24)
    target[0, 0, :, 18:] = K  # ignored strip (nnU-Net's ignore label / padding)
    target[0, 0, :, 1] = K  # bilinear reads of columns 0 and 2 would leak into it (centres a few ulps off)
    target[1, 0, 20:, :] = K
    ignored = target[:, 0] == K
    masks = torch.randn(2, 10, 24, 24)
    if perturb == "ignored":
        masks = torch.where(ignored[:, None], masks + 50 * torch.randn_like(masks), masks)
    elif perturb == "valid":
        masks[0, :, 3, 3] += 20
    g = torch.Generator().manual_seed(1)
    classes = torch.randn(2, 10, K + 1, generator=g)
    aux = [{"class_queries_logits": torch.randn(2, 10, K + 1, generator=g),
            "masks_queries_logits": torch.randn(2, 10, 24, 24, generator=g)}]
    masks.requires_grad_(True)
    torch.manual_seed(3)
    loss, _ = head.training_loss({"class_queries_logits": classes, "masks_queries_logits": masks,
                                  "auxiliary_predictions": aux}, target, ignore_index=K)
    loss.backward()
    return loss.detach(), masks.grad, ignored


def test_ignored_pixels_do_not_affect_the_loss():
    """Ignored pixels are in no target mask and no sampled point lands on them: whatever the
    prediction there, the loss is the same, and no gradient reaches them."""
    base, grad, ignored = _ignore_case("none")
    other, _, _ = _ignore_case("ignored")
    assert torch.equal(base, other)
    assert grad.abs().sum() > 0
    at_ignored = grad.permute(1, 0, 2, 3)[:, ignored]
    assert at_ignored.numel() > 0 and torch.equal(at_ignored, torch.zeros_like(at_ignored))
    changed, _, _ = _ignore_case("valid")  # control: the same change on a valid pixel does count
    assert not torch.equal(base, changed)


def test_an_image_with_every_pixel_ignored():
    head = ours().train()
    maps = feature_maps(2)
    target = dense_target(64)
    target[1] = K
    loss, parts = head.training_loss(head.predictions(maps), target, ignore_index=K)
    assert torch.isfinite(loss)
    target[0] = K  # the whole batch ignored: only the no-object class loss, still differentiable
    loss, parts = head.training_loss(head.predictions(maps), target, ignore_index=K)
    assert torch.isfinite(loss) and parts["mask"] == 0
    loss.backward()


# ---------------------------------------------------------------- eval: dense logits for nnU-Net

def test_semantic_logits_give_mask2formers_segmentation():
    """exp(logits) are Mask2Former's semantic scores (transformers' post-processing, which upsamples
    the masks to 384 x 384 first); nnU-Net's softmax + argmax give its segmentation."""
    g = torch.Generator().manual_seed(0)
    classes, masks = torch.randn(2, 10, K + 1, generator=g), 3 * torch.randn(2, 10, 96, 96, generator=g)
    logits = semantic_logits(classes, masks, (384, 384))
    post = Mask2FormerImageProcessor().post_process_semantic_segmentation(
        SimpleNamespace(class_queries_logits=classes, masks_queries_logits=masks),
        return_segmentation_scores=True)
    scores = torch.stack([p.segmentation_scores for p in post])
    assert logits.shape == (2, K, 384, 384)
    torch.testing.assert_close(logits.exp(), scores, rtol=1e-4, atol=1e-6)
    sure = decided(scores)
    assert sure.float().mean() > 0.999
    segmentation = torch.stack([p.segmentation for p in post])
    assert torch.equal(logits.softmax(1).argmax(1)[sure], segmentation[sure])
    assert torch.isfinite(semantic_logits(classes, torch.full_like(masks, -1e4), (384, 384))).all()


def test_semantic_logits_keep_the_argmax_where_every_mask_is_far_off():
    """Every mask logit far below -87 (p_k below float32's range at every pixel): the logits are
    log p_k of a float64 computation of Mask2Former's scores, and their argmax is its argmax on
    every pixel whose two best classes float32 can tell apart (p_k in float32, or clamped before
    the log, would make all K logits equal there: every pixel class 0)."""
    g = torch.Generator().manual_seed(0)
    classes = 3 * torch.randn(2, 10, K + 1, generator=g)
    masks = -150 + 5 * torch.randn(2, 10, 24, 24, generator=g)
    logits = semantic_logits(classes, masks, (48, 48))
    up = F.interpolate(masks.double(), size=(48, 48), mode="bilinear", align_corners=False)
    p = torch.einsum("bqk,bqhw->bkhw", classes.double().softmax(-1)[..., :-1], up.sigmoid())
    assert p.max() < torch.finfo(torch.float32).tiny and p.min() > 0  # representable in float64 only
    sure = decided(p, 1e-3)  # float32 logits are within ~3e-5 of log p here: 1e-3 decides
    assert sure.float().mean() > 0.99
    assert torch.equal(logits.argmax(1)[sure], p.argmax(1)[sure])
    torch.testing.assert_close(logits.double(), p.log(), rtol=1e-6, atol=1e-4)


def test_model_eval_output_is_the_semantic_segmentation():
    """Through ViTSegModel (padding 380 x 383 -> 384 x 384, crop): the argmax of the eval logits is
    transformers' semantic post-processing of the head's raw predictions."""
    torch.manual_seed(0)
    model = ViTSegModel(validate_config(tiny(backbone="dinov3")), num_classes=3).eval()
    x = torch.rand(1, 3, 380, 383)
    with torch.no_grad():
        logits = model(x)
        raw = model.decoder.predictions(model._head_inputs(model.pad(model._normalize(x))).features)
    assert logits.shape == (1, 3, 380, 383) and model.decoder.output_stride == 1
    post = Mask2FormerImageProcessor().post_process_semantic_segmentation(
        SimpleNamespace(**raw), return_segmentation_scores=True)[0]
    scores = post.segmentation_scores[None, :, :380, :383]
    sure = decided(scores)[0]
    assert sure.float().mean() > 0.999
    assert torch.equal(logits.argmax(1)[0][sure], post.segmentation[:380, :383][sure])


# ---------------------------------------------------------------- the model with this head

@pytest.mark.parametrize("backbone,neck,shape,channels,width", [
    ("dinov2", "identity", (2, 1, 97, 131), 1, 32), ("retfound", "pyramid", (2, 5, 30, 45), 5, 32),
    ("visionfm", "identity", (2, 3, 1, 300), 3, 16), ("dinov3", "pyramid", (2, 3, 1, 1), 3, 32),
])
def test_trains_on_any_size_and_channels(backbone, neck, shape, channels, width):
    torch.manual_seed(0)
    cfg = tiny({"hidden_size": width}, backbone=backbone, neck=neck)
    if backbone == "retfound":
        cfg["model"]["backbone"] = {"name": "retfound", "variant": "dinov2"}  # patch 14
    model = ViTSegModel(validate_config(cfg), in_channels=channels, num_classes=3).train()
    x = torch.rand(*shape)
    loss, parts = model.training_loss(model(x), torch.randint(0, 3, (shape[0], 1, *shape[2:])))
    assert torch.isfinite(loss) and set(parts) == {"class", "mask", "dice", "auxiliary"}
    loss.backward()
    dead = [n for n, p in model.named_parameters()
            if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not dead
    with torch.no_grad():
        out = model.eval()(x[:1])
    assert out.shape == (1, 3, *shape[2:]) and torch.isfinite(out).all()


def test_lora_and_frozen_backbone():
    torch.manual_seed(0)
    model = ViTSegModel(validate_config({**tiny(freeze_backbone=True), "lora": {"enabled": True, "r": 4}}),
                        num_classes=2).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any(n.startswith("decoder.") for n in trainable)
    assert not any(n.startswith("backbone.") and "lora_" not in n for n in trainable)
    loss, _ = model.training_loss(model(torch.rand(2, 3, 32, 32)), torch.randint(0, 2, (2, 1, 32, 32)))
    loss.backward()
    assert all(model.get_parameter(n).grad is not None for n in trainable)


# ---------------------------------------------------------------- bad input

def test_labels_outside_num_classes_are_a_clear_error():
    model = ViTSegModel(validate_config(tiny()), num_classes=3).train()
    out = model(torch.rand(1, 3, 28, 28))
    target = torch.zeros(1, 1, 28, 28)
    target[0, 0, 0, :2] = torch.tensor([3.0, 7.0])
    with pytest.raises(SegframeError, match=r"label\(s\) \[3, 7\] outside 0\.\.2 \(num_classes 3\)"):
        model.training_loss(out, target)


@pytest.mark.parametrize("change,key", [
    ({"decoder": {"num_queries": 2}}, "model.decoder.num_queries"),
    ({"decoder": {"hidden_size": 33}}, "model.decoder.hidden_size"),
    ({"decoder": {"num_heads": 5}}, "model.decoder.num_heads"),
    ({"decoder": {"class_weight": 0, "mask_weight": 0, "dice_weight": 0}}, "cannot all be 0"),
    ({"decoder": {"no_object_weight": -1}}, "model.decoder.no_object_weight"),
    ({"decoder": {"queries": 10}}, "model.decoder.queries"),
    ({"layers": [1, 3]}, "model.layers"),
    ({"upsampler": "progressive"}, "model.upsampler"),
])
def test_bad_config_is_a_config_error(change, key):
    cfg = tiny(change.pop("decoder", None), **change)
    with pytest.raises(ConfigError, match=re.escape(key)):
        ViTSegModel(validate_config(cfg), num_classes=3)


def test_group_norm_groups_keep_two_channels():
    """transformers' 32 groups from width 64 (the parity tests run there); below, >= 2 channels each."""
    assert [group_norm_groups(w) for w in (16, 32, 48, 64, 96, 256, 80)] == [8, 16, 8, 32, 32, 32, 8]
    head = build(Mask2FormerParams(hidden_size=32), [64] * 4, [16] * 4, 2, context("identity"))
    norms = [m for m in head.parts.pixel_decoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 16 for m in norms)


def test_pyramid_strides_must_double():
    with pytest.raises(ConfigError, match="model.neck"):
        build(Mask2FormerParams(), [8, 8, 8], [4, 8, 16], 2, context())


# ---------------------------------------------------------------- DDP (gloo, 2 CPU processes)

DDP_CONFIG = {**tiny({"decoder_layers": 3}, backbone="dinov3", freeze_backbone=True),
              "lora": {"enabled": True, "r": 4}}


def test_ddp_lora_frozen_backbone(tmp_path):
    """Two DDP ranks (segframe's tests/ddp.py) with the head's own loss: equal at the end, and every
    trainable weight moved (without weight decay, which would move them all; 1-d parameters left out,
    whose gradient can be exactly 0, as in segframe's DDP tests)."""
    case = {"config": DDP_CONFIG, "num_classes": 3}
    ranks = [rank["m2f"] for rank in train_ddp({"m2f": case}, tmp_path)]
    initial = dict(starting_model(case).named_parameters())
    assert ranks[0].keys() == ranks[1].keys() and any("lora_A" in n for n in ranks[0])
    assert not any(n.startswith("backbone.") and "lora_" not in n for n in ranks[0])
    for name, value in ranks[0].items():
        torch.testing.assert_close(value, ranks[1][name], msg=f"{name} differs between ranks")
    still = [n for n, v in ranks[0].items()
             if v.ndim > 1 and "lora_B" not in n and torch.equal(v, initial[n].detach())]
    assert not still, still  # lora_B was drawn in the ranks


# ---------------------------------------------------------------- the README's example

def test_readme_minimal_loss_owning_head(registry):
    """The README's tiny loss-owning head runs: raw outputs in training, its loss, dense logits in eval."""
    code = re.search(r"## How a head owns its loss.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    module = types.ModuleType("readme_losshead")
    exec(compile(code, str(README), "exec"), module.__dict__)
    registry.register(module, "readme_losshead")
    model = ViTSegModel(validate_config({"model": {"backbone": "dinov2", "backbone_size": "tiny",
                                                   "decoder": "tinyloss"}}), num_classes=3).train()
    assert model.owns_loss
    out = model(torch.rand(2, 3, 20, 30))
    assert isinstance(out, dict)
    loss, parts = model.training_loss(out, torch.randint(0, 3, (2, 1, 20, 30)))
    assert torch.isfinite(loss) and "ce" in parts
    loss.backward()
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 3, 20, 30)).shape == (1, 3, 20, 30)
    assert issubclass(module.TinyLossParams, BaseModel)
