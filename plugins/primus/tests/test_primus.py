"""The Primus plugin against dynamic_network_architectures' 3D PatchDecode (patch (p, p, 1), copied
weights), its patch-14 rule, its initialisation and its refusals."""

import pytest
import torch
from dynamic_network_architectures.building_blocks.patch_encode_decode import PatchDecode
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from segframe_primus import PrimusParams, build

from segframe import ConfigError
from segframe.config import validate_config
from segframe.model import ViTSegModel
from segframe.plugins import DecoderInputs, HeadContext


def context(patch: int = 16, neck: str = "identity", embed_dim: int = 64) -> HeadContext:
    return HeadContext(backbone="dinov3", patch_size=patch, embed_dim=embed_dim, num_levels=4,
                       has_cls_token=True, num_register_tokens=4, image_channels=3, neck=neck)


def reference(factor: int, embed_dim: int, num_classes: int, seed: int = 0) -> PatchDecode:
    """PatchDecode as Primus builds and initialises it, with non-trivial LayerNorm weights."""
    torch.manual_seed(seed)
    ref = PatchDecode((factor, factor, 1), embed_dim, num_classes)
    ref.apply(InitWeights_He(1e-2))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g))
    return ref.eval()


def copy_from(ref: PatchDecode, head: torch.nn.Module) -> None:
    """ConvTranspose3d (in, out, 2, 2, 1) -> ConvTranspose2d (in, out, 2, 2); everything else as is."""
    state = {k: v[..., 0] if v.ndim == 5 else v for k, v in ref.state_dict().items()}
    head.load_state_dict(state)  # strict: the same module tree, key for key


def run_both(head, ref, x):
    with torch.no_grad():
        return head(DecoderInputs(features=[x])), ref(x[..., None])[..., 0]


@pytest.mark.parametrize("patch,embed_dim,num_classes", [(16, 64, 3), (8, 96, 2), (32, 48, 5), (2, 16, 1)])
def test_equals_patch_decode(patch, embed_dim, num_classes):
    ref = reference(patch, embed_dim, num_classes)
    head = build(PrimusParams(), [embed_dim] * 4, [patch] * 4, num_classes, context(patch)).eval()
    copy_from(ref, head)
    x = torch.randn(2, embed_dim, 3, 5)
    ours, theirs = run_both(head, ref, x)
    assert ours.shape == (2, num_classes, 3 * patch, 5 * patch) and head.output_stride == 1
    assert (ours - theirs).abs().max() < 1e-5
    # the comparison can fail: one perturbed weight of the last stage changes the logits
    with torch.no_grad():
        head.decode[-1].weight.view(-1)[0] += 0.5
    perturbed, _ = run_both(head, ref, x)
    assert (perturbed - theirs).abs().max() > 1e-3


def test_initialisation_is_primus():
    """Same seed, same draws: the head's init equals PatchDecode + InitWeights_He(1e-2) exactly."""
    torch.manual_seed(3)
    ref = PatchDecode((16, 16, 1), 64, 3)
    ref.apply(InitWeights_He(1e-2))
    torch.manual_seed(3)
    head = build(PrimusParams(), [64], [16], 3, context())
    theirs = ref.state_dict()
    for key, value in head.state_dict().items():
        assert torch.equal(value, theirs[key].reshape(value.shape)), key
    assert all(torch.all(m.bias == 0) for m in head.modules() if isinstance(m, torch.nn.ConvTranspose2d))


@pytest.mark.parametrize("rounding,factor,stride", [("up", 16, 0.875), ("down", 8, 1.75)])
def test_patch_14_decodes_with_a_power_of_two(rounding, factor, stride):
    """Patch 14: PatchDecode of the next (previous) power of two, logits at stride 14/16 (14/8)."""
    head = build(PrimusParams(patch_rounding=rounding), [64] * 4, [14] * 4, 2, context(14)).eval()
    assert head.factor == factor and head.output_stride == stride
    ref = reference(factor, 64, 2)
    copy_from(ref, head)
    x = torch.randn(1, 64, 7, 3)
    ours, theirs = run_both(head, ref, x)
    assert ours.shape == (1, 2, 7 * factor, 3 * factor)
    assert (ours - theirs).abs().max() < 1e-5


@pytest.mark.parametrize("rounding", ["up", "down"])
def test_patch_14_model_gives_full_resolution(rounding):
    """DINOv2 (patch 14) in the model: 97x131 in, head logits at 7*f x 10*f, model logits 97x131,
    and every trainable parameter gets a gradient."""
    cfg = validate_config({"model": {"backbone": "dinov2", "backbone_size": "tiny",
                                     "decoder": {"name": "primus", "patch_rounding": rounding}}})
    torch.manual_seed(0)
    model = ViTSegModel(cfg, in_channels=1, num_classes=3).train()
    x = torch.rand(2, 1, 97, 131)
    head_out = model.decoder(model._head_inputs(model.pad(model._normalize(x))))
    f = model.decoder.factor
    assert head_out.shape == (2, 3, 7 * f, 10 * f)  # padded to 98x140: a 7x10 token grid
    out = model(x)
    assert out.shape == (2, 3, 97, 131) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_pyramid_neck_is_refused():
    cfg = validate_config({"model": {"backbone": "dinov3", "backbone_size": "tiny", "decoder": "primus",
                                     "neck": "pyramid"}})
    with pytest.raises(ConfigError, match="model.neck: primus .*set model.neck: identity"):
        ViTSegModel(cfg, num_classes=2)


def test_bad_rounding_names_the_key():
    with pytest.raises(ConfigError, match="model.decoder.patch_rounding"):
        validate_config({"model": {"decoder": {"name": "primus", "patch_rounding": "nearest"}}})
