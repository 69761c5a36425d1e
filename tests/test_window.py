"""SegframePredictor's CPU sliding window against nnU-Net's own: the same logits, no producer thread; the
final validation's ValidationPredictor: the same logits, in shared memory."""

from __future__ import annotations

import contextlib
import io
from types import SimpleNamespace

import nnunetv2.inference.predict_from_raw_data as nnunet_predict
import pytest
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from segframe.nnunet.window import SegframePredictor, ValidationPredictor


def predictor(cls: type, mirroring: bool, gaussian: bool) -> nnUNetPredictor:
    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net says it turned off perform_everything_on_device
        made = cls(tile_step_size=0.5, use_gaussian=gaussian, use_mirroring=mirroring,
                   perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    torch.manual_seed(0)
    made.network = torch.nn.Sequential(torch.nn.Conv2d(2, 8, 3, padding=1), torch.nn.ReLU(),
                                       torch.nn.Conv2d(8, 3, 3, padding=1))
    made.configuration_manager = SimpleNamespace(patch_size=[16, 24])
    made.label_manager = SimpleNamespace(num_segmentation_heads=3)
    made.allowed_mirroring_axes = (0, 1)
    return made


@pytest.mark.parametrize(("mirroring", "gaussian"), [(True, True), (False, False)])
def test_cpu_window_equals_nnunets_and_starts_no_thread(monkeypatch, mirroring, gaussian):
    image = torch.randn(2, 2, 37, 50) * 3  # (C, slices, H, W): nnU-Net's 2D layout, two slices
    reference = predictor(nnUNetPredictor, mirroring, gaussian).predict_sliding_window_return_logits(image)

    def no_thread(*args, **kwargs):
        raise AssertionError("a producer thread was started")

    monkeypatch.setattr(nnunet_predict, "Thread", no_thread)
    logits = predictor(SegframePredictor, mirroring, gaussian).predict_sliding_window_return_logits(image)
    assert logits.dtype == reference.dtype == torch.half and logits.shape == (3, 2, 37, 50)
    assert torch.equal(logits, reference)
    with pytest.raises(AssertionError, match="producer thread"):  # nnU-Net's own window does start one
        predictor(nnUNetPredictor, mirroring, gaussian).predict_sliding_window_return_logits(image)


def test_validation_logits_equal_nnunets_in_shared_memory():
    """nnU-Net's final validation pickles each image's logits to its export pool; already in shared memory,
    they are sent without a copy in the pool's thread. `segframe predict` (numpy to the pool) is unchanged."""
    image = torch.randn(2, 2, 37, 50) * 3
    reference = predictor(nnUNetPredictor, True, True).predict_sliding_window_return_logits(image)
    logits = predictor(ValidationPredictor, True, True).predict_sliding_window_return_logits(image)
    assert torch.equal(logits, reference) and logits.is_shared()
    assert not reference.is_shared()
    plain = predictor(SegframePredictor, True, True).predict_sliding_window_return_logits(image)
    assert not plain.is_shared()
