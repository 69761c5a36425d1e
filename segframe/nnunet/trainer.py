"""nnUNetTrainerSegframe: nnU-Net's trainer with a ViTSegModel built from the config in the plans.

Only what a ViT needs changes: the network (from the plans configuration's `segframe` section, so
inference rebuilds it with no YAML; segframe.nnunet.network), deep supervision off, the optimizer and
schedule of `train` (segframe.nnunet.schedule), the config's gradient clip, epochs and iterations, the
loss (nnU-Net's Dice + CE with the auxiliary head's term and Skeleton Recall, or the head's own loss),
`train.precision` (segframe.nnunet.runtime), `train.seed` (segframe.nnunet.seeding) and the guards of
segframe.nnunet.safety. Data, augmentation, validation and export stay nnU-Net's (the final validation
predicted by `ValidationPredictor`: `segframe predict`'s window). Pretrained backbone weights load when
training starts, never at inference.
"""

from __future__ import annotations

import os
from time import time
from unittest import mock

import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
import numpy as np
import torch
import yaml
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from segframe.errors import ConfigError
from segframe.lora import format_counts
from segframe.losses import SkeletonRecallLoss
from segframe.model import ViTSegModel
from segframe.nnunet.checkpoints import TRUST_ENV
from segframe.nnunet.network import build_network, intensity_warning, unwrap
from segframe.nnunet.plans import config_from_configuration
from segframe.nnunet.runtime import (
    AUTOCAST_DTYPES,
    bf16_network,
    check_validation_precision,
    emulated_bf16_note,
    resolve_precision,
)
from segframe.nnunet.safety import SafeTraining, better
from segframe.nnunet.schedule import make_optimizer
from segframe.nnunet.seeding import MAIN, derived_seed, seed_process, seeded_dataloaders
from segframe.nnunet.targets import SkeletonTargetTransform
from segframe.nnunet.window import ValidationPredictor


