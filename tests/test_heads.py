"""Every installed decoder under what users give it: odd image sizes on patch 14 and 16, 1/3/N input
channels, LoRA with a frozen backbone, and DDP as nnU-Net runs it (no unused trainable parameter).

Decoders come from the registry, so each plugin under plugins/ is covered once installed.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from ddp import loss_of, starting_model, train_ddp
from test_model import dead_parameters, without_graph_gradient

from segframe.config import validate_config
from segframe.errors import ConfigError
from segframe.model import ViTSegModel
from segframe.plugins import get_registry

DECODERS = list(get_registry().decoders())


# small but valid settings for heads whose defaults are heavy on a CPU
SMALL = {"mask2former": {"num_queries": 8, "decoder_layers": 2, "pixel_decoder_layers": 1, "num_points": 256}}


def section(name: str) -> dict:
    fields = get_registry().decoder(name).spec.params.model_fields
    return {"name": name, **({"hidden_size": 32} if "hidden_size" in fields else {}), **SMALL.get(name, {})}


def build(decoder: str, backbone: str = "dinov2", in_channels: int = 3, num_classes: int = 2, **extra):
    torch.manual_seed(0)
    cfg = tiny_config(backbone, section(decoder))
    cfg.update({k: v for k, v in extra.items() if k in ("lora",)})
    cfg["model"].update({k: v for k, v in extra.items() if k != "lora"})
    return ViTSegModel(validate_config(cfg), in_channels=in_channels, num_classes=num_classes)


def test_six_decoders_each_from_its_own_distribution():
    found = get_registry().decoders()
    assert {"upernet", "segformer", "dpt", "unetr", "primus", "linear"} <= set(found), sorted(found)
    dists = {name: reg.distribution for name, reg in found.items()}
    assert all(dist == f"segframe-{name}" for name, dist in dists.items() if name in (
        "upernet", "segformer", "dpt", "unetr", "primus", "linear", "mask2former")), dists


@pytest.mark.parametrize("backbone", ["dinov2", "dinov3"])  # patch 14 and 16
@pytest.mark.parametrize("decoder", DECODERS)
def test_odd_sizes_and_channel_counts(decoder, backbone):
    for channels in (1, 3, 5):
        model = build(decoder, backbone, in_channels=channels, num_classes=3).eval()
        for h, w in ((97, 131), (1, 300), (1, 1)):
            with torch.no_grad():
                out = model(torch.rand(1, channels, h, w))
            assert out.shape == (1, 3, h, w), (channels, h, w, out.shape)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("decoder", DECODERS)
def test_lora_with_a_frozen_backbone_trains_adapters_and_head(decoder):
    model = build(decoder, "dinov3", freeze_backbone=True, lora={"enabled": True, "r": 2}).train()
    with torch.no_grad():  # live adapters, so their A matrices get a gradient too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable)
    assert not any(n.startswith("backbone.") and "lora_" not in n for n in trainable)
    x = torch.rand(2, 3, 40, 56)
    loss_of(model, model(x), torch.randint(0, 2, (2, 40, 56))).backward()
    assert not without_graph_gradient(model)
    assert not dead_parameters(model, x)


@pytest.mark.parametrize("decoder", DECODERS)
def test_pyramid_neck_is_used_or_refused_clearly(decoder):
    try:
        model = build(decoder, "dinov3", neck="pyramid").eval()
    except ConfigError as exc:
        assert "model.neck" in str(exc), exc
        return
    with torch.no_grad():
        assert model(torch.rand(1, 3, 97, 131)).shape == (1, 2, 97, 131)


def test_ddp_every_decoder_two_cpu_processes(tmp_path):
    """Ranks end equal and every trainable weight moved, for every decoder (DDP itself fails on a
    trainable parameter without a gradient). Weights, not 1-d parameters: a bias that a BatchNorm's
    batch mean removes (SegFormer's projections) or an attention key bias has a gradient that is zero
    in exact arithmetic, so whether it moves would be decided by rounding. That every parameter
    matters is checked in eval mode above (test_lora_with_a_frozen_backbone_trains_adapters_and_head)."""
    lora = {"enabled": True, "r": 2}
    cases = {decoder: {"config": {**tiny_config("dinov2", section(decoder)), "lora": lora}, "size": (28, 42)}
             for decoder in DECODERS}
    ranks = train_ddp(cases, tmp_path)
    for decoder in DECODERS:
        initial = dict(starting_model(cases[decoder]).named_parameters())
        trained = ranks[0][decoder]
        assert trained and trained.keys() == ranks[1][decoder].keys()
        for name, value in trained.items():
            torch.testing.assert_close(value, ranks[1][decoder][name], msg=f"{decoder}: {name} differs")
        still = [n for n, v in trained.items()
                 if v.ndim > 1 and "lora_B" not in n and torch.equal(v, initial[n].detach())]
        assert not still, f"{decoder}: parameters that did not train: {still}"
