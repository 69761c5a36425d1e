"""The Mask2Former head, its targets, its loss with ignored pixels, and its dense semantic logits.

Everything numeric is transformers' (`transformers.models.mask2former.modeling_mask2former`):
the pixel decoder, the transformer module, the class predictor and `Mask2FormerLoss`. This
module adds what segframe needs around them: a feature pyramid for same-stride ViT levels,
dense labels -> per-image masks/classes, point sampling that skips ignored pixels, and the
map from mask classification to per-class logits for nnU-Net.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from transformers import Mask2FormerConfig
from transformers.models.mask2former import modeling_mask2former as m2f

from segframe import ConfigError
from segframe.plugins import DecoderInputs, HeadContext
from segframe.upsample import FeaturePyramidNeck


def mask2former_config(params: Any, num_classes: int) -> Mask2FormerConfig:
    """The transformers config of the head: one width everywhere, strides 4..32 (relative)."""
    d = params.hidden_size
    return Mask2FormerConfig(
        feature_size=d, mask_feature_size=d, hidden_dim=d, encoder_feedforward_dim=4 * d,
        dim_feedforward=8 * d, encoder_layers=params.pixel_decoder_layers,
        decoder_layers=params.decoder_layers + 1, num_attention_heads=params.num_heads,
        num_queries=params.num_queries, num_labels=num_classes, no_object_weight=params.no_object_weight,
        class_weight=params.class_weight, mask_weight=params.mask_weight, dice_weight=params.dice_weight,
        train_num_points=params.num_points, use_auxiliary_loss=params.deep_supervision,
        feature_strides=[4, 8, 16, 32], common_stride=4,
    )


def group_norm_groups(width: int) -> int:
    """Groups of the pixel decoder's GroupNorms: transformers' 32 for widths that are multiples of 32
    from 64 up (the original); fewer below, so every group keeps at least 2 channels. A group of
    one channel would cancel the conv bias in front of it (no gradient) and cannot normalise a
    1x1 map (a one-patch input)."""
    return 32 if width % 32 == 0 and width >= 64 else math.gcd(32, width // 2)


class _GroupNormByWidth:
    """torch.nn, except that GroupNorm(32, width) is built with group_norm_groups(width) groups."""

    def __getattr__(self, name: str) -> Any:
        return getattr(nn, name)

    @staticmethod
    def GroupNorm(num_groups: int, num_channels: int, **kwargs: Any) -> nn.GroupNorm:  # noqa: N802
        return nn.GroupNorm(group_norm_groups(num_channels), num_channels, **kwargs)


@contextmanager
def _group_norm_groups_by_width() -> Iterator[None]:
    """While transformers' pixel decoder is built: its hard-coded GroupNorm(32, width) takes
    `group_norm_groups(width)` groups (the same for widths 64, 96, ...; torch refuses 32 groups
    for a width of 16)."""
    m2f.nn = _GroupNormByWidth()
    try:
        yield
    finally:
        m2f.nn = nn


class Mask2FormerParts(m2f.Mask2FormerPreTrainedModel):
    """transformers' pixel decoder + transformer module + class predictor, initialised by
    transformers' own `_init_weights` (through `post_init`). The pixel decoder's GroupNorms use
    `group_norm_groups(width)` groups (32, as transformers, for widths 64, 96, ...)."""

    def __init__(self, config: Mask2FormerConfig, feature_channels: list[int]):
        super().__init__(config)
        with _group_norm_groups_by_width():
            self.pixel_decoder = m2f.Mask2FormerPixelDecoder(config, feature_channels=feature_channels)
        self.transformer_module = m2f.Mask2FormerTransformerModule(config.feature_size, config)
        self.class_predictor = nn.Linear(config.hidden_dim, config.num_labels + 1)
        self.post_init()

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per decoder prediction (first = the queries before any layer, last = the output):
        class logits (B, Q, K + 1) and mask logits (B, Q, h0, w0) at the first level's resolution."""
        pixels = self.pixel_decoder(features, return_dict=True)
        decoded = self.transformer_module(pixels.multi_scale_features, pixels.mask_features,
                                          output_hidden_states=True)
        classes = [self.class_predictor(h.transpose(0, 1)) for h in decoded.intermediate_hidden_states]
        return classes, list(decoded.masks_queries_logits)


