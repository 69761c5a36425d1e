"""Several classes with nnU-Net's ignore label, and nnU-Net's regions: a moment of real nnU-Net training
(1 epoch, 2 iterations, tiny backbone) for every installed head and for the detail path with Skeleton
Recall, on the small artery/vein world of tests/nnunet_multiclass.py, each results folder then predicting
the class ids; the trainer's loss unchanged by logits at ignored pixels; the Skeleton Recall target and
loss per class with an ignore label by hand; a region run for a dense head and Mask2Former's refusal.

The runs train in this process (nnU-Net's trainer and data loading, no final validation: the
command-line runs of tests/test_heads_nnunet.py and test_nnunet.py cover that), sharing one planned world.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from nnunet_discs import segframe, write_yaml
from nnunet_multiclass import CLASSES, IGNORE, NAMES, REGIONS, TEST, multiclass_env
from test_heads import section

from segframe.config import validate_config
from segframe.losses import SkeletonRecallLoss, tubed_skeleton
from segframe.nnunet import EXT_TRAINER_DIR
from segframe.nnunet.plans import write_plans
from segframe.nnunet.trainer import nnUNetTrainerSegframe
from segframe.plugins import get_registry

MOMENT = {"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1,
          "batch_size": 2, "patch_size": [42, 42], "warmup_epochs": 0, "seed": 0}
DECODERS = list(get_registry().decoders())
# the detail path, Skeleton Recall and UperNet's auxiliary head in one run
DETAIL = {"decoder": {"name": "upernet", "hidden_size": 32, "auxiliary_head": True, "auxiliary_channels": 16},
          "model": {"detail": {"enabled": True}}, "train": {"loss": {"skeleton_recall": 0.5}}}


def config(decoder: dict, model: dict | None = None, train: dict | None = None) -> dict:
    return {"model": {"backbone": "dinov2", "backbone_size": "tiny", "decoder": decoder, **(model or {})},
            "train": {**MOMENT, **(train or {})}}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Both datasets planned once; this process sees their nnU-Net folders while the module runs."""
    env = multiclass_env(tmp_path_factory.mktemp("multiclass"))
    with pytest.MonkeyPatch.context() as patch:
        for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_n_proc_DA",
                    "nnUNet_compile"):
            patch.setenv(var, env[var])
        patch.setenv("nnUNet_extTrainer", str(EXT_TRAINER_DIR))
        yield env


def trainer_for(world: dict, dataset: int, tag: str, cfg: dict) -> nnUNetTrainerSegframe:
    """nnU-Net's trainer of `cfg` on fold 0 of `dataset` (plans nnUNetPlans_segframe_<tag>), not started."""
    dataset_dir = Path(world["nnUNet_preprocessed"], NAMES[dataset])
    name, _ = write_plans(dataset_dir, "nnUNetPlans", "2d", validate_config(cfg), tag)
    plans = {**json.loads((dataset_dir / f"{name}.json").read_text()), "continue_training": False}
    dataset_json = json.loads((dataset_dir / "dataset.json").read_text())
    return nnUNetTrainerSegframe(plans, "2d", 0, dataset_json, device=torch.device("cpu"))


def train_and_predict(world: dict, dataset: int, tag: str, cfg: dict):
    """A moment of training, then the results folder's prediction of the test images through segframe's
    Predictor (nnU-Net's): the trainer, and per image (labels (H, W), probabilities (K, H, W))."""
    from segframe.nnunet.predict import Predictor

    trainer = trainer_for(world, dataset, tag, cfg)
    trainer.run_training()
    predictor = Predictor.from_results(trainer.output_folder_base, device="cpu", mirroring=False,
                                       notify=lambda _: None)
    images = Path(world["nnUNet_raw"], NAMES[dataset], "imagesTs")
    return trainer, [predictor.predict(images / f"ts_{i:03d}_0000.png", probabilities=True)
                     for i in range(TEST)]