class nnUNetTrainerSegframe(SafeTraining, nnUNetTrainer):
    """nnU-Net trainer for segframe models; the config comes from the plans (see segframe.nnunet.plans)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # nnU-Net pops the flag in __init__; it decides whether an unreadable checkpoint may fall back
        self.continue_training = bool(plans.get("continue_training", False))
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
        self.precision = resolve_precision(train.precision, self.device)
        check_validation_precision(train.validation_precision, self.device)
        self.grad_scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.trust_checkpoint = os.environ.get(TRUST_ENV, "") == "1"
        self.nonfinite_in_a_row = 0
        self.iteration = 0
        self.skeleton_recall: SkeletonRecallLoss | None = None  # set by _build_loss for train.loss
        self.seed = train.seed
        if self.seed is not None:  # before initialize(), so the network's initial weights are seeded too
            seed_process(derived_seed(self.seed, self.local_rank, MAIN))

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """ViTSegModel from the plans' config; no weights are loaded here (inference calls this too)."""
        return build_network(plans_manager, configuration_manager, num_input_channels, num_output_channels)

    def configure_optimizers(self):
        return make_optimizer(self.model, self.segframe_config.train, self.initial_lr, self.weight_decay,
                              self.num_epochs)

    @property
    def model(self) -> ViTSegModel:
        return unwrap(self.network)

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        """ViTSegModel has one output; nothing to switch."""

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
        way_back = (f"detail path {m.detail.channels} units {m.detail.units}" if model.detail is not None
                    else f"upsampler {type(model.upsampler).__name__}")
        self.print_to_log_file(
            f"segframe: backbone {m.backbone.name} {m.backbone_size} (layers {model.layers}), decoder "
            f"{m.decoder.name}, neck {m.neck}, {way_back}, freeze_backbone {m.freeze_backbone}, "
            "LoRA " + (f"r={lora.r} alpha={lora.lora_alpha} dropout={lora.lora_dropout} on "
                       f"{lora.target_modules}" if lora.enabled else "off"))
        self.print_to_log_file("seed: " + ("none (train.seed is null): unseeded" if self.seed is None else
                                           f"{self.seed} (train.seed), augmentation workers seeded from it"))
        if self.skeleton_recall is not None:
            self.print_to_log_file(f"loss: Dice + CE + {cfg.train.loss.skeleton_recall} x Skeleton Recall "
                                   "(train.loss; the validation loss is Dice + CE)")
        self.print_to_log_file(
            f"precision {self.precision} (train.precision: {cfg.train.precision})"
            + (", with a gradient scaler" if self.grad_scaler is not None else ""))
        validation = cfg.train.validation_precision
        if validation == "bf16":
            self.print_to_log_file("final validation: the forward in bf16 (train.validation_precision)")
        on_cpu = [key for key, value in (("precision", self.precision), ("validation_precision", validation))
                  if value == "bf16" and self.device.type == "cpu"]
        for key in on_cpu:
            if note := emulated_bf16_note(f"train.{key}: bf16"):
                self.print_to_log_file(f"WARNING: {note}")
        self.print_to_log_file("parameters:\n" + format_counts(model.parameter_counts(), detailed=True))
        warning = intensity_warning(list(self.configuration_manager.normalization_schemes), m.normalize)
        if warning:
            self.print_to_log_file(f"WARNING: {warning}")
        super().on_train_start()
        if self.local_rank == 0:
            with open(os.path.join(self.output_folder_base, "segframe.yaml"), "w") as f:
                f.write("# the config this results folder was trained with (it also lives in plans.json)\n")
                yaml.safe_dump(cfg.model_dump(mode="json"), f, sort_keys=False)

    def get_dataloaders(self):
        """nnU-Net's loaders; with `train.seed`, seeded workers and a fixed batch order."""
        return super().get_dataloaders() if self.seed is None else seeded_dataloaders(self, self.seed)

    def get_training_transforms(self, *args, **kwargs):
        """nnU-Net's training transforms, with the target's skeleton added last for skeleton_recall."""
        transforms = super().get_training_transforms(*args, **kwargs)
        if self.segframe_config.train.loss.skeleton_recall > 0:
            transforms.transforms.append(SkeletonTargetTransform(self.label_manager.ignore_label))
        return transforms

    def _build_loss(self):
        """nnU-Net's Dice + CE, and the Skeleton Recall term when train.loss asks for it (refused where it
        cannot apply, before any data is loaded). A head that owns its loss cannot train on regions."""
        self.skeleton_recall = None
        weight = self.segframe_config.train.loss.skeleton_recall
        decoder = self.segframe_config.model.decoder.name
        if self.model.owns_loss and self.label_manager.has_regions:
            raise ConfigError(
                f"decoder {decoder!r} cannot train on regions: it owns its training loss, which gives "
                "each pixel one class, while this dataset's regions overlap (sigmoid outputs); convert the "
                "dataset with class labels (e.g. the crossing as its own class) or choose a dense head such "
                "as upernet")
        if weight > 0:
            if self.model.owns_loss:
                raise ConfigError(
                    f"train.loss.skeleton_recall: {weight} cannot apply to decoder {decoder!r}: it owns its "
                    "training loss (its raw outputs are scored by that loss, not as dense logits by "
                    "nnU-Net's Dice + CE); remove train.loss.skeleton_recall or choose a head without its "
                    "own loss")
            if self.label_manager.has_regions:
                raise ConfigError(
                    f"train.loss.skeleton_recall: {weight} needs one label per pixel (softmax training); "
                    "this dataset defines regions (sigmoid outputs): remove train.loss.skeleton_recall")
            self.skeleton_recall = SkeletonRecallLoss(self.configuration_manager.batch_dice, ddp=self.is_ddp)
        return super()._build_loss()

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.iteration = 0
        self.loss_parts: dict[str, list[float]] = {}  # a head-owned loss's named parts, per step

    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's final validation, predicted as `segframe predict` does: by `ValidationPredictor` (on the
        CPU, the sliding window in one thread and the logits handed to nnU-Net's export pool in shared
        memory), and with train.validation_precision: bf16 the network's forward under CPU bfloat16
        autocast (as `--precision bf16`), restored afterwards."""
        bf16 = self.segframe_config.train.validation_precision == "bf16"
        if bf16:
            bf16_network(self.network)
        try:
            with mock.patch.object(nnunet_trainer_module, "nnUNetPredictor", ValidationPredictor):
                return super().perform_actual_validation(save_probabilities)
        finally:
            if bf16:
                del self.network.forward  # the class's forward again

    def autocast(self):
        """Autocast for `train.precision` (none for fp32)."""
        if self.precision == "fp32":
            return dummy_context()
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.precision])

    def compute_loss(self, output, target: torch.Tensor) -> torch.Tensor:
        """The training loss of a training forward's `output` for nnU-Net's batch target: the head's own
        loss (its parts kept for the epoch's log), or nnU-Net's Dice + CE (Dice + BCE for regions) plus
        the auxiliary head's and the Skeleton Recall terms. Pixels at the ignore label count in none."""
        model = self.model
        if getattr(model, "owns_loss", False):
            loss, parts = model.training_loss(output, target, self.label_manager.ignore_label)
            for name, value in parts.items():
                self.loss_parts.setdefault(name, []).append(float(value))
            return loss
        output, aux = output if isinstance(output, tuple) else (output, None)  # (logits, auxiliary logits)
        if self.skeleton_recall is not None:  # the skeleton travels as the target's second channel
            target, skeleton = target[:, :1], target[:, 1:]
        loss = self.loss(output, target)
        if self.skeleton_recall is not None:
            ignore = self.label_manager.ignore_label
            mask = None if ignore is None else target != ignore
            loss = loss + self.segframe_config.train.loss.skeleton_recall * self.skeleton_recall(
                output, skeleton, mask)
        if aux is not None:
            loss = loss + model.auxiliary_loss_weight * self.loss(aux, target)
        return loss

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"].to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        self.iteration += 1
        model = self.model
        # the forward updates norm running statistics: a skipped step must not keep them
        buffers = [(b, b.detach().clone()) for b in model.buffers()]
        with self.autocast():
            loss = self.compute_loss(self.network(data), target)
        result = {"loss": loss.detach().float().cpu().numpy()}
        if not self._all_finite(loss):
            self._skip_step(f"the loss is {loss.item()}", buffers)
            return result
        clip = self.segframe_config.train.gradient_clip
        if self.grad_scaler is not None:  # fp16: the scaler itself skips steps with inf/NaN gradients
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), clip)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(self.network.parameters(), clip)
            if not self._all_finite(norm):
                self._skip_step(f"the gradient norm is {norm.item()}", buffers)
                return result
            self.optimizer.step()
        self.nonfinite_in_a_row = 0
        return result

    def on_epoch_end(self) -> None:
        """nnU-Net's, with `_best_ema` updated (and checkpoint_best written) before checkpoint_latest, so
        latest carries the best EMA Dice that `--c` restores; a NaN EMA is never a new best. Weights whose
        validation logits exceed LOGIT_LIMIT stop the run before any checkpoint of them is written."""
        self.logger.log("epoch_end_timestamps", time(), self.current_epoch)
        for key in ("train_loss", "val_loss"):
            self.print_to_log_file(key, np.round(self.logger.get_value(key + "es", step=-1), decimals=4))
        if getattr(self, "loss_parts", None):  # the head's own loss: its parts, as the head named them
            self.print_to_log_file("train_loss parts (this rank's mean): " + ", ".join(
                f"{name} {np.mean(values):.4f}" for name, values in self.loss_parts.items()))
        self.print_to_log_file("Pseudo dice", [np.round(i, decimals=4) for i in
                                               self.logger.get_value("dice_per_class_or_region", step=-1)])
        seconds = (self.logger.get_value("epoch_end_timestamps", step=-1)
                   - self.logger.get_value("epoch_start_timestamps", step=-1))
        self.print_to_log_file(f"Epoch time: {np.round(seconds, decimals=2)} s")
        self._check_predictable()
        ema = self.logger.get_value("ema_fg_dice", step=-1)
        if better(ema, self._best_ema):
            self._best_ema = ema
            self.print_to_log_file(f"Yayy! New best EMA pseudo Dice: {np.round(self._best_ema, decimals=4)}")
            self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_best.pth"))
        epoch = self.current_epoch
        if (epoch + 1) % self.save_every == 0 and epoch != self.num_epochs - 1:
            self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_latest.pth"))
        if self.local_rank == 0:
            self.logger.plot_progress_png(self.output_folder)
        self.current_epoch += 1

