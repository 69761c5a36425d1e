"""The DPT plugin against transformers' DPTForSemanticSegmentation with identical weights and hidden
states (every readout), its init, and its behaviour inside ViTSegModel: patch 14, odd sizes, the CLS
token of every family, channels, LoRA, a frozen backbone, gradients, and the errors a user can cause."""

import math

import pytest
import segframe_dpt
import torch
import torch.nn.functional as F
from segframe_dpt import DPTParams, build
from transformers import DPTConfig, DPTForSemanticSegmentation

from segframe import ConfigError
from segframe.config import validate_config
from segframe.model import ViTSegModel
from segframe.plugins import DecoderInputs, HeadContext, Registry

D = 64
UNUSED = "fusion_stage.layers.0.residual_layer1."
SMALL = {"name": "dpt", "hidden_size": 16, "neck_hidden_sizes": [8, 8, 16, 16]}


def context(patch: int = 16, **kw) -> HeadContext:
    args = dict(backbone="test", patch_size=patch, embed_dim=D, num_levels=4, has_cls_token=True,
                num_register_tokens=0, image_channels=3, neck="identity")
    return HeadContext(**{**args, **kw})


def _randomize(module: torch.nn.Module, seed: int = 1) -> None:
    """Weights of scale 1/sqrt(fan_in), random biases and BatchNorm statistics: activations stay O(1)
    through the whole neck, so a 1e-5 tolerance on the logits is a real test."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            std = 1 / math.sqrt(p[0].numel()) if p.ndim > 1 else 0.3
            p.copy_(torch.randn(p.shape, generator=g) * std)
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def reference_model(readout: str) -> DPTForSemanticSegmentation:
    torch.manual_seed(0)
    config = DPTConfig(
        hidden_size=D, neck_hidden_sizes=[32] * 4, fusion_hidden_size=32, num_hidden_layers=4,
        num_attention_heads=4, intermediate_size=128, image_size=64, patch_size=16,
        backbone_out_indices=[0, 1, 2, 3], readout_type=readout, num_labels=3, use_auxiliary_head=True,
    )
    model = DPTForSemanticSegmentation(config).eval()
    for part in (model.neck, model.head, model.auxiliary_head):
        _randomize(part)
    return model


def head_like(reference: DPTForSemanticSegmentation, patch: int = 16) -> torch.nn.Module:
    c = reference.config
    params = DPTParams(hidden_size=32, neck_hidden_sizes=[32] * 4, readout=c.readout_type,
                       auxiliary_head=True)
    head = build(params, [D] * 4, [patch] * 4, 3, context(patch))
    head.neck.load_state_dict(neck_state(reference))
    head.head.load_state_dict(reference.head.state_dict())
    head.auxiliary_head.load_state_dict(reference.auxiliary_head.state_dict())
    return head.eval()


def neck_state(reference: DPTForSemanticSegmentation) -> dict[str, torch.Tensor]:
    """transformers' neck weights without the residual unit its deepest fusion layer never calls."""
    return {k: v for k, v in reference.neck.state_dict().items()
            if not k.startswith(UNUSED)}


def split(hidden_states: list[torch.Tensor], h: int, w: int) -> DecoderInputs:
    """Token sequences (B, 1 + h*w, D), CLS first, as ViTSegModel hands them to the head."""
    return DecoderInputs(
        features=[t[:, 1:].transpose(1, 2).reshape(t.shape[0], D, h, w) for t in hidden_states],
        cls_tokens=[t[:, 0] for t in hidden_states],
    )


@pytest.mark.parametrize("readout", ["ignore", "add", "project"])
def test_logits_equal_transformers(readout):
    reference = reference_model(readout)
    head = head_like(reference)
    assert head.inputs == (frozenset() if readout == "ignore" else {"prefix_tokens"})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        hidden = list(reference.dpt(x, output_hidden_states=True).hidden_states[1:])
        theirs = reference(x).logits
        ours = head(split(hidden, 4, 4))
    assert ours.shape == theirs.shape == (2, 3, 64, 64) and head.output_stride == 1
    assert theirs.std() > 0.1  # the weights keep the logits far from zero
    assert (ours - theirs).abs().max() < 1e-5
    assert torch.is_tensor(ours)  # the auxiliary logits only in training mode

    # a non-square grid, through transformers' neck with patch_height / patch_width
    tokens = [torch.randn(2, 1 + 2 * 6, D) for _ in range(4)]
    with torch.no_grad():
        theirs = reference.head(reference.neck(tokens, 2, 6))
        ours = head(split(tokens, 2, 6))
    assert ours.shape == theirs.shape == (2, 3, 32, 96)
    assert (ours - theirs).abs().max() < 1e-5

    # training mode: BatchNorm on batch statistics, and the auxiliary head (dropout off for the comparison)
    for model in (head, reference):
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    with torch.no_grad():
        fused = reference.neck(tokens, 2, 6)
        theirs, theirs_aux = reference.head(fused), reference.auxiliary_head(fused[-1])
        ours, aux = head(split(tokens, 2, 6))
    assert (ours - theirs).abs().max() < 1e-5
    assert aux.shape == theirs_aux.shape == (2, 3, 16, 48) and head.auxiliary_stride == 2
    assert (aux - theirs_aux).abs().max() < 1e-5


