"""A trained segframe results folder (`TRAINER__PLANS__CONFIGURATION`), read once.

`ResultsFolder` reads dataset.json, plans.json and the config stored in the plans once, validates the
config once, finds the folds that have a checkpoint, and loads their weights weights-only with the trust
rules of segframe.nnunet.checkpoints (a checkpoint that needs full unpickling only with `trust`), each
checked against the model the plans build. `segframe predict`, the `Predictor` and `segframe export` load
results folders only through it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from segframe.config import SegframeConfig
from segframe.errors import CheckpointError, SegframeError
from segframe.files import read_json
from segframe.images import InputSpec
from segframe.model import ViTSegModel
from segframe.nnunet.checkpoints import (
    check_trainer,
    check_weights_fit,
    load_checkpoint_file,
    nonfinite_tensors,
)
from segframe.nnunet.network import dataset_network
from segframe.nnunet.plans import check_configuration, config_from_configuration


class ResultsFolder:
    """One results folder: `dataset_json`, `plans`, `configuration` (from the folder's name),
    `plans_manager`, `configuration_manager`, `label_manager`, `config` (the validated segframe config)."""

    def __init__(self, folder: str | os.PathLike):
        folder = Path(folder).resolve()
        if not folder.is_dir():
            raise SegframeError(f"results folder {folder} does not exist")
        self.folder = folder
        self.plans = read_json(folder / "plans.json", "plans.json of the results folder (is -m an nnU-Net "
                               "results folder, TRAINER__PLANS__CONFIGURATION?)")
        self.dataset_json = read_json(folder / "dataset.json", "dataset.json of the results folder")
        parts = folder.name.split("__")
        if len(parts) != 3:
            raise SegframeError(
                f"{folder.name} is not named TRAINER__PLANS__CONFIGURATION as nnU-Net names results "
                "folders; pass the folder that holds fold_0, plans.json and dataset.json")
        self.configuration = parts[2]
        check_configuration(self.plans, self.configuration)
        self.plans_manager = PlansManager(self.plans)
        self.configuration_manager = self.plans_manager.get_configuration(self.configuration)
        self.config: SegframeConfig = config_from_configuration(self.configuration_manager.configuration,
                                                                f"{folder}/plans.json")
        self.label_manager = self.plans_manager.get_label_manager(self.dataset_json)

    @property
    def labels(self) -> dict[str, Any]:
        return dict(self.dataset_json["labels"])

    def input_spec(self) -> InputSpec:
        """What the model's training images were (channels, intensity range)."""
        return InputSpec.from_dataset(self.dataset_json, self.folder / "dataset_fingerprint.json")

    def folds(self, requested: list[str] | None, checkpoint: str) -> list[int | str]:
        """The folds `requested` (default: every fold with `checkpoint`), each checked to have it."""
        available = sorted(p.parent.name[5:] for p in self.folder.glob(f"fold_*/{checkpoint}"))
        if requested is None:
            if not available:
                raise SegframeError(f"no fold of {self.folder} has {checkpoint} (did training finish? see "
                                    "-chk)")
            requested = available
        requested = [str(f) for f in requested]
        missing = [f for f in requested if f not in available]
        if missing:
            raise SegframeError(
                f"fold(s) {', '.join(missing)} of {self.folder} have no {checkpoint}; available: "
                f"{', '.join(available) or 'none'}")
        return [f if f == "all" else int(f) for f in requested]

    def build_network(self) -> ViTSegModel:
        """The model the plans build, with no weights loaded."""
        return dataset_network(self.plans_manager, self.configuration_manager, self.dataset_json, self.config)

    def load(self, folds: list[int | str], checkpoint_name: str = "checkpoint_final.pth",
             trust: bool = False) -> tuple[ViTSegModel, list[dict[str, torch.Tensor]], dict[str, Any]]:
        """The network with the first fold's weights, every fold's weights (checked: written by segframe's
        trainer, finite, fitting the network), and the first fold's checkpoint without its weights."""
        weights, first = [], None
        for fold in folds:
            path = self.folder / f"fold_{fold}" / checkpoint_name
            checkpoint = load_checkpoint_file(path, trust)
            check_trainer(checkpoint, path)
            bad = nonfinite_tensors(checkpoint["network_weights"])
            if bad:
                raise CheckpointError(f"{path} holds NaN/inf weights ({bad[0]} and {len(bad) - 1} more): the "
                                      "training diverged; retrain it (see train.precision, initial_lr)")
            first = first or (path, checkpoint)
            weights.append(checkpoint["network_weights"])
        path, checkpoint = first
        init_args = checkpoint["init_args"]
        trained = init_args.get("configuration") if isinstance(init_args, dict) else None
        if trained != self.configuration:
            raise CheckpointError(f"{path} was trained with configuration {trained!r}, but the results "
                                  f"folder is {self.folder.name} ({self.configuration!r}): it comes from "
                                  "another run")
        network = self.build_network()
        expected = network.state_dict()
        for fold, fold_weights in zip(folds, weights, strict=True):
            check_weights_fit(fold_weights, expected, self.folder / f"fold_{fold}" / checkpoint_name)
        network.load_state_dict(weights[0])
        return network, weights, {k: v for k, v in checkpoint.items() if k != "network_weights"}

    def initialize(self, predictor: Any, folds: list[int | str],
                   checkpoint_name: str = "checkpoint_final.pth", trust: bool = False) -> None:
        """What nnUNetPredictor.initialize_from_trained_model_folder sets, from this folder (loaded by
        `load`; nnU-Net's own method unpickles every checkpoint)."""
        network, weights, checkpoint = self.load(folds, checkpoint_name, trust)
        predictor.plans_manager = self.plans_manager
        predictor.configuration_manager = self.configuration_manager
        predictor.list_of_parameters = weights
        predictor.network = network
        predictor.dataset_json = self.dataset_json
        predictor.trainer_name = checkpoint["trainer_name"]
        predictor.allowed_mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes")
        predictor.label_manager = self.label_manager
        if os.environ.get("nnUNet_compile", "").lower() in ("true", "1", "t"):
            predictor.network = torch.compile(network)
