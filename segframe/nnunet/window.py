"""nnU-Net's predictor with its sliding window run in the predicting thread when it predicts on the CPU.

nnU-Net cuts each tile in a producer thread so that copies to the GPU overlap the network. On the CPU
there is no copy to overlap, and the producer's tile copies start a second OpenMP team that competes
with the network's for the cores, a ViT in bf16 most (docs/nnunet.md, "nnU-Net's threads and pools on
the CPU"; `benchmarks/window.py` times both windows, BENCHMARKS.md has its table).
`SegframePredictor` keeps nnU-Net's window everywhere else and, on the CPU, runs the same tiles,
Gaussian weights and half-precision sums in one thread, so its logits equal nnU-Net's.
`ValidationPredictor` is the one nnU-Net's final validation builds (trainer.py): the same window, and
on the CPU its logits are returned in shared memory (see the class).
"""

from __future__ import annotations

import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from tqdm import tqdm


class SegframePredictor(nnUNetPredictor):
    """`nnUNetPredictor` whose CPU sliding window needs no producer thread (see the module's docstring)."""

    @torch.inference_mode()
    def _internal_predict_sliding_window_return_logits(self, data: torch.Tensor, slicers,
                                                       do_on_device: bool = True) -> torch.Tensor:
        if self.device.type != "cpu":
            return super()._internal_predict_sliding_window_return_logits(data, slicers, do_on_device)
        logits = torch.zeros((self.label_manager.num_segmentation_heads, *data.shape[1:]), dtype=torch.half)
        counts = torch.zeros(data.shape[1:], dtype=torch.half)
        gaussian = compute_gaussian(tuple(self.configuration_manager.patch_size), sigma_scale=1. / 8,
                                    value_scaling_factor=10, device=data.device) if self.use_gaussian else 1
        for sl in tqdm(slicers, disable=not self.allow_tqdm):
            tile = torch.clone(data[sl][None], memory_format=torch.contiguous_format)
            prediction = self._internal_maybe_mirror_and_predict(tile)[0]
            if self.use_gaussian:
                prediction *= gaussian
            logits[sl] += prediction
            counts[sl[1:]] += gaussian
        torch.div(logits, counts, out=logits)
        if torch.any(torch.isinf(logits)):
            raise RuntimeError("the sliding window's summed logits overflow float16 (inf); nnU-Net sums them "
                               "in float16 as well: check the network's outputs for very large values")
        return logits


class ValidationPredictor(SegframePredictor):
    """`SegframePredictor` for nnU-Net's final validation, which hands each image's logits, a torch tensor,
    to its spawned export pool. Pickling moves a tensor to shared memory, a copy that ran in the pool's
    task thread: a second OpenMP team in a thread that lives as long as the pool, which slows the
    network's forwards on the next images (docs/nnunet.md; measured by `benchmarks/window.py`'s second
    table in BENCHMARKS.md). On the CPU the logits are
    moved here, in the predicting thread, and the pool sends them without a copy."""

    def predict_sliding_window_return_logits(self, input_image: torch.Tensor) -> torch.Tensor:
        logits = super().predict_sliding_window_return_logits(input_image)
        return logits.share_memory_() if logits.device.type == "cpu" else logits