def targets_from_dense(
    labels: Tensor, ignore_index: int
) -> tuple[list[Tensor], list[Tensor]]:
    """Dense labels (B, H, W) -> per image the binary masks (n_i, H, W) (float) and classes (n_i,)
    of the classes present, in increasing order. Background (0) is a class like any other; pixels
    at `ignore_index` belong to no mask; an image with no other pixel gets (0, H, W) and (0,)."""
    masks, classes = [], []
    for image in labels:
        present = torch.unique(image[image != ignore_index])
        masks.append((image[None] == present[:, None, None]).to(torch.float32))
        classes.append(present.long())
    return masks, classes


def valid_pixel_points(valid: Tensor, num_points: int) -> Tensor:
    """`num_points` random pixel centres (x, y) in [0, 1]^2 of the True pixels of each map
    (N, H, W) -> (N, num_points, 2); read them with `read_pixels`."""
    n, h, w = valid.shape
    index = torch.multinomial(valid.flatten(1).to(torch.float32), num_points, replacement=True)
    x = (index % w).to(torch.float32).add_(0.5) / w
    y = torch.div(index, w, rounding_mode="floor").to(torch.float32).add_(0.5) / h
    return torch.stack([x, y], dim=-1)


def read_pixels(maps: Tensor, points: Tensor) -> Tensor:
    """The values of `maps` (N, C, H, W) at the pixel centres `points` (N, P, 2) -> (N, C, P).
    Nearest, not bilinear: rounding puts a computed centre a few ulps off, and bilinear sampling
    would then read (and send gradient to) a neighbour with a weight of ~1e-7."""
    return m2f.sample_point(maps, points, align_corners=False, mode="nearest")


class ValidPixelMatcher(m2f.Mask2FormerHungarianMatcher):
    """transformers' Hungarian matcher; with `valid` set (B, H, W), its points are drawn from
    non-ignored pixels only, so ignored pixels never enter the matching cost."""

    valid: Tensor | None = None

    @torch.no_grad()
    def forward(self, masks_queries_logits: Tensor, class_queries_logits: Tensor, mask_labels: list[Tensor],
                class_labels: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        if self.valid is None:
            return super().forward(masks_queries_logits, class_queries_logits, mask_labels, class_labels)
        indices = []
        for i in range(masks_queries_logits.shape[0]):
            if len(class_labels[i]) == 0:
                indices.append((torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)))
                continue
            cost_class = -class_queries_logits[i].softmax(-1)[:, class_labels[i]]
            points = valid_pixel_points(self.valid[i][None], self.num_points)
            pred = masks_queries_logits[i][:, None]
            target = mask_labels[i].to(pred)[:, None]
            pred = read_pixels(pred, points.expand(len(pred), -1, -1))[:, 0]
            target = read_pixels(target, points.expand(len(target), -1, -1))[:, 0]
            cost = (self.cost_mask * m2f.pair_wise_sigmoid_cross_entropy_loss(pred, target)
                    + self.cost_class * cost_class + self.cost_dice * m2f.pair_wise_dice_loss(pred, target))
            big = torch.finfo(cost.dtype).max
            rows, cols = linear_sum_assignment(torch.nan_to_num(cost, nan=big, posinf=big, neginf=big).cpu())
            indices.append((torch.as_tensor(rows).long(), torch.as_tensor(cols).long()))
        return indices