@pytest.fixture(scope="module")
def detail_run(world):
    return train_and_predict(world, CLASSES, "detail", config(**DETAIL))


@pytest.mark.parametrize("decoder", DECODERS)
def test_every_head_trains_on_classes_with_the_ignore_label_and_predicts_them(world, decoder):
    _, predictions = train_and_predict(world, CLASSES, decoder, config(section(decoder)))
    for labels, probabilities in predictions:
        assert labels.shape == (64, 64) and set(np.unique(labels)) <= {0, 1, 2, 3}  # never the ignore label
        assert probabilities.shape == (4, 64, 64)  # background, artery, vein, crossing
        assert np.allclose(probabilities.sum(0), 1, atol=1e-3)
        assert np.array_equal(labels, probabilities.argmax(0))


def test_the_detail_path_with_skeleton_recall_trains_on_classes(detail_run):
    trainer, predictions = detail_run
    assert trainer.model.detail is not None and trainer.skeleton_recall is not None
    for labels, probabilities in predictions:
        assert probabilities.shape == (4, 64, 64) and set(np.unique(labels)) <= {0, 1, 2, 3}


def batch_target() -> torch.Tensor:
    """(2, 1, 42, 42): an artery bar, a vein bar, their crossing, and an ignored square on each image."""
    target = torch.zeros(2, 1, 42, 42)
    target[:, 0, 10:15] = 1
    target[:, 0, :, 20:24] = 2
    target[:, 0, 10:15, 20:24] = 3
    target[0, 0, 30:40, 5:15] = IGNORE
    target[1, 0, 8:17, 26:34] = IGNORE  # over the end of the artery bar
    return target


def test_logits_at_ignored_pixels_change_nothing_in_the_trainers_loss(detail_run):
    """Dice + CE + auxiliary head + Skeleton Recall (the skeleton as the target's second channel)."""
    trainer = detail_run[0]
    target = batch_target()
    skeleton = torch.stack([torch.from_numpy(tubed_skeleton(t[0].numpy(), IGNORE)) for t in target])[:, None]
    full = torch.cat([target, skeleton.float()], 1)
    ignored = (target == IGNORE).expand(-1, 4, -1, -1)
    torch.manual_seed(0)
    logits, aux = torch.randn(2, 4, 42, 42), torch.randn(2, 4, 42, 42)

    def loss_of(logits: torch.Tensor, aux: torch.Tensor) -> tuple[float, torch.Tensor]:
        logits = logits.clone().requires_grad_()
        loss = trainer.compute_loss((logits, aux), full)
        loss.backward()
        return loss.item(), logits.grad

    base, grad = loss_of(logits, aux)
    noise = 20 * torch.randn_like(logits)
    assert loss_of(torch.where(ignored, logits + noise, logits), torch.where(ignored, aux + noise, aux))[0] \
        == pytest.approx(base, abs=1e-6)
    assert grad[ignored].abs().max() == 0
    valid = torch.zeros_like(ignored)
    valid[:, :, 12, 2] = True  # an artery pixel: the same change there does count
    assert abs(loss_of(torch.where(valid, logits + noise, logits), aux)[0] - base) > 1e-4


def manhattan_tube(skeleton: np.ndarray, radius: int = 2) -> np.ndarray:
    """Pixels within Manhattan distance `radius` of a skeleton pixel (what two dilations with the 3x3 cross
    reach), computed pixel by pixel."""
    points = np.argwhere(skeleton)
    yy, xx = np.mgrid[:skeleton.shape[0], :skeleton.shape[1]]
    distance = np.min(np.abs(yy[..., None] - points[:, 0]) + np.abs(xx[..., None] - points[:, 1]), axis=-1)
    return distance <= radius


