"""The segframe plans variant: a copy of the dataset's nnU-Net plans whose configuration carries the config.

nnU-Net rebuilds a network from `<results>/plans.json` and the trainer class alone, so the
validated YAML travels inside the plans: `plans["configurations"][cfg]["segframe"]` holds the
resolved config and the plugin distributions it was built with. The variant keeps the
configuration's `data_identifier`, so nnU-Net's preprocessed data is reused, and gets its own
plans name (`<base>_segframe_<tag>`), so each config trains into its own results folder.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import segframe
from segframe.config import SegframeConfig, validate_config
from segframe.errors import ConfigError, PluginError, SegframeError
from segframe.files import read_json, write_atomically
from segframe.nnunet import TRAINER_NAME

SECTION = "segframe"
_TAG = re.compile(r"[^a-z0-9]+")


class NnUNetSetupError(SegframeError):
    """nnU-Net's folders, dataset, plans or results are missing or do not fit."""


def config_tag(name: str) -> str:
    """A plans-name-safe tag from a config file stem or a user's --name: `UperNet-L.v2` -> `upernet_l_v2`."""
    tag = _TAG.sub("_", name.lower()).strip("_")
    if not tag:
        raise ConfigError(f"cannot make a plans name from {name!r}: use letters or digits (--name)")
    return tag


def plans_name(base: str, tag: str) -> str:
    return f"{base}_segframe_{tag}"


def round_patch(size: list[int], patch: int) -> list[int]:
    """Each side to the nearest multiple of the ViT patch, at least one patch."""
    return [max(patch, int(s / patch + 0.5) * patch) for s in size]  # halves round up


def backbone_patch_size(cfg: SegframeConfig) -> int:
    """The backbone's patch size, from a weightless (meta-device) build."""
    import torch

    from segframe.plugins import get_registry

    spec = get_registry().backbone(cfg.model.backbone.name).spec
    with torch.device("meta"):
        backbone = spec.build(cfg.model.backbone_size, cfg.backbone_params())
    return int(backbone.patch_size)


def _distribution(kind: str, name: str) -> dict[str, str]:
    from segframe.plugins import get_registry

    reg = get_registry().get(kind, name)
    return {"name": name, "distribution": reg.distribution, "version": reg.version}


def nnunet_folder(var: str) -> Path:
    """One of nnU-Net's folders from its environment variable, or a clear error."""
    value = os.environ.get(var)
    if not value:
        raise NnUNetSetupError(
            f"{var} is not set: export nnUNet_raw, nnUNet_preprocessed and nnUNet_results "
            "(see nnU-Net's documentation/setting_up_paths.md)"
        )
    return Path(value)


def dataset_folder(dataset: str) -> Path:
    """`<nnUNet_preprocessed>/DatasetXXX_Name` for an id or name, or an error saying how to make it."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    root = nnunet_folder("nnUNet_preprocessed")
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except (RuntimeError, ValueError) as exc:
        raise NnUNetSetupError(
            f"dataset {dataset!r} is not preprocessed (nothing in {root} or nnUNet_raw matches): "
            f"run `nnUNetv2_plan_and_preprocess -d {dataset} -c 2d` first ({exc})"
        ) from None
    folder = root / name
    if not folder.is_dir():
        raise NnUNetSetupError(
            f"dataset {name} is not preprocessed: {folder} does not exist; "
            f"run `nnUNetv2_plan_and_preprocess -d {dataset} -c 2d` first"
        )
    return folder


def resolved_configuration(plans: dict[str, Any], configuration: str) -> dict[str, Any]:
    """The configuration with nnU-Net's `inherits_from` applied."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    check_configuration(plans, configuration)
    return PlansManager(plans).get_configuration(configuration).configuration


def check_configuration(plans: dict[str, Any], configuration: str) -> None:
    """The plans have `configuration`, or an error listing the ones they have."""
    known = list(plans.get("configurations", {}))
    if configuration not in known:
        raise NnUNetSetupError(
            f"plans {plans.get('plans_name')!r} have no configuration {configuration!r}; "
            f"known: {', '.join(known) or '(none)'}"
        )


def make_plans(
    base: dict[str, Any], configuration: str, cfg: SegframeConfig, name: str, patch: int
) -> tuple[dict[str, Any], list[str]]:
    """The segframe plans variant of `base` and the log lines saying what it changed."""
    resolved = resolved_configuration(base, configuration)
    if len(resolved["patch_size"]) != 2:
        raise NnUNetSetupError(
            f"configuration {configuration!r} is {len(resolved['patch_size'])}D; segframe trains 2D "
            "networks: use the 2d configuration"
        )
    plans = copy.deepcopy(base)
    plans["plans_name"] = name
    entry = plans["configurations"][configuration]
    notes = []
    wanted = list(cfg.train.patch_size or resolved["patch_size"])
    if len(wanted) != 2:
        raise ConfigError(f"train.patch_size must be [H, W], got {wanted}")
    rounded = round_patch(wanted, patch)
    source = "train.patch_size" if cfg.train.patch_size else "nnU-Net's planned patch size"
    if rounded != wanted:
        notes.append(f"{source} {wanted} rounded to {rounded}, a multiple of the ViT patch ({patch})")
    if rounded != list(resolved["patch_size"]):
        entry["patch_size"] = rounded
    if cfg.train.batch_size:
        entry["batch_size"] = cfg.train.batch_size
    notes.append(f"patch size {rounded}, batch size {cfg.train.batch_size or resolved['batch_size']}")
    entry[SECTION] = {
        "config": cfg.model_dump(mode="json"),
        "plugins": {
            "backbone": _distribution("backbone", cfg.model.backbone.name),
            "decoder": _distribution("decoder", cfg.model.decoder.name),
        },
        "segframe_version": segframe.__version__,
    }
    return plans, notes