def test_readout_ignore_needs_no_cls_token():
    """With readout ignore the head takes no CLS token at all, and gives what transformers gives for any."""
    reference = reference_model("ignore")
    head = head_like(reference)
    tokens = [torch.randn(1, 1 + 9, D) for _ in range(4)]
    inputs = split(tokens, 3, 3)
    inputs.cls_tokens = None
    with torch.no_grad():
        assert (head(inputs) - F.interpolate(reference.head(reference.neck(tokens, 3, 3)), size=(48, 48),
                                            mode="bilinear", align_corners=False)).abs().max() < 1e-5


@pytest.mark.parametrize("patch", [16, 14])
def test_odd_grid_resized_once_to_the_image(patch):
    """On an odd grid the 0.5-factor level is ceil(h/2); transformers resizes each level to the fused
    map it joins and ends at 16 * even(h); the head resizes that once to the padded image, p h (16 h
    for patch 16, 14 h for patch 14). Patch 14 changes only that last resize, never the factors on the
    token grid (smp issue 1328)."""
    reference = reference_model("project")
    head = head_like(reference, patch)
    tokens = [torch.randn(1, 1 + 3 * 5, D) for _ in range(4)]
    with torch.no_grad():
        theirs = reference.head(reference.neck(tokens, 3, 5))
        ours = head(split(tokens, 3, 5))
    assert theirs.shape[-2:] == (64, 96)
    expected = F.interpolate(theirs, size=(3 * patch, 5 * patch), mode="bilinear", align_corners=False)
    assert ours.shape == expected.shape and (ours - expected).abs().max() < 1e-5
    assert head.output_stride == 1


def test_output_stride_follows_the_factors():
    """patch / scale, but never below 1: logits finer than the image are resized to it."""
    params = DPTParams(neck_hidden_sizes=[8] * 3, reassemble_factors=[2, 1, 1], hidden_size=8)
    head = build(params, [D] * 3, [14] * 3, 2, context(14, num_levels=3))
    assert head.scale == 16 and head.output_stride == 1
    params = DPTParams(neck_hidden_sizes=[8] * 3, reassemble_factors=[1, 0.5, 0.5], hidden_size=8)
    head = build(params, [D] * 3, [16] * 3, 2, context(num_levels=3))
    assert head.scale == 8 and head.output_stride == 2
    out = head.eval()(split([torch.randn(1, 1 + 6, D) for _ in range(3)], 2, 3))
    assert out.shape[-2:] == (16, 24)
    params = DPTParams(neck_hidden_sizes=[8] * 4, reassemble_factors=[4, 2, 1, 1], hidden_size=8)
    head = build(params, [D] * 4, [16] * 4, 2, context())
    assert head.scale == 32 and head.output_stride == 1
    out = head.eval()(split([torch.randn(1, 1 + 6, D) for _ in range(4)], 2, 3))
    assert out.shape[-2:] == (32, 48)