def test_skeleton_recall_per_class_with_the_ignore_label_by_hand():
    """MIC-DKFZ's Skeleton Recall: the skeleton of the binarised foreground (skimage), tubed, labelled with
    each pixel's class; the loss is minus the mean over the foreground classes of the soft recall of the
    class's tube. Ignored pixels are outside every tube, and their probabilities do not count."""
    from skimage.morphology import skeletonize

    seg = np.zeros((11, 23), np.int16)
    seg[4:7, 1:10], seg[4:7, 10:13], seg[4:7, 13:22] = 1, IGNORE, 2  # artery, uncertain, vein
    foreground = (seg == 1) | (seg == 2)
    expected = np.where(manhattan_tube(skeletonize(foreground)) & foreground, seg, 0)
    tube = tubed_skeleton(seg, IGNORE)
    assert np.array_equal(tube, expected)
    assert (tube[4:7, 1:10] == 1).sum() == 26 and (tube[4:7, 13:22] == 2).sum() == 26  # one tube per class
    assert not tube[seg == IGNORE].any()  # the artery's tube reaches column 10, which is ignored

    # softmax (0.1, 0.6, 0.2, 0.1) on the artery half, (0.1, 0.3, 0.5, 0.1) elsewhere, any on ignored pixels
    probs = torch.tensor([0.1, 0.3, 0.5, 0.1]).view(4, 1, 1).repeat(1, 11, 23)
    probs[:, :, :10] = torch.tensor([0.1, 0.6, 0.2, 0.1]).view(4, 1, 1)
    logits = probs.log()[None]
    noisy = torch.where(torch.from_numpy(seg == IGNORE), logits + 5 * torch.randn_like(logits), logits)
    skeleton = torch.from_numpy(tube)[None, None]
    mask = torch.from_numpy(seg != IGNORE)[None, None]
    # class 1: 0.6 on all its 26 tube pixels; class 2: 0.5 on its 26; class 3 (crossing) has no tube, its
    # recall is (0 + smooth) / (0 + smooth) = 1 as in the reference
    by_hand = -(0.6 + 0.5 + 1) / 3
    for candidate in (logits.double(), noisy.double()):
        for masked in (mask, None):
            assert SkeletonRecallLoss()(candidate, skeleton, masked).item() == pytest.approx(by_hand, 1e-5)


def test_regions_train_a_dense_head_and_predict_class_ids(world):
    """UperNet with the detail path on regions: Dice + BCE, one sigmoid output per region."""
    cfg = config(section("upernet"), {"detail": {"enabled": True}})
    trainer, predictions = train_and_predict(world, REGIONS, "regions", cfg)
    assert trainer.label_manager.has_regions and trainer.model.num_classes == 3  # artery, vein, crossing
    assert trainer.model.detail is not None and type(trainer.loss).__name__ == "DC_and_BCE_loss"
    for labels, probabilities in predictions:
        assert probabilities.shape == (3, 64, 64)  # one sigmoid per region
        assert ((probabilities >= 0) & (probabilities <= 1)).all()
        by_hand = np.zeros((64, 64), np.uint8)  # regions_class_order [1, 2, 3]: later regions win
        for region, label in enumerate([1, 2, 3]):
            by_hand[probabilities[region] > 0.5] = label
        assert np.array_equal(labels, by_hand)


def test_mask2former_refuses_regions_at_training_start(world, tmp_path):
    """As a user runs it: `segframe train` ends in one line saying what to do, and no traceback."""
    yaml_file = write_yaml(tmp_path / "m2f.yaml", config(section("mask2former")))
    done = segframe(world, "train", REGIONS, "2d", "0", "--config", yaml_file, "-device", "cpu", check=False)
    assert done.returncode != 0 and "Traceback" not in done.stderr + done.stdout
    assert done.stderr.strip().splitlines() == [
        "segframe train: error: decoder 'mask2former' cannot train on regions: it owns its training loss, "
        "which gives each pixel one class, while this dataset's regions overlap (sigmoid outputs); convert "
        "the dataset with class labels (e.g. the crossing as its own class) or choose a dense head such as "
        "upernet"]
