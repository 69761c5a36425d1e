"""Official weight files on another position grid (issue 14, item 8): RETFound's own loader resizes a
learned position embedding on any square grid (MAE's `interpolate_pos_embed`), so segframe does the
same for the retfound family and says so in the load report; DINOv2's own loader does not, so the
dinov2 family still refuses; a wrong patch size or width is always refused."""

import pytest
import torch
import torch.nn.functional as F

from segframe.backbones import dinov2, retfound
from segframe.errors import CheckpointError


def retfound_dinov2_tiny():
    return retfound.build("tiny", retfound.RetFoundParams(variant="dinov2"))


def interpolate_pos_embed_reference(pos: torch.Tensor, new_size: int, extra: int = 1) -> torch.Tensor:
    """RETFound's (MAE's) util/pos_embed.py interpolate_pos_embed, transcribed."""
    size = int((pos.shape[-2] - extra) ** 0.5)
    tokens = pos[:, extra:].reshape(-1, size, size, pos.shape[-1]).permute(0, 3, 1, 2)
    tokens = F.interpolate(tokens, size=(new_size, new_size), mode="bicubic", align_corners=False)
    return torch.cat((pos[:, :extra], tokens.permute(0, 2, 3, 1).flatten(1, 2)), dim=1)


def teacher_file(backbone, tmp_path, grid: int, width: int | None = None, name: str = "teacher.pth"):
    """A RETFound-DINOv2-style {'teacher': {'backbone.*'}} file whose position embedding is grid x grid."""
    torch.manual_seed(0)
    sd = {k: v.clone() for k, v in backbone.vit.state_dict().items()}
    dim = width or backbone.embed_dim
    sd["pos_embed"] = torch.randn(1, 1 + grid * grid, dim)
    sd["mask_token"] = torch.zeros(1, dim)
    path = tmp_path / name
    torch.save({"teacher": {f"backbone.{k}": v for k, v in sd.items()}}, path)
    return path, sd["pos_embed"]


@pytest.mark.parametrize("file_grid", [16, 40])  # DINOv2's 224 px crop (257 entries); a larger grid
def test_retfound_accepts_another_square_grid_and_resizes_as_its_loader(tmp_path, file_grid):
    backbone = retfound_dinov2_tiny()
    grid = backbone.vit.patch_embed.grid_size
    assert tuple(grid) == (37, 37) and backbone.vit.pos_embed.shape[1] == 1370
    path, pos = teacher_file(backbone, tmp_path, file_grid)
    report = backbone.load_checkpoint(path)
    # float32's default tolerance: the neighbouring resizes (antialiased, DINOv2's +0.1 offset) differ
    # from this one by 0.29 to 0.82 here, while the same resize summed in another order (another memory
    # layout inside timm) may differ by a few ulps, more than an absolute 1e-6 at |values| near 4
    torch.testing.assert_close(backbone.vit.pos_embed.data, interpolate_pos_embed_reference(pos, 37))
    assert f"position embedding resized from the file's {file_grid}x{file_grid} grid to 37x37" \
        in report.summary()
    assert "bicubic, no antialias" in report.summary() and "\n" not in report.summary()


def test_same_grid_needs_no_resize(tmp_path):
    backbone = retfound_dinov2_tiny()
    path, pos = teacher_file(backbone, tmp_path, 37)
    report = backbone.load_checkpoint(path)
    assert report.notes == [] and torch.equal(backbone.vit.pos_embed.data, pos)


def test_dinov2_family_still_refuses_another_grid(tmp_path):
    backbone = dinov2.build("tiny", dinov2.DinoV2Params())
    path, _ = teacher_file(backbone, tmp_path, 16)
    with pytest.raises(CheckpointError, match="position embedding has 257 entries; dinov2 tiny expects 1370"):
        backbone.load_checkpoint(path)


def test_wrong_width_or_patch_size_is_still_refused(tmp_path):
    backbone = retfound_dinov2_tiny()
    before = backbone.vit.pos_embed.detach().clone()
    path, _ = teacher_file(backbone, tmp_path, 16, width=32, name="narrow.pth")
    with pytest.raises(CheckpointError, match="position embedding has 257 entries"):
        backbone.load_checkpoint(path)
    mae = retfound.build("tiny", retfound.RetFoundParams(variant="mae"))  # patch 16
    path, _ = teacher_file(mae, tmp_path, 16, name="mae.pth")
    with pytest.raises(CheckpointError, match="patch size 16, retfound tiny uses 14"):
        backbone.load_checkpoint(path)
    assert torch.equal(backbone.vit.pos_embed.detach(), before)
