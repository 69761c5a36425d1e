"""The optimizer and learning-rate schedule of `train`: AdamW with segframe's parameter groups or nnU-Net's
SGD (`train.optimizer`), and `WarmupPolyLR`, linear warmup then nnU-Net's poly decay."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LRScheduler

from segframe.config import TrainConfig
from segframe.model import ViTSegModel


def make_optimizer(model: ViTSegModel, train: TrainConfig, initial_lr: float, weight_decay: float,
                   num_epochs: int) -> tuple[torch.optim.Optimizer, LRScheduler]:
    """The optimizer and scheduler of `train` for `model` (the LR, decay and epochs as the trainer holds
    them): AdamW over `model.param_groups` (no decay on norms, biases and tokens; layer-wise LR decay and
    backbone LR scale), or with `train.optimizer: sgd` nnU-Net's SGD (momentum 0.99, nesterov, weight
    decay on every parameter)."""
    groups = model.param_groups(initial_lr, weight_decay, train.layer_decay, train.backbone_lr_scale)
    if train.optimizer == "sgd":
        for group in groups:
            group["weight_decay"] = weight_decay
        optimizer = torch.optim.SGD(groups, lr=initial_lr, weight_decay=weight_decay, momentum=0.99,
                                    nesterov=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=initial_lr, weight_decay=weight_decay)
    return optimizer, WarmupPolyLR(optimizer, initial_lr, num_epochs, train.warmup_epochs)


class WarmupPolyLR(LRScheduler):
    """Per-epoch LR: linear warmup over `warmup_epochs`, then poly decay (exponent 0.9) towards 0.

    Each parameter group gets `initial_lr * factor * group["lr_scale"]`. `step(epoch)` as
    nnU-Net's PolyLRScheduler, so `--c` restores the schedule from the epoch alone.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, max_epochs: int,
                 warmup_epochs: int, exponent: float = 0.9):
        self.initial_lr = initial_lr
        self.max_epochs = max_epochs
        self.warmup_epochs = min(warmup_epochs, max_epochs - 1) if max_epochs > 1 else 0
        self.exponent = exponent
        self.ctr = 0
        super().__init__(optimizer, -1)

    def factor(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return (epoch + 1) / (self.warmup_epochs + 1)
        span = self.max_epochs - self.warmup_epochs
        return max(0.0, 1 - (epoch - self.warmup_epochs) / span) ** self.exponent

    def step(self, current_step: int | None = None) -> None:
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        f = self.factor(current_step)
        for group in self.optimizer.param_groups:
            group["lr"] = self.initial_lr * f * group.get("lr_scale", 1.0)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
