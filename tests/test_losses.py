"""train.loss.skeleton_recall: the tubed skeleton target and the Skeleton Recall loss against hand
computations on small masks, the training transform that carries the skeleton, the config key, and the
refusals where the term cannot apply."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import tiny_config

from segframe.config import validate_config
from segframe.errors import ConfigError
from segframe.losses import SkeletonRecallLoss, tubed_skeleton
from segframe.nnunet.targets import SkeletonTargetTransform
from segframe.nnunet.trainer import nnUNetTrainerSegframe


def bar(label: int = 1) -> np.ndarray:
    """A 7 px thick horizontal bar (rows 2-8, columns 2-16) in a 11x19 label map."""
    seg = np.zeros((11, 19), np.int16)
    seg[2:9, 2:17] = label
    return seg


def test_tubed_skeleton_of_a_bar_by_hand():
    tube = tubed_skeleton(bar(2))
    # away from the ends the skeleton is the middle row 5; two dilations with the 3x3 cross widen it to
    # rows 3-7, each pixel carrying the bar's label; rows 2 and 8 stay outside the tube
    for column in range(6, 13):
        assert tube[:, column].tolist() == [0, 0, 0, 2, 2, 2, 2, 2, 0, 0, 0]
    assert not tube[bar(2) == 0].any()  # never outside the foreground
    assert tube.dtype == np.int16


def test_tubed_skeleton_labels_ignore_and_empty():
    seg = bar(1)
    seg[2:9, 10:17] = 2  # the right part is class 2
    tube = tubed_skeleton(seg)
    assert tube[5, 5] == 1 and tube[5, 13] == 2
    ignored = bar(1)
    ignored[:, 10:] = np.where(ignored[:, 10:] > 0, 3, 0)  # the right half is ignore label 3
    tube = tubed_skeleton(ignored, ignore_label=3)
    assert tube[5, 5] == 1 and not (tube[:, 12:] == 1).any()  # no skeleton inside the ignored part
    assert not tubed_skeleton(np.zeros((5, 5), np.int16)).any()
    assert not tubed_skeleton(np.full((5, 5), 3, np.int16), ignore_label=3).any()


def logits_for(p_foreground: list[list[float]]) -> torch.Tensor:
    """Two-class logits (1, 2, H, W) whose softmax gives foreground probability p."""
    p = torch.tensor(p_foreground, dtype=torch.float64)
    return torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))])[None]


def test_skeleton_recall_by_hand():
    logits = logits_for([[0.75, 0.75, 0.25], [0.5, 0.9, 0.1]]).requires_grad_()
    skeleton = torch.tensor([[[[1, 1, 1], [0, 0, 0]]]])
    loss = SkeletonRecallLoss(smooth=0)(logits, skeleton)
    # the tube is the top row: recall = (0.75 + 0.75 + 0.25) / 3
    assert loss.item() == pytest.approx(-1.75 / 3, abs=1e-6)
    loss.backward()
    assert logits.grad[0, :, 1].abs().max() == 0  # pixels off the tube get no gradient
    assert logits.grad[0, 1, 0].lt(0).all()  # raising the foreground logit on the tube lowers the loss

    smoothed = SkeletonRecallLoss(smooth=1.0)(logits, skeleton)
    assert smoothed.item() == pytest.approx(-(1.75 + 1) / (3 + 1), abs=1e-6)
    mask = torch.tensor([[[[True, True, False], [True, True, True]]]])
    masked = SkeletonRecallLoss(smooth=0)(logits, skeleton, mask)
    assert masked.item() == pytest.approx(-1.5 / 2, abs=1e-6)  # the masked 0.25 pixel does not count


def test_skeleton_recall_per_image_batch_and_classes_by_hand():
    logits = torch.cat([logits_for([[0.8, 0.6]]), logits_for([[0.2, 0.5]])])
    skeleton = torch.tensor([[[[1, 1]]], [[[1, 0]]]])
    per_image = SkeletonRecallLoss(smooth=0)(logits, skeleton)
    assert per_image.item() == pytest.approx(-((0.8 + 0.6) / 2 + 0.2 / 1) / 2, abs=1e-6)
    batch = SkeletonRecallLoss(batch_dice=True, smooth=0)(logits, skeleton)
    assert batch.item() == pytest.approx(-(0.8 + 0.6 + 0.2) / 3, abs=1e-6)

    # three classes, logits 0 and ln 2, ln 3: softmax (1, 2, 3) / 6 at every pixel
    three = torch.log(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).view(1, 3, 1, 1).expand(1, 3, 1, 3)
    skeleton = torch.tensor([[[[1, 2, 2]]]])
    loss = SkeletonRecallLoss(smooth=0)(three, skeleton)
    assert loss.item() == pytest.approx(-(2 / 6 + 3 / 6) / 2, abs=1e-6)  # mean over classes 1 and 2
    assert math.isfinite(SkeletonRecallLoss()(three, torch.zeros(1, 1, 1, 3, dtype=torch.long)).item())


def test_the_training_transform_adds_the_skeleton_channel():
    seg, image = torch.from_numpy(bar(1))[None], torch.rand(3, 11, 19)
    out = SkeletonTargetTransform(ignore_label=None)(image=image.clone(), segmentation=seg.clone())
    assert torch.equal(out["image"], image)  # the image passes unchanged
    assert out["segmentation"].shape == (2, 11, 19) and out["segmentation"].dtype == seg.dtype
    assert torch.equal(out["segmentation"][0], seg[0])
    assert np.array_equal(out["segmentation"][1].numpy(), tubed_skeleton(bar(1)))


def test_loss_config_validation():
    assert validate_config(tiny_config()).train.loss.skeleton_recall == 0  # off by default
    on = validate_config({**tiny_config(), "train": {"loss": {"skeleton_recall": 1}}})
    assert on.train.loss.skeleton_recall == 1
    with pytest.raises(ConfigError, match=r"train\.loss\.skeleton_recall: Input should be greater than or"):
        validate_config({**tiny_config(), "train": {"loss": {"skeleton_recall": -1}}})
    with pytest.raises(ConfigError, match=r"train\.loss\.dice: unknown key"):
        validate_config({**tiny_config(), "train": {"loss": {"dice": 1}}})


def _trainer(decoder: str, owns_loss: bool, has_regions: bool = False) -> SimpleNamespace:
    cfg = validate_config({**tiny_config(decoder=decoder), "train": {"loss": {"skeleton_recall": 1.0}}})
    return SimpleNamespace(segframe_config=cfg, model=SimpleNamespace(owns_loss=owns_loss),
                           label_manager=SimpleNamespace(has_regions=has_regions))


def test_refused_for_a_head_that_owns_its_loss_and_for_regions():
    with pytest.raises(ConfigError, match=r"train\.loss\.skeleton_recall: 1\.0 cannot apply to decoder "
                                          r"'mask2former': it owns its training loss"):
        nnUNetTrainerSegframe._build_loss(_trainer("mask2former", owns_loss=True))
    with pytest.raises(ConfigError, match=r"needs one label per pixel.*regions"):
        nnUNetTrainerSegframe._build_loss(_trainer("segformer", owns_loss=False, has_regions=True))
