"""ViTSegModel: pad, normalise, extract ViT features, neck, plugin head, upsample, crop.

The one model for every backbone and decoder; plugins own only the head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segframe.config import SegframeConfig, validate_config
from segframe.errors import SegframeError
from segframe.plugins import get_registry


class ViTSegModel(nn.Module):
    """Segmentation model built from a validated `SegframeConfig`.

    forward(x: (B, in_channels, H, W)) -> logits (B, num_classes, H, W), any H, W >= 1.
    Pretrained weights are not loaded here (nnU-Net rebuilds the network for inference);
    call `load_pretrained()` when training starts.
    """

    def __init__(self, config: SegframeConfig | dict, in_channels: int = 3, num_classes: int = 2):
        super().__init__()
        if not isinstance(config, SegframeConfig):
            config = validate_config(config)
        self.config = config
        self.in_channels = in_channels
        self.num_classes = num_classes
        registry = get_registry()
        m = config.model
        bb_spec = registry.backbone(m.backbone.name).spec
        self.backbone = bb_spec.build(m.backbone_size, config.backbone_params())
        self.layers = self.backbone.check_layers(m.layers or self.backbone.default_layers)
        self.patch_size = self.backbone.patch_size
        self.register_buffer("mean", torch.tensor(self.backbone.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.backbone.std).view(1, -1, 1, 1), persistent=False)
        d = self.backbone.embed_dim
        in_ch = [d] * len(self.layers)
        in_strides = [self.patch_size] * len(self.layers)
        dec_spec = registry.decoder(m.decoder.name).spec
        self.decoder = dec_spec.build(config.decoder_params(), in_ch, in_strides, num_classes)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise SegframeError(f"expected input (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise SegframeError(
                f"expected {self.in_channels} input channels, got {x.shape[1]} (shape {tuple(x.shape)})"
            )

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.config.model.normalize == "backbone":
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return x

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        p = self.patch_size
        ph, pw = -h % p, -w % p
        if not (ph or pw):
            return x
        pad = (0, pw, 0, ph)
        mode = "reflect" if ph < h and pw < w else "replicate"
        return F.pad(x, pad, mode=mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        h, w = x.shape[-2:]
        x = self._pad(self._normalize(x))
        feats = self.backbone.features(x, self.layers)
        logits = self.decoder(feats)
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :h, :w]