class IgnoreAwareMask2FormerLoss(m2f.Mask2FormerLoss):
    """transformers' `Mask2FormerLoss`, unchanged when no pixel is ignored.

    With a `valid` map (B, H, W) of the non-ignored pixels, every point of the matching and of
    the mask losses is drawn at the centre of a valid pixel (importance sampling as transformers
    does it, among valid candidates), and ignored pixels belong to no target mask: they add
    nothing to the loss and get no gradient. The class loss does not read pixels.
    """

    def __init__(self, config: Mask2FormerConfig, weight_dict: dict[str, float]):
        super().__init__(config, weight_dict)
        self.matcher = ValidPixelMatcher(cost_class=config.class_weight, cost_mask=config.mask_weight,
                                         cost_dice=config.dice_weight, num_points=self.num_points)
        self.valid: Tensor | None = None

    def forward(self, masks_queries_logits: Tensor, class_queries_logits: Tensor, mask_labels: list[Tensor],
                class_labels: list[Tensor], auxiliary_predictions: list[dict[str, Tensor]] | None = None,
                valid: Tensor | None = None) -> dict[str, Tensor]:
        if valid is None:  # also the per-layer calls of the parent, which keep self.valid
            return super().forward(masks_queries_logits, class_queries_logits, mask_labels, class_labels,
                                   auxiliary_predictions)
        self.valid = self.matcher.valid = valid
        try:
            return super().forward(masks_queries_logits, class_queries_logits, mask_labels, class_labels,
                                   auxiliary_predictions)
        finally:
            self.valid = self.matcher.valid = None

    def loss_masks(self, masks_queries_logits: Tensor, mask_labels: list[Tensor], indices: Any,
                   num_masks: Any) -> dict[str, Tensor]:
        if self.valid is None:
            return super().loss_masks(masks_queries_logits, mask_labels, indices, num_masks)
        src_idx = self._get_predictions_permutation_indices(indices)
        tgt_idx = self._get_targets_permutation_indices(indices)
        pred_masks = masks_queries_logits[src_idx][:, None]
        if pred_masks.shape[0] == 0:  # nothing to match (every pixel ignored): zero, still in the graph
            zero = masks_queries_logits.sum() * 0
            return {"loss_mask": zero, "loss_dice": zero}
        target_masks = self._pad_images_to_max_in_batch(mask_labels)[0][tgt_idx][:, None]
        valid = self.valid[src_idx[0]]
        with torch.no_grad():
            candidates = valid_pixel_points(valid, int(self.num_points * self.oversample_ratio))
            candidate_logits = read_pixels(pred_masks, candidates)
            uncertainty = self.calculate_uncertainty(candidate_logits)
            num_uncertain = int(self.importance_sample_ratio * self.num_points)
            top = torch.topk(uncertainty[:, 0, :], k=num_uncertain, dim=1)[1]
            points = torch.gather(candidates, 1, top[..., None].expand(-1, -1, 2))
            if self.num_points > num_uncertain:
                rest = valid_pixel_points(valid, self.num_points - num_uncertain)
                points = torch.cat([points, rest], dim=1)
            point_labels = read_pixels(target_masks, points).squeeze(1)
        point_logits = read_pixels(pred_masks, points).squeeze(1)
        return {
            "loss_mask": m2f.sigmoid_cross_entropy_loss(point_logits, point_labels, num_masks),
            "loss_dice": m2f.dice_loss(point_logits, point_labels, num_masks),
        }


def semantic_logits(class_queries_logits: Tensor, masks_queries_logits: Tensor,
                    size: tuple[int, int]) -> Tensor:
    """Mask2Former's semantic inference as logits for nnU-Net.

    p_k = sum_q softmax(class_q)[k] * sigmoid(mask_q) (softmax over the K + 1 classes, the
    no-object class then dropped; masks upsampled bilinearly to `size` first), and logits =
    log p_k, computed in log space: logsumexp_q(log_softmax(class_q)[k] + logsigmoid(mask_q)).
    So they are finite, and exact also where p_k itself is below float32's range (every mask
    logit below about -87 at a pixel); softmax + argmax give Mask2Former's argmax_k p_k.
    Computed in float32, one class at a time (memory of one (B, Q, H, W) map).
    """
    masks = F.interpolate(masks_queries_logits.float(), size=size, mode="bilinear", align_corners=False)
    log_masks = F.logsigmoid(masks)
    log_classes = class_queries_logits.float().log_softmax(-1)[..., :-1]
    return torch.stack([torch.logsumexp(log_classes[:, :, k, None, None] + log_masks, dim=1)
                        for k in range(log_classes.shape[-1])], dim=1)


