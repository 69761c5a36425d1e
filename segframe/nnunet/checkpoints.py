"""nnU-Net checkpoints that cannot run code and survive a kill: weights-only loading with a measured
allowlist, atomic saving, a readable fallback for `--c`, and the checks of a checkpoint's trainer, weights
and shapes against the model the plans build.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from segframe.backbones.checkpoint import unbuilt_keys
from segframe.errors import CheckpointError
from segframe.files import partial_files, write_atomically
from segframe.nnunet import TRAINER_NAME
from segframe.nnunet.network import dataset_network

# The smallest allowlist real nnUNetTrainerSegframe checkpoints need beyond torch's own safe types
# (measured with torch.serialization.get_unsafe_globals_in_checkpoint on checkpoints our trainer wrote):
# nnU-Net's logger (losses, pseudo Dice, EMA) and `_best_ema` hold numpy float32 scalars, which pickle as
# `numpy._core.multiarray.scalar(numpy.dtype("f4"), bytes)`, and the dtype object is a
# `numpy.dtypes.Float32DType`. `numpy.core.multiarray.scalar` is the same function under numpy 1.x's
# name, so a results folder written with numpy 1 loads too. Everything else in them (dicts, lists,
# tuples, str, int, float, None, tensors, OrderedDict, torch.device) is torch's own weights-only set.
ALLOWED_GLOBALS: list[Any] = [
    np._core.multiarray.scalar,
    (np._core.multiarray.scalar, "numpy.core.multiarray.scalar"),
    np.dtype,
    np.dtypes.Float32DType,
]
# `segframe train --trust-checkpoint` sets this for its training process; with stock nnUNetv2_train set
# it by hand (=1) to continue from a checkpoint that needs full unpickling.
TRUST_ENV = "SEGFRAME_TRUST_CHECKPOINT"
NAMES = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")  # nnU-Net's --c order
REQUIRED_KEYS = ("network_weights", "trainer_name", "init_args")


class UnreadableCheckpoint(CheckpointError):
    """The file is truncated, empty or not a torch checkpoint at all (a fallback may be tried)."""


def _refused_types(path: Path, message: str) -> str:
    """What a weights-only load refused: the globals in the pickle beyond the allowlist, or the type
    torch's message names; empty when the file is simply not a pickle."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - only used to name what was refused
        found = []
    allowed = {"numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar", "numpy.dtype"}
    names = [name for name in found if name not in allowed]
    if not names:
        names = re.findall(r"GLOBAL (\S+)|got <class '([^']+)'>", message)
        names = [a or b for a, b in names]
    return ", ".join(dict.fromkeys(names))


def load_checkpoint_file(path: str | os.PathLike, trust: bool = False,
                         map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """An nnU-Net checkpoint dict, loaded weights-only (or fully unpickled with `trust`).

    Raises UnreadableCheckpoint for truncated or foreign files and CheckpointError for pickles that
    need more than tensors, containers and numpy scalars; the file is never changed. `mmap` maps the
    tensors instead of reading them (a cheap check of the file's structure).
    """
    path = Path(path)
    if not path.is_file():
        raise UnreadableCheckpoint(f"checkpoint {path} does not exist")
    if not trust and not zipfile.is_zipfile(path):  # torch.save (and so nnU-Net) writes zip archives
        raise UnreadableCheckpoint(f"checkpoint {path} is unreadable (truncated or not a checkpoint): it is "
                                   f"not the zip archive torch.save writes ({path.stat().st_size} bytes)")
    try:
        if trust:
            checkpoint = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
        else:
            with torch.serialization.safe_globals(ALLOWED_GLOBALS):
                checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        found = "" if trust else _refused_types(path, str(exc))
        if found:
            raise CheckpointError(
                f"refusing to load {path}: it holds {found}, which a weights-only load does not allow (a "
                f"checkpoint written by {TRAINER_NAME} holds only tensors, containers and numpy scalars) "
                "and unpickling it could run code. If you trust this file and where it came from, pass "
                "--trust-checkpoint"
            ) from None
        raise UnreadableCheckpoint(f"checkpoint {path} is unreadable (truncated or not a checkpoint): "
                                   f"{_short(exc)}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, AttributeError,
            ImportError, IndexError, KeyError, TypeError) as exc:
        raise UnreadableCheckpoint(f"checkpoint {path} is unreadable (truncated or not a checkpoint): "
                                   f"{_short(exc)}") from None
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in REQUIRED_KEYS):
        raise UnreadableCheckpoint(
            f"checkpoint {path} is not an nnU-Net training checkpoint (no "
            f"{', '.join(REQUIRED_KEYS)}); pass a checkpoint_*.pth that nnU-Net wrote")
    return checkpoint


