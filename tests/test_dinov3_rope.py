"""segframe's DINOv3 RoPE coordinates (segframe/backbones/rope.py) against timm's `make_coords_dinov3`,
the reference: equal bit for bit, so the features do not change while exports keep sizes symbolic."""

import pytest
import torch
from conftest import tiny_config
from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3, make_coords_dinov3

from segframe.backbones.rope import SymbolicGridRope, token_coords
from segframe.config import validate_config
from segframe.model import ViTSegModel


@pytest.mark.parametrize("normalize", ["separate", "max", "min"])
@pytest.mark.parametrize("indexing", ["ij", "xy"])
def test_token_coords_equal_timm(normalize, indexing):
    for h, w in [(1, 1), (2, 3), (6, 9), (37, 14), (64, 64)]:
        for offset in (0.0, 0.25):
            ours = token_coords(h, w, normalize, indexing, offset)
            theirs = make_coords_dinov3(h, w, normalize, indexing, offset)
            assert ours.dtype == theirs.dtype and torch.equal(ours, theirs), (h, w, offset)


def test_model_rope_gives_timm_embeddings():
    model = ViTSegModel(validate_config(tiny_config("dinov3", "linear")), in_channels=3, num_classes=2)
    rope = model.backbone.vit.rope
    assert type(rope) is SymbolicGridRope and isinstance(rope, RotaryEmbeddingDinoV3)
    for shape in ([2, 3], [6, 8]):
        ours = rope.get_embed(shape)
        theirs = RotaryEmbeddingDinoV3._create_embed(rope, shape)  # timm's own method on the same module
        assert torch.equal(ours, theirs)