def results_folder(results: Path, dataset: str, name: str, configuration: str) -> Path:
    """`<results>/<dataset>/nnUNetTrainerSegframe__<plans>__<configuration>`, as nnU-Net names it."""
    return results / dataset / f"{TRAINER_NAME}__{name}__{configuration}"


def trained_checkpoints(dataset: str, name: str, configuration: str) -> list[Path]:
    """Checkpoints already trained with plans `name`, in every fold."""
    results = os.environ.get("nnUNet_results")
    if not results:
        return []
    return sorted(results_folder(Path(results), dataset, name, configuration).glob("fold_*/checkpoint_*.pth"))


def _structure(section: dict[str, Any]) -> dict[str, Any]:
    """The parts of a stored config that decide the network's parameters."""
    config = section.get("config", {})
    return {"model": config.get("model"), "lora": config.get("lora")}


def prepare_plans(
    dataset_dir: Path, base_name: str, configuration: str, cfg: SegframeConfig, tag: str
) -> tuple[str, dict[str, Any], list[str]]:
    """The plans `<base>_segframe_<tag>` for `cfg`, checked but not written: (name, plans, log lines).

    Refuses to change the model of plans that already have trained checkpoints (their
    results folder would no longer rebuild them); train settings may change (e.g. more epochs
    with --c).
    """
    base = read_json(dataset_dir / f"{base_name}.json", f"nnU-Net plans {base_name!r}", NnUNetSetupError)
    name = plans_name(base_name, tag)
    plans, notes = make_plans(base, configuration, cfg, name, backbone_patch_size(cfg))
    target = dataset_dir / f"{name}.json"
    if target.is_file():
        stored = read_json(target, "segframe plans", NnUNetSetupError)
        old = stored.get("configurations", {}).get(configuration, {})
        new = plans["configurations"][configuration]
        trained = trained_checkpoints(dataset_dir.name, name, configuration)
        changed = SECTION in old and (
            _structure(old[SECTION]) != _structure(new[SECTION])
            or old.get("patch_size") != new.get("patch_size")
        )
        if changed and trained:
            raise ConfigError(
                f"plans {name!r} already have trained checkpoints ({trained[0].parent.parent}) built from a "
                "different model section; their results folder must keep rebuilding that model. Train this "
                "config under another name (--name NEW), or move that results folder away first"
            )
    return name, plans, notes


def store_plans(dataset_dir: Path, plans: dict[str, Any]) -> Path:
    """Write prepared plans to `<dataset_dir>/<plans_name>.json` (atomically)."""
    target = dataset_dir / f"{plans['plans_name']}.json"
    write_atomically(target, json.dumps(plans, indent=2) + "\n", error=NnUNetSetupError)
    return target


def write_plans(
    dataset_dir: Path, base_name: str, configuration: str, cfg: SegframeConfig, tag: str
) -> tuple[str, list[str]]:
    """prepare_plans, then store_plans; returns the plans name and log lines."""
    name, plans, notes = prepare_plans(dataset_dir, base_name, configuration, cfg, tag)
    store_plans(dataset_dir, plans)
    return name, notes


def find_segframe_plans(dataset_dir: Path, base_name: str) -> list[str]:
    """Names of the segframe plans variants of `base_name` in a preprocessed dataset folder."""
    prefix = plans_name(base_name, "")
    return sorted(p.stem for p in dataset_dir.glob(f"{prefix}*.json"))


def config_from_configuration(configuration: dict[str, Any], where: str = "plans") -> SegframeConfig:
    """The validated config stored in a plans configuration; clear errors when it is missing or its
    plugins are not installed."""
    section = configuration.get(SECTION)
    if not isinstance(section, dict) or "config" not in section:
        raise NnUNetSetupError(
            f"{where} has no segframe config: it was not written by `segframe train`. Train it with "
            "`segframe train DATASET 2d FOLD --config FILE.yaml`, or predict it with nnUNetv2_predict"
        )
    from segframe.plugins import get_registry

    registry = get_registry()
    for kind, info in section.get("plugins", {}).items():
        try:
            registry.get(kind, info["name"])
        except PluginError as exc:
            raise PluginError(
                f"this model was trained with the {kind} {info['name']!r} from {info['distribution']} "
                f"{info['version']}, which is not available here ({exc}): pip install {info['distribution']}"
            ) from None
    return validate_config(section["config"], where)
