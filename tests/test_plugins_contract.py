"""Every installed decoder honours the head contract: list of maps in, logits at the first level out."""

import pytest
import torch

from segframe.plugins import get_registry

DECODERS = ["upernet", "segformer"]  # the distributions this project ships
SMALL = {"upernet": {"hidden_size": 16}, "segformer": {"hidden_size": 16}}


def _build(name, channels, strides, num_classes=3):
    spec = get_registry().decoder(name).spec
    return spec.build(spec.params(**SMALL[name]), channels, strides, num_classes)


def test_shipped_decoders_are_registered_by_their_distributions():
    decoders = get_registry().decoders()
    for name in DECODERS:
        assert decoders[name].distribution == f"segframe-{name}"


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize(
    "strides,sizes",
    [
        ([14, 14, 14, 14], [(5, 7)] * 4),  # plain ViT: every level at the patch stride
        ([4, 8, 16, 32], [(8, 12), (4, 6), (2, 3), (1, 1)]),  # pyramid p/4..2p, last level 1x1
        ([16], [(3, 2)]),  # a single level
    ],
)
def test_contract(name, strides, sizes):
    torch.manual_seed(0)
    channels = [12] * len(strides)
    head = _build(name, channels, strides)
    assert head.output_stride == strides[0]
    feats = [torch.randn(2, 12, h, w) for h, w in sizes]
    head.eval()
    with torch.no_grad():
        logits = head(feats)
    assert logits.shape == (2, 3, *sizes[0])
    assert torch.isfinite(logits).all()

    head.train()
    head(feats).square().mean().backward()
    assert all(p.grad is not None for p in head.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", DECODERS)
def test_batch_of_one_trains(name):
    head = _build(name, [12] * 4, [14] * 4).train()
    head([torch.randn(1, 12, 4, 4) for _ in range(4)]).mean().backward()
    if name == "upernet":  # the scale-1 pooling norm used running stats and is back in training mode
        assert head.head.psp_modules.blocks[0].layers[1].batch_norm.training
