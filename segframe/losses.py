"""Skeleton Recall (Kirchhoff et al., ECCV 2024), a thin-structure loss term added to nnU-Net's Dice + CE
for heads trained on dense logits (`train.loss.skeleton_recall`, docs/detail.md).

The logic is MIC-DKFZ's (`SkeletonTransform`, `SoftSkeletonRecallLoss` of their nnU-Net trainer
nnUNetTrainerSkeletonRecall): the target's skeleton, dilated to a tube, is computed once per training
sample in the data pipeline (`tubed_skeleton`, run by a training transform in the augmentation workers),
and the loss is minus the soft recall of that tube by the predicted probabilities.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def tubed_skeleton(seg: np.ndarray, ignore_label: int | None = None) -> np.ndarray:
    """The skeleton (scikit-image `skeletonize`) of a label map's foreground, dilated twice with the 3x3 cross
    (a tube about 5 px wide), each tube pixel carrying the class under it (0 elsewhere, and on background):
    with several classes, one tube per class, as MIC-DKFZ's SkeletonTransform labels the skeleton of the
    binarised foreground.

    Pixels of `ignore_label` are neither foreground nor in any tube (0). Works for 2D and 3D label maps.
    """
    from skimage.morphology import dilation, skeletonize

    foreground = seg > 0
    if ignore_label is not None:
        foreground &= seg != ignore_label
    if not foreground.any():
        return np.zeros(seg.shape, np.int16)
    tube = dilation(dilation(skeletonize(foreground).astype(np.int16)))
    return np.where(foreground, tube * seg, 0).astype(np.int16)


class SkeletonRecallLoss(nn.Module):
    """Minus the soft recall of the tubed skeleton, averaged over the foreground classes (and over the
    images unless `batch_dice`): for class c, (sum p_c [skel = c] + smooth) / (sum [skel = c] + smooth), with
    p the softmax of the logits. Pixels outside `mask` (the ignore label) do not count."""

    def __init__(self, batch_dice: bool = False, smooth: float = 1e-5, ddp: bool = False):
        super().__init__()
        self.batch_dice, self.smooth, self.ddp = batch_dice, smooth, ddp

    def forward(self, logits: torch.Tensor, skeleton: torch.Tensor, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """`logits` (B, K, *spatial), `skeleton` (B, 1, *spatial) labels from `tubed_skeleton`, `mask`
        (B, 1, *spatial) true where the pixel counts (a skeleton from `tubed_skeleton` is already 0 on
        ignored pixels)."""
        probs = torch.softmax(logits.float(), 1)[:, 1:]
        axes = tuple(range(2, logits.ndim))
        with torch.no_grad():
            skeleton = skeleton[:, 0].long()
            if mask is not None:
                skeleton = torch.where(mask[:, 0].bool(), skeleton, 0)
            tube = F.one_hot(skeleton, logits.shape[1]).movedim(-1, 1)[:, 1:].to(probs.dtype)
            total = tube.sum(axes)
        covered = (probs * tube).sum(axes)
        if self.batch_dice:
            if self.ddp:  # the sums of every rank, with gradients (nnU-Net's AllGatherGrad does the same)
                from torch.distributed.nn.functional import all_gather

                covered, total = torch.cat(all_gather(covered)), torch.cat(all_gather(total))
            covered, total = covered.sum(0), total.sum(0)
        recall = (covered + self.smooth) / torch.clip(total + self.smooth, 1e-8)
        return -recall.mean()
