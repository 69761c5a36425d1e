"""PyTorch's bicubic resize (`F.interpolate`, align_corners=False) written as two weight matrices.

Resizing a learned position embedding to the token grid of the input is `W_h @ grid @ W_w^T`. The
matrices come from tensor operations on the grid size, so torch.export keeps height and width
symbolic (`F.interpolate` with a scale factor, as the DINOv2 code resizes, fixes them; timm's resize
guards on the size). The weights are those of PyTorch's CPU kernels: Keys' cubic with a = -0.75 on
clamped neighbours, and, with antialias, a = -0.5 on a support widened by the downscale factor and
normalised per output (tests/test_backbones.py checks both against `F.interpolate`).
"""

from __future__ import annotations

import torch


def _near(x: torch.Tensor, a: float) -> torch.Tensor:
    """The cubic convolution kernel for |x| <= 1."""
    return ((a + 2) * x - (a + 3)) * x * x + 1


def _far(x: torch.Tensor, a: float) -> torch.Tensor:
    """The cubic convolution kernel for 1 <= |x| <= 2."""
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a


def bicubic_matrix(size_out: int, size_in: int, *, offset: float = 0.0, antialias: bool = False,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """The (size_out, size_in) float32 matrix of a 1-D bicubic resize.

    offset: the output size is treated as `size_out + offset` for the coordinate scale, as
    `F.interpolate(scale_factor=(size_out + offset) / size_in)` does (the DINOv2 code's 0.1).
    """
    dst = torch.arange(size_out, dtype=torch.float32, device=device)
    src = torch.arange(size_in, dtype=torch.float32, device=device)
    # a tensor, so no Python number of the size; in float64 (on the CPU: MPS has none) and then
    # rounded, as the kernels do
    scale = (size_in / (torch.ones((), dtype=torch.float64) * size_out + offset)).float().to(device)
    if antialias:
        stretch = scale.clamp(min=1.0)  # the support widens only when downscaling
        support = 2.0 * stretch
        center = scale * (dst + 0.5)
        lo = torch.floor(center - support + 0.5).clamp(min=0)
        hi = torch.floor(center + support + 0.5).clamp(max=size_in)
        x = ((src[None] - center[:, None] + 0.5) / stretch).abs()
        w = torch.where(x < 1, _near(x, -0.5), torch.where(x < 2, _far(x, -0.5), torch.zeros_like(x)))
        w = w * ((src[None] >= lo[:, None]) & (src[None] < hi[:, None]))
        return w / w.sum(dim=1, keepdim=True)
    pos = scale * (dst + 0.5) - 0.5
    first = torch.floor(pos)
    t = pos - first
    weights = (_far(t + 1, -0.75), _near(t, -0.75), _near(1 - t, -0.75), _far(2 - t, -0.75))
    matrix = torch.zeros(size_out, size_in, device=device)
    for k, w in zip(range(-1, 3), weights, strict=True):
        index = (first + k).clamp(0, size_in - 1)
        matrix = matrix + w[:, None] * (index[:, None] == src[None])
    return matrix


def bicubic_resize(grid: torch.Tensor, size: tuple[int, int], *, offset: float = 0.0,
                   antialias: bool = False) -> torch.Tensor:
    """Resize (C, h, w) float maps to `size` like `F.interpolate(mode="bicubic")` does (C, H, W).

    Two batched matrix products on expanded matrices: no reshape of a symbolic size, whose view
    arithmetic would add guards (einsum and broadcasting matmul reshape). In float32 under autocast
    too (nnU-Net trains with it on CUDA), as `F.interpolate`, which autocast leaves alone, computes.
    """
    if torch.is_autocast_enabled(grid.device.type):
        with torch.autocast(grid.device.type, enabled=False):
            return bicubic_resize(grid.float(), size, offset=offset, antialias=antialias)
    channels = grid.shape[0]
    rows = bicubic_matrix(size[0], grid.shape[-2], offset=offset, antialias=antialias, device=grid.device)
    cols = bicubic_matrix(size[1], grid.shape[-1], offset=offset, antialias=antialias, device=grid.device)
    wide = torch.bmm(grid, cols.T.expand(channels, -1, -1))
    return torch.bmm(rows.expand(channels, -1, -1), wide)
