"""The SegFormer plugin against the installed transformers' SegformerDecodeHead, with copied weights."""

import pytest
import torch
from segframe_segformer import SegformerParams, build
from transformers import SegformerConfig
from transformers.models.segformer.modeling_segformer import SegformerDecodeHead


def _copy_weights(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """transformers keeps the per-level projections as nn.Linear; ours are 1x1 convs."""
    sd = theirs.state_dict()
    projections = getattr(theirs, "linear_projections", None) or theirs.linear_c  # 5.x / 4.x names
    with torch.no_grad():
        for conv, mlp in zip(ours.projections, projections, strict=True):
            conv.weight.copy_(mlp.proj.weight[:, :, None, None])
            conv.bias.copy_(mlp.proj.bias)
        ours.fuse.weight.copy_(sd["linear_fuse.weight"])
        ours.classifier.load_state_dict(theirs.classifier.state_dict())
        ours.norm.load_state_dict(theirs.batch_norm.state_dict())


@pytest.mark.parametrize(
    "channels,sizes",
    [([16, 16, 16, 16], [8, 8, 8, 8]), ([8, 16, 24, 32], [16, 8, 4, 2]), ([12, 12, 12, 12], [8, 4, 2, 1])],
)
def test_logits_equal_transformers(channels, sizes):
    torch.manual_seed(0)
    config = SegformerConfig(
        num_encoder_blocks=len(channels), hidden_sizes=channels, decoder_hidden_size=24, num_labels=4
    )
    theirs = SegformerDecodeHead(config)
    with torch.no_grad():  # non-trivial BN statistics so eval mode is a real test
        theirs.batch_norm.running_mean.normal_()
        theirs.batch_norm.running_var.uniform_(0.5, 1.5)
        theirs.batch_norm.weight.normal_()
        theirs.batch_norm.bias.normal_()
    ours = build(SegformerParams(hidden_size=24), channels, [4 * 16 // s for s in sizes], num_classes=4)
    _copy_weights(ours, theirs)
    theirs.eval()
    ours.eval()
    feats = [torch.randn(2, c, s, s) for c, s in zip(channels, sizes, strict=True)]
    with torch.no_grad():
        a, b = ours(feats), theirs(feats)
    assert a.shape == (2, 4, sizes[0], sizes[0])
    assert (a - b).abs().max() < 1e-5


def test_weights_are_initialised():
    torch.manual_seed(0)
    head = build(SegformerParams(hidden_size=64), [96] * 4, [14] * 4, num_classes=3)
    assert abs(head.classifier.weight.std().item() - 0.01) < 0.003
    assert abs(head.projections[0].weight.std().item() - 0.02) < 0.002
    assert torch.all(head.norm.weight == 1) and torch.all(head.fuse.weight.std() > 0.05)
