"""nnUNetTrainerSegframe: nnU-Net's trainer with a ViTSegModel built from the config in the plans.

Only what a ViT needs changes: the network (from the plans configuration's `segframe`
section, so inference rebuilds it with no YAML), deep supervision off, AdamW with parameter
groups (no decay on norms, biases and tokens; optional layer-wise LR decay and backbone LR
scale) or nnU-Net's SGD (`train.optimizer`), linear warmup then poly decay, the config's
gradient clip, epochs and iterations,
the auxiliary-head loss (or the head's own loss), the optional Skeleton Recall term
(`train.loss`), and what makes a run trustworthy: weights-only checkpoint loading with a
readable fallback, atomic checkpoint writes, the best EMA Dice kept over `--c`, skipped NaN/inf
steps with a stop after `train.max_nonfinite_steps`, `train.precision`, and `train.seed` (the
training process and every augmentation worker seeded, batches in a fixed order).
Data, augmentation, validation and export stay nnU-Net's (the final validation predicted by
`ValidationPredictor`: `segframe predict`'s window). Pretrained backbone weights load when
training starts, never at inference.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from time import time
from unittest import mock

import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
import numpy as np
import torch
import torch.distributed as dist
import yaml
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn
from torch._dynamo import OptimizedModule
from torch.optim.lr_scheduler import LRScheduler

from segframe.errors import CheckpointError, ConfigError, SegframeError
from segframe.lora import format_counts
from segframe.losses import SkeletonRecallLoss, tubed_skeleton
from segframe.model import ViTSegModel
from segframe.nnunet.checkpoints import (
    NAMES,
    atomic_save,
    check_trainer,
    check_weights_fit,
    load_checkpoint_file,
    nonfinite_tensors,
    readable_checkpoint,
)
from segframe.nnunet.plans import config_from_configuration

# `segframe train --trust-checkpoint` sets this for its training process; with stock nnUNetv2_train set
# it by hand (=1) to continue from a checkpoint that needs full unpickling.
TRUST_ENV = "SEGFRAME_TRUST_CHECKPOINT"

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


class NonFiniteTraining(SegframeError):
    """The loss or the weights became NaN/inf and stayed so: the run is stopped before it saves them."""


# The largest |logit| a network may give and still be predicted: nnU-Net's sliding window (and so the final
# validation and `segframe predict`) sums Gaussian-weighted logits in float16 (largest value 65504), with
# weights up to 10 from up to 4 tiles over a pixel at its step of 0.5. A trained network's logits are tens.
LOGIT_LIMIT = 65504 / 40


def check_validation_precision(precision: str, device: torch.device) -> None:
    """`train.validation_precision: bf16` is for the CPU; refused elsewhere before any file is written."""
    if precision == "bf16" and device.type != "cpu":
        raise ConfigError(f"train.validation_precision: bf16 is for the CPU (on {device.type} nnU-Net's own "
                          "autocast applies in validation); use fp32")


def resolve_precision(precision: str, device: torch.device) -> str:
    """`train.precision` for a device: auto = bf16 on CUDA that supports it, fp16 (with a grad scaler)
    on older CUDA, fp32 elsewhere; nnunet = fp16 on any CUDA, fp32 elsewhere (nnU-Net's trainer)."""
    cuda = device.type == "cuda"
    if precision == "nnunet":
        return "fp16" if cuda else "fp32"
    if precision == "auto":
        if not cuda:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "mps" and precision != "fp32":
        raise ConfigError(f"train.precision: {precision} is not supported on mps (nnU-Net runs mps without "
                          "autocast); use fp32 or auto")
    return precision


def better(value, best) -> bool:
    """Whether an EMA pseudo Dice beats the best so far (NaN never does; a NaN or missing best loses)."""
    if value is None or not np.isfinite(value):
        return False
    return best is None or not np.isfinite(best) or value > best


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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


# the random streams of a seeded run: the training process, the training loader's workers, the validation's
MAIN, TRAIN_WORKERS, VAL_WORKERS = 0, 1, 2


def derived_seed(seed: int, rank: int, stream: int, worker: int = 0) -> int:
    """The 32-bit seed of one random stream of a run seeded with `seed`: numpy's SeedSequence child for
    (DDP rank, stream, worker), so every process and worker draws from its own well-mixed stream."""
    return int(np.random.SeedSequence(seed, spawn_key=(rank, stream, worker)).generate_state(1)[0])


def seed_process(seed: int) -> None:
    """Seed torch, numpy and python `random` of this process."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class SeededWorkerLoader:
    """nnU-Net's data loader as batchgenerators' workers see it: `set_thread_id`, which each worker calls once
    when it starts, is the worker-init hook that seeds the worker from the run seed and its index."""

    def __init__(self, loader, seed: int, rank: int, stream: int):
        self.loader, self.seed, self.rank, self.stream = loader, seed, rank, stream

    def set_thread_id(self, thread_id: int) -> None:
        torch.set_num_threads(1)  # as nnU-Net's own workers (NonDetMultiThreadedAugmenter) run
        seed_process(derived_seed(self.seed, self.rank, self.stream, thread_id))
        self.loader.set_thread_id(thread_id)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.loader)


def seeded_augmenter(loader, workers: int, seed: int, rank: int, stream: int, pin_memory: bool):
    """batchgenerators' MultiThreadedAugmenter over nnU-Net's data loader with `workers` seeded workers.

    It hands out batches round robin over its workers, so their order is fixed; nnU-Net's
    NonDetMultiThreadedAugmenter hands them out in whichever order the workers finish them.
    """
    augmenter = MultiThreadedAugmenter(
        SeededWorkerLoader(loader, seed, rank, stream), None, workers,
        seeds=[derived_seed(seed, rank, stream, i) for i in range(workers)], pin_memory=pin_memory)
    next(augmenter)  # start the workers now, as nnU-Net does
    return augmenter


def seeded_dataloaders(trainer: nnUNetTrainer, seed: int) -> tuple:
    """nnUNetTrainer.get_dataloaders of `trainer` with every augmentation worker seeded from `seed` and the
    batches in a fixed order; the worker counts are nnU-Net's (nnUNet_n_proc_DA for training, half of it
    for validation). Also for other nnUNetTrainer subclasses (benchmarks/trainers)."""
    workers = get_allowed_n_proc_DA()
    with mock.patch.dict(os.environ, {"nnUNet_n_proc_DA": "0"}):  # loaders built, no worker started
        train, val = nnUNetTrainer.get_dataloaders(trainer)
    if workers == 0:  # augmentation in the training process, which is seeded
        return train, val
    rank, pin = trainer.local_rank, trainer.device.type == "cuda"
    return (seeded_augmenter(train.data_loader, workers, seed, rank, TRAIN_WORKERS, pin),
            seeded_augmenter(val.data_loader, max(1, workers // 2), seed, rank, VAL_WORKERS, pin))


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
        if train.optimizer == "sgd":  # nnU-Net's: weight decay on every parameter
            for group in groups:
                group["weight_decay"] = self.weight_decay
            optimizer = torch.optim.SGD(groups, lr=self.initial_lr, weight_decay=self.weight_decay,
                                        momentum=0.99, nesterov=True)
        else:
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
        from segframe.nnunet.predict import emulated_bf16_note

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
        from segframe.nnunet.predict import bf16_network
        from segframe.nnunet.window import ValidationPredictor

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
        if self.skeleton_recall is not None:  # the skeleton travels as the target's second channel
            target, skeleton = target[:, :1], target[:, 1:]
        loss = self.loss(output, target)
        if self.skeleton_recall is not None:
            ignore = self.label_manager.ignore_label
            mask = None if ignore is None else target != ignore
            loss = loss + self.segframe_config.train.loss.skeleton_recall * self.skeleton_recall(
                output, skeleton, mask)
        aux = model.auxiliary_logits
        if aux is not None:
            loss = loss + model.decoder.auxiliary_loss_weight * self.loss(aux, target)
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