class Mask2FormerHead(nn.Module):
    """Mask2Former on the ViT levels (contract 2, owns its loss).

    Input levels: four maps at strides p/4, p/2, p, 2p (the pyramid neck, or any 1:2:4:8 strides),
    or same-stride levels (the identity neck), which the head turns into that pyramid itself with
    segframe's simple feature pyramid (ConvT x4, ConvT x2, identity, max-pool). Training forward:
    a dict with `class_queries_logits` (B, Q, K+1), `masks_queries_logits` (B, Q, H/s, W/s) with s
    = p/4, and `auxiliary_predictions` (the same per earlier decoder layer). Eval forward: dense
    logits (B, K, H_pad, W_pad) from `semantic_logits` (output_stride 1).
    """

    inputs: frozenset[str] = frozenset()

    def __init__(self, params: Any, in_channels: list[int], in_strides: list[float], num_classes: int,
                 context: HeadContext):
        super().__init__()
        if params.num_queries < num_classes:
            raise ConfigError(
                f"model.decoder.num_queries: {params.num_queries} queries cannot cover {num_classes} "
                "classes; "
                f"set num_queries to at least {num_classes}"
            )
        self.pyramid: nn.Module | None = None
        if len(set(in_strides)) == 1:
            if len(in_channels) != 4 or len(set(in_channels)) != 1:
                raise ConfigError(
                    "model.layers: mask2former builds its pyramid from 4 backbone blocks, got "
                    f"{len(in_channels)} "
                    "(set model.layers to 4 block indices, or leave it null)"
                )
            self.pyramid = FeaturePyramidNeck(in_channels[0], in_strides[0], 4)
            in_channels, in_strides = self.pyramid.out_channels, self.pyramid.out_strides
        elif len(in_strides) != 4 or [s / in_strides[0] for s in in_strides] != [1, 2, 4, 8]:
            raise ConfigError(
                "model.neck: mask2former needs 4 levels at strides 1:2:4:8 or same-stride levels, got "
                "strides "
                f"{list(in_strides)}; use neck: identity or neck: pyramid"
            )
        self.num_classes = num_classes
        self.deep_supervision = params.deep_supervision
        self.mask_stride = in_strides[0]
        self.output_stride = 1
        self.config = mask2former_config(params, num_classes)
        self.parts = Mask2FormerParts(self.config, list(in_channels))
        self.weight_dict = {"loss_cross_entropy": params.class_weight, "loss_mask": params.mask_weight,
                            "loss_dice": params.dice_weight}
        self.criterion = IgnoreAwareMask2FormerLoss(self.config, self.weight_dict)

    def predictions(self, features: list[Tensor]) -> dict[str, Any]:
        """The raw query predictions of the last decoder layer, and of the earlier ones."""
        if self.pyramid is not None:
            features = self.pyramid(features)
        classes, masks = self.parts(features)
        return {
            "class_queries_logits": classes[-1],
            "masks_queries_logits": masks[-1],
            "auxiliary_predictions": [{"class_queries_logits": c, "masks_queries_logits": m}
                                      for c, m in zip(classes[:-1], masks[:-1], strict=True)],
        }

    def forward(self, inputs: DecoderInputs) -> dict[str, Any] | Tensor:
        out = self.predictions(inputs.features)
        if self.training:
            return out
        h, w = out["masks_queries_logits"].shape[-2:]
        size = (round(h * self.mask_stride), round(w * self.mask_stride))
        return semantic_logits(out["class_queries_logits"], out["masks_queries_logits"], size)

    def training_loss(self, outputs: dict[str, Any], target: Tensor, ignore_index: int
                      ) -> tuple[Tensor, dict[str, Tensor]]:
        """Mask2Former's loss on `outputs` (a training forward) for the dense target (B, 1, H, W).

        Targets: per image one mask per class present (background included). Pixels at
        `ignore_index` (padding, nnU-Net's ignore label) are excluded (see
        `IgnoreAwareMask2FormerLoss`). Returns the weighted total and its parts, each the term
        itself: class, mask, dice of the last layer, and, with deep supervision only, `auxiliary`
        (the earlier layers' weighted terms, summed).
        """
        labels = target[:, 0]
        mask_labels, class_labels = targets_from_dense(labels, ignore_index)
        valid = labels != ignore_index
        losses = self.criterion(
            outputs["masks_queries_logits"], outputs["class_queries_logits"], mask_labels, class_labels,
            outputs["auxiliary_predictions"] if self.deep_supervision else None,
            valid=None if bool(valid.all()) else valid,
        )
        # weighted as transformers' get_loss_dict: "loss_mask_3" takes the weight of "loss_mask"
        weighted = {k: v * next(w for name, w in self.weight_dict.items() if name in k)
                    for k, v in losses.items()}
        last = {"class": "loss_cross_entropy", "mask": "loss_mask", "dice": "loss_dice"}
        parts = {name: weighted[key] for name, key in last.items()}
        earlier = [v for k, v in weighted.items() if k not in last.values()]  # "loss_mask_0", ...
        if earlier:
            parts["auxiliary"] = sum(earlier)
        return sum(weighted.values()), {k: v.detach() for k, v in parts.items()}