def _short(exc: BaseException) -> str:
    text = str(exc)
    if "WeightsUnpickler error:" in text:  # torch's long weights-only preamble is not the point here
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save, atomically and durably (segframe.files): a kill at any moment leaves either the previous
    file or the complete new one; temporary files of a save that was killed are removed first."""
    path = Path(path)
    for stale in partial_files(path):
        stale.unlink(missing_ok=True)
    write_atomically(path, lambda temporary: torch.save(obj, temporary), durable=True, error=CheckpointError)


def check_trainer(checkpoint: dict[str, Any], path: Path) -> None:
    name = checkpoint.get("trainer_name")
    if name != TRAINER_NAME:
        raise CheckpointError(
            f"{path} was trained by {name!r}, not {TRAINER_NAME}: segframe only loads its own results; use "
            "nnU-Net's own commands for other trainers")


def check_weights_fit(weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                      path: Path) -> None:
    """CheckpointError naming the keys and shapes that differ between a checkpoint and the plans' model.

    Keys of backbone blocks the model no longer builds (checkpoints saved before pruning) fit: loading
    skips them (see `Backbone.prune`)."""
    weights = {k[7:] if k.startswith("module.") and k not in expected else k: v for k, v in weights.items()}
    missing = [k for k in expected if k not in weights]
    pruned = set(unbuilt_keys(weights, expected, "backbone.vit."))
    unexpected = [k for k in weights if k not in expected and k not in pruned]
    shapes = [f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in weights and tuple(weights[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or shapes):
        return
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape (file vs plans)", shapes)):
        if items:
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            parts.append(f"{label}: {', '.join(items[:3])}{more}")
    raise CheckpointError(
        f"the weights in {path} do not fit the model in the results folder's plans ({'; '.join(parts)}): "
        "the checkpoint comes from another model or plans; use the plans.json it was trained with")


def readable_checkpoint(fold_dir: Path, first: str, trust: bool = False, fallback: bool = True,
                        mmap: bool = False) -> tuple[Path, dict[str, Any], str | None]:
    """The checkpoint to continue from: `first`, or (if unreadable and `fallback`) the newest readable
    one beside it. Returns (path, checkpoint, note saying what was skipped, or None)."""
    path = fold_dir / first
    try:
        return path, load_checkpoint_file(path, trust, mmap=mmap), None
    except UnreadableCheckpoint as exc:
        if not fallback:
            raise
        problem = str(exc)
    others = [fold_dir / n for n in NAMES if n != first and (fold_dir / n).is_file()]
    others.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    skipped = [problem]
    for other in others:
        try:
            checkpoint = load_checkpoint_file(other, trust, mmap=mmap)
        except UnreadableCheckpoint as exc:
            skipped.append(str(exc))
            continue
        return other, checkpoint, f"{problem}; continuing from {other.name} (the newest readable one) instead"
    raise CheckpointError(f"cannot continue from {fold_dir}: " + "; ".join(skipped) + "; no readable "
                          "checkpoint left (the files are left as they are): train again with --overwrite")


def expected_weights(plans: dict[str, Any], configuration: str,
                     dataset_json: dict[str, Any]) -> dict[str, Any]:
    """The state dict (shapes only where possible) of the model the plans build."""
    plans_manager = PlansManager(plans)
    args = (plans_manager, plans_manager.get_configuration(configuration), dataset_json)
    try:
        with torch.device("meta"):
            return dataset_network(*args).state_dict()
    except (RuntimeError, NotImplementedError, TypeError, ValueError):  # a head that cannot build on meta
        return dataset_network(*args).state_dict()


def nonfinite_tensors(weights: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors holding NaN or inf."""
    return [k for k, v in weights.items()
            if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
