"""timm's DINOv3 rotary position embedding, with its token grid kept symbolic for torch.export.

timm's `make_coords_dinov3` builds the coordinates from `torch.arange(0.5, height)` and
`float(height)`: Python numbers of the grid size, so `segframe export` could only write a graph for
one image size. `token_coords` computes the same numbers bit for bit from tensor operations on the
size (tests/test_dinov3_rope.py checks it against timm), and `SymbolicGridRope` is timm's module
using it; `dinov3.build` switches the class of the model's RoPE module to it (same buffers, same keys).
"""

from __future__ import annotations

import torch
from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3


def token_coords(height: int, width: int, normalize: str = "separate", indexing: str = "ij",
                 offset: float = 0.0) -> torch.Tensor:
    """The (height * width, 2) token coordinates in [-1, 1] of `make_coords_dinov3`: 0.5-centred
    indices (+ offset) over `normalize` ("separate": each side by its length, "max", "min")."""
    if normalize == "separate":
        h_denom, w_denom = height, width
    elif normalize in ("max", "min"):
        h_denom = w_denom = (torch.sym_max if normalize == "max" else torch.sym_min)(height, width)
    else:
        raise ValueError(f"unknown normalize_coords: {normalize}")
    coords_h = (torch.arange(height, dtype=torch.float32) + 0.5 + offset) / h_denom
    coords_w = (torch.arange(width, dtype=torch.float32) + 0.5 + offset) / w_denom
    if indexing == "xy":
        grid_w, grid_h = torch.meshgrid(coords_w, coords_h, indexing="xy")
        coords = torch.stack([grid_h, grid_w], dim=-1)
    else:
        coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1)
    return 2.0 * coords.flatten(0, 1) - 1.0


class SymbolicGridRope(RotaryEmbeddingDinoV3):
    """timm's `RotaryEmbeddingDinoV3` whose coordinates come from `token_coords`."""

    def _create_embed(self, feat_shape: list[int], no_aug: bool = False) -> torch.Tensor:
        coords = token_coords(*feat_shape, self.normalize_coords, self.grid_indexing, self.grid_offset)
        if not no_aug:
            coords = self._apply_coord_augs(coords)
        sin, cos = self._get_pos_embed_from_coords(coords)
        return torch.cat([sin, cos], dim=-1)
