"""What makes a training run trustworthy, mixed into nnUNetTrainerSegframe: a NaN/inf step is skipped (its
gradients dropped, running statistics restored) and a run stops after `train.max_nonfinite_steps` of them in a
row; a run whose validation logits nnU-Net's window could not sum stops before it saves them; checkpoints
are written atomically, never with NaN/inf weights, and loaded weights-only (TRUST_ENV=1 allows full
unpickling) with a readable fallback for `--c`, the best EMA Dice kept over `--c`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from segframe.errors import CheckpointError, SegframeError
from segframe.nnunet.checkpoints import (
    NAMES,
    TRUST_ENV,
    atomic_save,
    check_trainer,
    check_weights_fit,
    load_checkpoint_file,
    nonfinite_tensors,
    readable_checkpoint,
)

__all__ = ["LOGIT_LIMIT", "TRUST_ENV", "NonFiniteTraining", "SafeTraining", "better"]


class NonFiniteTraining(SegframeError):
    """The loss or the weights became NaN/inf and stayed so: the run is stopped before it saves them."""


# The largest |logit| a network may give and still be predicted: nnU-Net's sliding window (and so the final
# validation and `segframe predict`) sums Gaussian-weighted logits in float16 (largest value 65504), with
# weights up to 10 from up to 4 tiles over a pixel at its step of 0.5. A trained network's logits are tens.
LOGIT_LIMIT = 65504 / 40


def better(value, best) -> bool:
    """Whether an EMA pseudo Dice beats the best so far (NaN never does; a NaN or missing best loses)."""
    if value is None or not np.isfinite(value):
        return False
    return best is None or not np.isfinite(best) or value > best


class SafeTraining:
    """The guards above as nnUNetTrainer methods (a mixin: `class T(SafeTraining, nnUNetTrainer)`)."""

    def _all_finite(self, value: torch.Tensor) -> bool:
        """Whether `value` is finite on every DDP rank (all ranks must skip the same steps)."""
        finite = torch.isfinite(value.detach()).all().to(torch.int32).reshape(1)
        if self.is_ddp:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item())

    def _skip_step(self, what: str, buffers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Undo a NaN/inf step (gradients dropped, running statistics restored) and count it; stop the run
        after `train.max_nonfinite_steps` in a row."""
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        self.nonfinite_in_a_row += 1
        limit = self.segframe_config.train.max_nonfinite_steps
        self.print_to_log_file(
            f"epoch {self.current_epoch} iteration {self.iteration}: {what}; step skipped, weights unchanged "
            f"({self.nonfinite_in_a_row} in a row, the limit is train.max_nonfinite_steps={limit})")
        if self.nonfinite_in_a_row >= limit:
            raise NonFiniteTraining(
                f"training stopped at epoch {self.current_epoch} iteration {self.iteration}: {limit} steps "
                f"in a row had a NaN/inf loss or gradient (the weights were not updated by them and no "
                f"non-finite checkpoint was written; see {self.log_file}). {self._usual_fixes()}")

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        if getattr(self, "_logit_hook", None) is None:
            self._logit_hook = self.model.register_forward_hook(self._watch_logits)
        self.largest_logit = 0.0

    def _watch_logits(self, module: nn.Module, inputs, output) -> None:
        """Forward hook: the largest |logit| of the evaluation forwards (NaN counts as inf)."""
        if not module.training and torch.is_tensor(output):
            largest = torch.nan_to_num(output.detach().abs().amax().float(), nan=float("inf"))
            self.largest_logit = max(getattr(self, "largest_logit", 0.0), float(largest))

    def _check_predictable(self) -> None:
        """Stop the run before it saves weights whose validation logits nnU-Net's window cannot sum."""
        largest = torch.tensor([getattr(self, "largest_logit", 0.0)], device=self.device)
        if self.is_ddp:
            dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        if largest.item() <= LOGIT_LIMIT:
            return
        raise NonFiniteTraining(
            f"training stopped at epoch {self.current_epoch}: the weights diverged (validation logits up to "
            f"{largest.item():.3g}; above {LOGIT_LIMIT:.0f} nnU-Net's sliding window overflows float16, so "
            f"they could not predict) and were not saved; see {self.log_file}. {self._usual_fixes()}")

    def _usual_fixes(self) -> str:
        return (f"Usual fixes: a lower train.initial_lr (now {self.initial_lr}), train.precision: bf16 or "
                f"fp32 instead of fp16 (now {self.precision}), a smaller train.gradient_clip (now "
                f"{self.segframe_config.train.gradient_clip})")

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint dict, written atomically; NaN/inf weights are never written."""
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        weights = self.model.state_dict()
        bad = nonfinite_tensors(weights)
        if bad:
            raise NonFiniteTraining(
                f"not writing {os.path.basename(filename)}: {len(bad)} weight tensors hold NaN/inf (e.g. "
                f"{bad[0]}). Usual fixes: a lower train.initial_lr, train.precision: bf16 or fp32, a smaller "
                "train.gradient_clip")
        checkpoint = {
            "network_weights": weights,
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
        }
        atomic_save(checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        """nnU-Net's, loading weights-only (TRUST_ENV=1 allows full unpickling), with one-line errors.

        When continuing (`--c`) and the file is unreadable, the newest readable checkpoint beside it is
        used and named in the log; `_best_ema` is the best of the checkpoint's and checkpoint_best's.
        """
        if not self.was_initialized:
            self.initialize()
        if isinstance(filename_or_checkpoint, dict):
            path, checkpoint = Path("<checkpoint dict>"), filename_or_checkpoint
        else:
            requested = Path(filename_or_checkpoint)
            path, checkpoint, note = readable_checkpoint(
                requested.parent, requested.name, self.trust_checkpoint, fallback=self.continue_training)
            if note:
                self.print_to_log_file(f"WARNING: {note}")
        check_trainer(checkpoint, path)
        weights = checkpoint["network_weights"]
        model = self.model
        check_weights_fit(weights, model.state_dict(), path)
        weights = {k[7:] if k.startswith("module.") and k[7:] in model.state_dict() else k: v
                   for k, v in weights.items()}
        try:
            self.my_init_kwargs = checkpoint["init_args"]
            self.current_epoch = checkpoint["current_epoch"]
            self.logger.load_checkpoint(checkpoint["logging"])
            self._best_ema = checkpoint["_best_ema"]
            self.inference_allowed_mirroring_axes = checkpoint.get(
                "inference_allowed_mirroring_axes", self.inference_allowed_mirroring_axes)
            model.load_state_dict(weights)
            self.optimizer.load_state_dict(checkpoint["optimizer_state"])
            if self.grad_scaler is not None and checkpoint.get("grad_scaler_state") is not None:
                self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(
                f"cannot continue from {path}: {type(exc).__name__}: {str(exc)[:500]}. It was written by a "
                "different model or nnU-Net version; the file is left as it is") from None
        if self.continue_training:
            self._best_ema = self._stored_best_ema(path.parent, self._best_ema)

    def _stored_best_ema(self, fold_dir: Path, best):
        """The higher of `best` and checkpoint_best.pth's `_best_ema` (read without its tensors)."""
        if not (fold_dir / NAMES[2]).is_file():
            return best
        try:
            stored = load_checkpoint_file(fold_dir / NAMES[2], self.trust_checkpoint, mmap=True)["_best_ema"]
        except CheckpointError:
            return best
        if better(stored, best):
            self.print_to_log_file(f"best EMA pseudo Dice {float(stored):.4f} from {NAMES[2]}")
            return stored
        return best
