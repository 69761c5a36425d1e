"""LoRA on every registered backbone: live adapters, gradients, merge against a hand computation,
state-dict round trips (merged or not), freezing, parameter counts, target-module errors."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import tiny_config
from torch import nn

from segframe.config import validate_config
from segframe.errors import ConfigError
from segframe.lora import target_regex
from segframe.model import ViTSegModel
from segframe.plugins import get_registry

BACKBONES = list(get_registry().backbones())
X = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))  # the same whatever ran before


def build(backbone="dinov2", lora=None, seed=0, **model) -> ViTSegModel:
    """A tiny model with random backbone weights: timm's init (LayerScale 1e-5, zero biases) would
    hide what the attention does behind a near-identity residual."""
    torch.manual_seed(seed)
    cfg = tiny_config(backbone, **model)
    cfg["lora"] = {"lora_dropout": 0.0, **(lora or {})}
    model = ViTSegModel(validate_config(cfg), num_classes=3)
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if ".lora_" not in name:
                one = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                p.copy_(torch.randn_like(p) * 0.2 + one)
    return model


def lora_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if ".lora_" in n}


def randomize_lora_b(model: nn.Module, std: float = 0.2) -> None:
    with torch.no_grad():
        for n, p in lora_params(model).items():
            if "lora_B" in n:
                p.normal_(std=std)


def run(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_lora_is_live_on_every_backbone(backbone):
    """Against the same model without LoRA: zero B = same output, non-zero B = different output,
    and gradients reach every A and B matrix."""
    base = build(backbone)
    lora = copy.deepcopy(base)
    lora.enable_lora()
    adapters = lora_params(lora)
    assert len(adapters) == 2 * base.backbone.num_layers  # A and B on each block's qkv
    torch.testing.assert_close(run(lora), run(base))
    randomize_lora_b(lora)
    assert (run(lora) - run(base)).abs().max() > 1e-3
    lora.train()(X).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters.values())


@pytest.mark.parametrize("backbone", BACKBONES)
def test_merge_and_unload(backbone):
    """disable_lora merges W + (alpha / r) * B @ A (checked by hand) and restores plain layers."""
    model = build(backbone, lora={"enabled": True, "r": 4, "lora_alpha": 8})
    randomize_lora_b(model)
    qkv = model.backbone.vit.blocks[1].attn.qkv
    by_hand = qkv.base_layer.weight + 2.0 * qkv.lora_B["default"].weight @ qkv.lora_A["default"].weight
    before = run(model)
    model.disable_lora()
    assert not model.lora_active and model.config.lora.enabled is False
    merged = model.backbone.vit.blocks[1].attn.qkv
    assert type(merged) is nn.Linear
    torch.testing.assert_close(merged.weight, by_hand)
    torch.testing.assert_close(run(model), before, rtol=1e-5, atol=1e-5)
    assert build(backbone).state_dict().keys() == model.state_dict().keys()


def _round_trip(sd: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("merged", [False, True])
def test_state_dict_round_trip(merged):
    """A LoRA-trained model saved and rebuilt from its config alone gives identical outputs."""
    model = build("dinov3", lora={"enabled": True, "r": 2}, neck="pyramid")
    randomize_lora_b(model)
    with torch.no_grad():  # as if trained: BN statistics and heads moved
        model.train()(X)
    expected = run(model)
    if merged:
        model.disable_lora()
    rebuilt = ViTSegModel(model.config, num_classes=3)
    assert rebuilt.lora_active is not merged
    rebuilt.load_state_dict(_round_trip(model.state_dict()), strict=True)
    torch.testing.assert_close(run(rebuilt), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("freeze", [False, True])
def test_trainable_parts_and_counts(freeze, capsys):
    """LoRA trains only the adapters inside the backbone (peft freezes the rest) with or without
    freeze_backbone; neck, head and upsampler always train. Counts checked by hand."""
    model = build("dinov2", lora={"enabled": True, "r": 4}, freeze_backbone=freeze, neck="pyramid")
    d, depth = 64, 4
    counts = model.print_trainable_parameters(detailed=True)
    lora_total = depth * 4 * (d + 3 * d)  # A: r x d, B: 3d x r per block's qkv
    assert counts["lora"] == (lora_total, lora_total)
    backbone_total = sum(p.numel() for n, p in model.backbone.named_parameters() if ".lora_" not in n)
    assert counts["backbone"] == (0, backbone_total)
    for part in ("neck", "decoder", "upsampler"):
        total = sum(p.numel() for p in getattr(model, part).parameters())
        assert counts[part] == (total, total) and total > 0
    out = capsys.readouterr().out
    trainable = lora_total + sum(counts[p][0] for p in ("neck", "decoder", "upsampler"))
    assert f"trainable params: {trainable:,} || all params: {trainable + backbone_total:,}" in out
    assert "  lora " in out and "  backbone " in out


def test_freeze_without_lora_and_full_finetuning():
    frozen = build("dinov2", freeze_backbone=True)
    assert not any(p.requires_grad for p in frozen.backbone.parameters())
    assert all(p.requires_grad for n, p in frozen.named_parameters() if not n.startswith("backbone."))
    frozen(X).mean().backward()
    assert all(p.grad is None for p in frozen.backbone.parameters())
    full = build("dinov2")
    assert all(p.requires_grad for p in full.parameters())
    assert "lora" not in full.parameter_counts()


def test_target_modules():
    assert "patch_embed" not in target_regex(["proj"])
    model = build("dinov2", lora={"enabled": True, "target_modules": ["qkv", "proj", "fc1", "fc2"]})
    wrapped = {n.rsplit(".", 2)[0] for n in lora_params(model) if "lora_A" in n}
    expected = {f"backbone.vit.blocks.{i}.{m}.lora_A" for i in range(4)
                for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert wrapped == expected  # patch_embed.proj untouched
    assert type(model.backbone.vit.patch_embed.proj) is nn.Conv2d
    with pytest.raises(ConfigError, match=r"\['qvk'\] match no layer.*fc1, fc2, proj, qkv"):
        build("dinov2", lora={"enabled": True, "target_modules": ["qvk"]})


def test_enable_lora_is_idempotent_and_updates_config():
    model = build("dinov2", lora={"r": 2})
    assert not model.lora_active and model.config.lora.enabled is False
    model.enable_lora()
    model.enable_lora()
    assert model.config.lora.enabled is True and len(lora_params(model)) == 8
    rebuilt = ViTSegModel(model.config, num_classes=3)
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