def test_weights_are_initialised_as_transformers_does():
    """post_init() of transformers' DPTForSemanticSegmentation is the reference: same distribution
    (N(0, 0.02) weights, zero biases, unit BatchNorms) for every parameter of the neck and heads."""
    torch.manual_seed(0)
    config = DPTConfig(hidden_size=D, neck_hidden_sizes=[32] * 4, fusion_hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=4, intermediate_size=128, readout_type="project", num_labels=3)
    ref = DPTForSemanticSegmentation(config)
    params = DPTParams(hidden_size=32, neck_hidden_sizes=[32] * 4, auxiliary_head=True)
    head = build(params, [D] * 4, [16] * 4, 3, context())
    theirs = {f"{part}.{n}": p for part in ("neck", "head", "auxiliary_head")
              for n, p in getattr(ref, part).named_parameters()}
    ours = dict(head.named_parameters())
    assert ours.keys() == {n for n in theirs if not n.startswith("neck." + UNUSED)}
    for name, p in ours.items():
        q = theirs[name]
        assert p.shape == q.shape, name
        if q.numel() >= 1000:
            assert abs(p.std().item() - q.std().item()) < 0.1 * q.std().item(), name
        else:
            assert torch.equal(p, torch.zeros_like(p)) == torch.equal(q, torch.zeros_like(q)), name
            assert torch.equal(p, torch.ones_like(p)) == torch.equal(q, torch.ones_like(q)), name


# ---------------------------------------------------------------- inside ViTSegModel

def model(backbone="dinov2", decoder=None, in_channels=3, lora=None, **kw):
    torch.manual_seed(0)
    cfg = {"model": {"backbone": backbone, "backbone_size": "tiny", "decoder": decoder or SMALL, **kw}}
    if lora:
        cfg["lora"] = lora
    return ViTSegModel(validate_config(cfg), in_channels=in_channels, num_classes=3)


