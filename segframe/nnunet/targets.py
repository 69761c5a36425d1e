"""Targets made in nnU-Net's augmentation workers: the tubed skeleton `train.loss.skeleton_recall` scores."""

from __future__ import annotations

import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform

from segframe.losses import tubed_skeleton


class SkeletonTargetTransform(BasicTransform):
    """Appends the tubed skeleton of the target (segframe.losses.tubed_skeleton) as a second segmentation
    channel, in the augmentation workers, for train.loss.skeleton_recall; train_step splits it off again."""

    def __init__(self, ignore_label: int | None):
        super().__init__()
        self.ignore_label = ignore_label

    def apply(self, data_dict: dict, **params) -> dict:
        segmentation = data_dict["segmentation"]
        skeleton = torch.from_numpy(tubed_skeleton(segmentation[0].numpy(), self.ignore_label))
        data_dict["segmentation"] = torch.cat((segmentation, skeleton[None].to(segmentation.dtype)))
        return data_dict
