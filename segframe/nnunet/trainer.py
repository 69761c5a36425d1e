"""nnUNetTrainerSegframe: nnU-Net's trainer with a ViTSegModel built from the config in the plans.

Only what a ViT needs changes: the network (from the plans configuration's `segframe`
section, so inference rebuilds it with no YAML), deep supervision off, AdamW with parameter
groups (no decay on norms, biases and tokens; optional layer-wise LR decay and backbone LR
scale), linear warmup then poly decay, the config's gradient clip, epochs and iterations,
and the auxiliary-head loss. Data, augmentation, validation, checkpoints and export stay
nnU-Net's. Pretrained backbone weights load when training starts, never at inference.
"""

from __future__ import annotations

import os
import tempfile

import torch
import yaml
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn
from torch._dynamo import OptimizedModule
from torch.optim.lr_scheduler import LRScheduler

from segframe.errors import CheckpointError
from segframe.lora import format_counts
from segframe.model import ViTSegModel
from segframe.nnunet.plans import config_from_configuration

# nnU-Net's per-channel normalisation that leaves RGB in [0, 1], as the backbones were pretrained
RGB_01 = "RGBTo01Normalization"


def intensity_warning(normalization_schemes: list[str], normalize: str) -> str | None:
    """A warning when nnU-Net's channel normalisation and `model.normalize` do not fit together."""
    all_rgb = all(s == RGB_01 for s in normalization_schemes)
    if normalize == "backbone" and not all_rgb:
        return (
            f"nnU-Net normalises the channels with {', '.join(normalization_schemes)} (not 0-1 RGB), but "
            "model.normalize: backbone applies the backbone's ImageNet-style mean/std on top. For RGB "
            'images name the channels {"0": "rgb_to_0_1"} in dataset.json; for z-scored data (CT, MRI, '
            "R/G/B channel names) set model.normalize: none"
        )
    if normalize == "none" and all_rgb:
        return (
            "nnU-Net gives RGB in [0, 1] but model.normalize: none skips the backbone's pretraining "
            "mean/std; set model.normalize: backbone to feed the backbone what it was pretrained on"
        )
    return None


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


def unwrap(network: nn.Module) -> nn.Module:
    """The model inside DDP and torch.compile wrappers."""
    if isinstance(network, nn.parallel.DistributedDataParallel):
        network = network.module
    if isinstance(network, OptimizedModule):
        network = network._orig_mod
    return network


class nnUNetTrainerSegframe(nnUNetTrainer):
    """nnU-Net trainer for segframe models; the config comes from the plans (see segframe.nnunet.plans)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.segframe_config = config_from_configuration(
            self.configuration_manager.configuration, f"plans {self.plans_manager.plans_name!r}"
        )
        train = self.segframe_config.train
        self.initial_lr = train.initial_lr
        self.weight_decay = train.weight_decay
        self.num_epochs = train.num_epochs
        self.num_iterations_per_epoch = train.num_iterations_per_epoch
        self.num_val_iterations_per_epoch = train.num_val_iterations_per_epoch
        self.save_every = train.save_every
        self.enable_deep_supervision = False

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """ViTSegModel from the plans' config; no weights are loaded here (inference calls this too)."""
        cfg = config_from_configuration(configuration_manager.configuration,
                                        f"plans {plans_manager.plans_name!r}")
        return ViTSegModel(cfg, in_channels=num_input_channels, num_classes=num_output_channels)

    @property
    def model(self) -> ViTSegModel:
        return unwrap(self.network)

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        """ViTSegModel has one output; nothing to switch."""

    def configure_optimizers(self):
        train = self.segframe_config.train
        groups = self.model.param_groups(self.initial_lr, self.weight_decay, train.layer_decay,
                                         train.backbone_lr_scale)
        optimizer = torch.optim.AdamW(groups, lr=self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, WarmupPolyLR(optimizer, self.initial_lr, self.num_epochs, train.warmup_epochs)

    def on_train_start(self) -> None:
        if not self.was_initialized:
            self.initialize()
        model, cfg = self.model, self.segframe_config
        if self.current_epoch == 0:  # a fresh start: --c and --val load nnU-Net checkpoints instead
            report = model.load_pretrained()
            self.print_to_log_file(
                f"pretrained backbone: {report.summary()}" if report else
                "pretrained backbone: none (model.checkpoint_path is empty): random initialisation")
        else:
            self.print_to_log_file(f"continuing at epoch {self.current_epoch} from the nnU-Net checkpoint")
        m = cfg.model
        lora = cfg.lora
        self.print_to_log_file(
            f"segframe: backbone {m.backbone.name} {m.backbone_size} (layers {model.layers}), decoder "
            f"{m.decoder.name}, neck {m.neck}, upsampler {m.upsampler}, freeze_backbone {m.freeze_backbone}, "
            "LoRA " + (f"r={lora.r} alpha={lora.lora_alpha} dropout={lora.lora_dropout} on "
                       f"{lora.target_modules}" if lora.enabled else "off"))
        self.print_to_log_file("parameters:\n" + format_counts(model.parameter_counts(), detailed=True))
        warning = intensity_warning(list(self.configuration_manager.normalization_schemes), m.normalize)
        if warning:
            self.print_to_log_file(f"WARNING: {warning}")
        super().on_train_start()
        if self.local_rank == 0:
            with open(os.path.join(self.output_folder_base, "segframe.yaml"), "w") as f:
                f.write("# the config this results folder was trained with (it also lives in plans.json)\n")
                yaml.safe_dump(cfg.model_dump(mode="json"), f, sort_keys=False)

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"].to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        cuda = self.device.type == "cuda"
        with torch.autocast(self.device.type, enabled=True) if cuda else dummy_context():
            output = self.network(data)
            loss = self.loss(output, target)
            aux = self.model.auxiliary_logits
            if aux is not None:
                loss = loss + self.model.decoder.auxiliary_loss_weight * self.loss(aux, target)
        clip = self.segframe_config.train.gradient_clip
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), clip)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), clip)
            self.optimizer.step()
        return {"loss": loss.detach().cpu().numpy()}

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        """nnU-Net's, with clear errors; a checkpoint dict goes through a temporary file
        (nnU-Net 2.8.1's own load_checkpoint fails on dicts)."""
        if isinstance(filename_or_checkpoint, dict):
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "checkpoint.pth")
                torch.save(filename_or_checkpoint, path)
                return self.load_checkpoint(path)
        try:
            super().load_checkpoint(filename_or_checkpoint)
        except (RuntimeError, KeyError, EOFError, OSError) as exc:
            raise CheckpointError(
                f"cannot continue from {filename_or_checkpoint}: {type(exc).__name__}: {str(exc)[:500]}. "
                "It is unreadable or was trained with a different model; the file is left as it is"
            ) from None