def _decoder_output(m: ViTSegModel, x: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = m.decoder.register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        m(x)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("backbone, params", [
    ("dinov3", {}),  # 4 storage tokens after the CLS token
    ("dinov2", {"registers": True}),  # DINOv2 with registers, patch 14
    ("retfound", {"variant": "dinov2"}),
    ("visionfm", {}),
])
def test_model_reads_the_real_cls_token(backbone, params):
    """The head's output equals transformers' neck + head fed the chosen blocks' tokens with the CLS
    token first (registers / storage tokens dropped), taken from the timm blocks by hooks."""
    m = model({"name": backbone, **params}, {**SMALL, "readout": "project"}).eval()
    bb = m.backbone
    assert m.decoder_inputs == {"prefix_tokens"} and bb.has_cls_token
    x = torch.rand(1, 3, 40, 60)
    captured = {}
    hooks = [bb.vit.blocks[i].register_forward_hook(
        lambda mod, a, out, i=i: captured.__setitem__(i, out)) for i in m.layers]
    with torch.no_grad():
        ours = _decoder_output(m, x)
    for hook in hooks:
        hook.remove()
    p = m.patch_size
    xp = m.pad(m._normalize(x))
    h, w = xp.shape[-2] // p, xp.shape[-1] // p
    tokens = []
    for i in m.layers:
        t = captured[i]
        if m.intermediate_norm:
            t = bb.vit.norm(t)
        tokens.append(torch.cat([t[:, :1], t[:, bb.vit.num_prefix_tokens:]], dim=1))
    assert tokens[0].shape[1] == 1 + h * w
    with torch.no_grad():
        theirs = m.decoder.head(m.decoder.neck(tokens, h, w))
    theirs = F.interpolate(theirs, size=(p * h, p * w), mode="bilinear", align_corners=False) \
        if theirs.shape[-2:] != (p * h, p * w) else theirs
    assert ours.shape == theirs.shape and (ours - theirs).abs().max() < 1e-5


RETFOUND_14 = {"name": "retfound", "variant": "dinov2"}


@pytest.mark.parametrize("backbone", ["dinov2", "dinov3", RETFOUND_14, "visionfm"])
def test_any_size_patch_14_and_16_every_parameter_gets_a_gradient(backbone):
    m = model(backbone, {**SMALL, "auxiliary_head": True}).train()
    out, aux = m(torch.rand(2, 3, 97, 131))
    assert out.shape == (2, 3, 97, 131) and torch.isfinite(out).all()
    assert aux.shape == (2, 3, 97, 131)
    (out.square().mean() + m.auxiliary_loss_weight * aux.square().mean()).backward()
    no_grad = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not no_grad
    m.eval()
    with torch.no_grad():
        for shape in [(1, 3, 1, 300), (1, 3, 1, 1), (1, 3, 29, 15)]:
            out = m(torch.rand(*shape))
            assert out.shape == (1, 3, *shape[2:]) and torch.isfinite(out).all()


@pytest.mark.parametrize("in_channels", [1, 3, 5])
def test_input_channels(in_channels):
    m = model("dinov3", in_channels=in_channels).eval()
    with torch.no_grad():
        assert m(torch.rand(1, in_channels, 33, 47)).shape == (1, 3, 33, 47)


@pytest.mark.parametrize("mode", ["lora", "frozen"])
def test_lora_and_frozen_backbone_train_the_head(mode):
    extra = {"lora": {"enabled": True, "r": 2}} if mode == "lora" else {"freeze_backbone": True}
    m = model("dinov2", {**SMALL, "readout": "add"}, **extra).train()
    m(torch.rand(1, 3, 30, 44)).square().mean().backward()
    trainable = {n: p for n, p in m.named_parameters() if p.requires_grad}
    # LoRA's B starts at zero, so A's first gradient is exactly zero, but it is in the graph
    assert all(p.grad is not None and (p.grad.any() or "lora_A" in n) for n, p in trainable.items())
    backbone = [n for n in trainable if n.startswith("backbone.")]
    assert all("lora_" in n for n in backbone) and (bool(backbone) == (mode == "lora"))


def test_readout_ignore_computes_no_prefix_tokens():
    m = model("dinov3", {**SMALL, "readout": "ignore"})
    assert m.decoder_inputs == frozenset()
    seen = []
    m.decoder.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    m.eval()(torch.rand(1, 3, 32, 32))
    assert seen[0].cls_tokens is None and seen[0].register_tokens is None


# ---------------------------------------------------------------- errors

def test_pyramid_neck_is_refused():
    match = r"model\.neck: pyramid cannot apply to decoder dpt.*set model\.neck: identity"
    with pytest.raises(ConfigError, match=match):
        model("dinov2", neck="pyramid")


@pytest.mark.parametrize("decoder, match", [
    ({"reassemble_factors": [4, 3, 1, 0.5]}, r"model\.decoder\.reassemble_factors.*not a power of two"),
    ({"reassemble_factors": [4, 2, 1, 0]}, r"model\.decoder\.reassemble_factors.*not a power of two"),
    ({"readout": "cls"}, r"model\.decoder\.readout"),
    ({"dropout": 1.0}, r"model\.decoder\.dropout"),
    ({"hidden_size": 0}, r"model\.decoder\.hidden_size"),
    ({"neck_hidden_sizes": []}, r"model\.decoder\.neck_hidden_sizes"),
    ({"fusion_hidden_size": 8}, r"model\.decoder\.fusion_hidden_size"),  # unknown key: it is hidden_size
])
def test_bad_params_are_config_errors_with_the_key(decoder, match):
    with pytest.raises(ConfigError, match=match):
        model("dinov2", {**SMALL, **decoder})


def test_default_neck_sizes_follow_the_backbone_width():
    head = build(DPTParams(hidden_size=8), [D] * 4, [16] * 4, 2, context())
    sizes = [layer.projection.out_channels for layer in head.neck.reassemble_stage.layers]
    assert sizes == [D // 8, D // 4, D // 2, D]
    params = DPTParams(hidden_size=8, reassemble_factors=[1, 1])
    head = build(params, [D] * 2, [16] * 2, 2, context(num_levels=2))
    assert [layer.projection.out_channels for layer in head.neck.reassemble_stage.layers] == [D // 2, D]


def test_one_entry_per_level():
    with pytest.raises(ConfigError, match=r"model\.decoder\.neck_hidden_sizes has 4 entries but the backbone "
                                          r"gives 3 levels \(model\.layers\)"):
        model("dinov2", layers=[1, 2, 3])
    m = model("dinov2", {**SMALL, "neck_hidden_sizes": [8] * 3, "reassemble_factors": [2, 1, 0.5]},
              layers=[1, 2, 3])
    assert m.decoder.output_stride == 14 / 8


def test_cls_readout_on_a_backbone_without_cls_token():
    no_cls = context(has_cls_token=False)
    match = r"model\.decoder\.readout: add reads the CLS token.*readout: ignore"
    with pytest.raises(ConfigError, match=match):
        build(DPTParams(readout="add"), [D] * 4, [16] * 4, 2, no_cls)
    assert build(DPTParams(readout="ignore"), [D] * 4, [16] * 4, 2, no_cls).inputs == set()


def test_registered_as_a_contract_2_decoder():
    registry = Registry(load_entrypoints=False)
    registry.register(segframe_dpt, "dpt")
    spec = registry.decoder("dpt").spec
    assert spec.contract == 2 and spec.inputs == {"prefix_tokens"}
