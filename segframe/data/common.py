"""Writing nnU-Net v2 raw datasets: PNG images and labels, test references, FOV masks, dataset.json.

A dataset is built in a temporary folder beside its final place and swapped in at the
end, so re-running a conversion gives the same folder and an interrupted one leaves
the previous result untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from segframe.errors import SegframeError

# folders beside the nnU-Net ones, read by `segframe evaluate` and the demo
EXTRA_FOLDERS = {
    "labelsTs": "first-observer reference masks of the test images (0/1 PNG)",
    "labelsTs_2nd": "second-observer masks of the test images, where the source has them (0/1 PNG)",
    "fovTr": "field-of-view masks of the training images (0/1 PNG)",
    "fovTs": "field-of-view masks of the test images (0/1 PNG)",
}
MULTI_CLASS_REFERENCE = "reference label maps of the test images (values as in labels)"


class DataError(SegframeError):
    """A source folder is missing, incomplete or not the expected dataset."""


@dataclass
class Case:
    """One image with its masks, all (H, W[, 3]) arrays; `fov` may be None (no FOV masks), `label2` is
    a second observer's mask or None."""

    name: str
    image: np.ndarray
    label: np.ndarray
    fov: np.ndarray | None
    label2: np.ndarray | None = None


def raw_root(path: str | os.PathLike | None) -> Path:
    """The nnU-Net raw folder: `path`, else $nnUNet_raw; a clear error when neither is set."""
    root = path or os.environ.get("nnUNet_raw")
    if not root:
        raise DataError("no output folder: pass --raw DIR or set the nnUNet_raw environment variable")
    return Path(root)


def dataset_folder_name(dataset_id: int, name: str) -> str:
    if not 1 <= dataset_id <= 999:
        raise DataError(f"dataset id must be between 1 and 999, got {dataset_id}")
    return f"Dataset{dataset_id:03d}_{name}"


def check_free(root: Path, dataset_id: int, name: str) -> Path:
    """The dataset folder `<root>/DatasetXXX_<name>`; an error when another name holds the id."""
    folder_name = dataset_folder_name(dataset_id, name)
    clash = sorted(p.name for p in root.glob(f"Dataset{dataset_id:03d}_*") if p.name != folder_name)
    if clash:
        raise DataError(
            f"{root} already holds {', '.join(clash)} with id {dataset_id}; "
            f"choose another --dataset-id or move that folder away"
        )
    return root / folder_name


def _save_png(array: np.ndarray, path: Path) -> None:
    if array.dtype == bool:
        array = array.astype(np.uint8)
    Image.fromarray(np.ascontiguousarray(array)).save(path, optimize=False)


def check_case(case: Case) -> None:
    h, w = case.image.shape[:2]
    if case.image.ndim != 3 or case.image.shape[2] != 3 or case.image.dtype != np.uint8:
        raise DataError(f"{case.name}: image must be RGB uint8, got {case.image.shape} {case.image.dtype}")
    for what, mask in (("label", case.label), ("fov", case.fov), ("second label", case.label2)):
        if mask is not None and mask.shape != (h, w):
            raise DataError(f"{case.name}: {what} is {mask.shape[:2]}, image is {(h, w)}")


def write_dataset(
    root: str | os.PathLike,
    dataset_id: int,
    name: str,
    train: Iterable[Case],
    test: Iterable[Case],
    description: str = "",
    reference: str = "",
    licence: str = "",
    labels: dict[str, int | list[int]] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `<root>/DatasetXXX_<name>` and return its path.

    Training cases go to imagesTr/labelsTr (+ fovTr), test cases to imagesTs (+ labelsTs,
    labelsTs_2nd, fovTs); a case without a FOV mask writes none. Without `labels` the labels
    are {background: 0, vessel: 1} and every nonzero label pixel is vessel; with `labels`
    (dataset.json's `labels`: name -> value, or -> list of values for a region) the label
    maps are written as given and must hold no value above the highest one named. `extra`
    adds keys to dataset.json. Images are RGB PNGs that nnU-Net scales to 0-1 (`rgb_to_0_1`).
    Another folder with the same id but a different name is an error (nnU-Net could not
    tell them apart); it is never removed.
    """
    root = Path(root)
    final = check_free(root, dataset_id, name)
    folder_name = final.name
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder_name}.", dir=root))
    try:
        top = int(max(np.max(v) for v in labels.values())) if labels else 1
        n_train = n_test = 0
        for split, cases in (("Tr", train), ("Ts", test)):
            for case in cases:
                check_case(case)
                label = case.label > 0 if labels is None else case.label
                if label.size and int(label.max()) > top:
                    raise DataError(f"{case.name}: label value {int(label.max())} is above the highest "
                                    f"label in dataset.json ({top})")
                _save_png(case.image, _dir(tmp, f"images{split}") / f"{case.name}_0000.png")
                _save_png(label.astype(np.uint8 if top < 256 else np.uint16),
                          _dir(tmp, f"labels{split}") / f"{case.name}.png")
                if case.fov is not None:
                    _save_png(case.fov > 0, _dir(tmp, f"fov{split}") / f"{case.name}.png")
                if split == "Ts" and case.label2 is not None:
                    _save_png(case.label2 > 0, _dir(tmp, "labelsTs_2nd") / f"{case.name}.png")
                if split == "Tr":
                    n_train += 1
                else:
                    n_test += 1
        if n_train == 0:
            raise DataError(f"no training cases found for {folder_name}")
        dataset_json = {
            # one RGB PNG per case is three input channels to nnU-Net, each scaled by 1/255
            "channel_names": {"0": "rgb_to_0_1", "1": "rgb_to_0_1", "2": "rgb_to_0_1"},
            "labels": labels or {"background": 0, "vessel": 1},
            "numTraining": n_train,
            "file_ending": ".png",
            "name": name,
            "description": description,
            "reference": reference,
            "licence": licence,
            "numTest": n_test,
            "extra_folders": {k: v for k, v in EXTRA_FOLDERS.items() if (tmp / k).is_dir()},
            **(extra or {}),
        }
        if labels and "labelsTs" in dataset_json["extra_folders"]:
            dataset_json["extra_folders"]["labelsTs"] = MULTI_CLASS_REFERENCE
        (tmp / "dataset.json").write_text(json.dumps(dataset_json, indent=2) + "\n")
        tmp.chmod(0o755)
        _replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _dir(parent: Path, name: str) -> Path:
    path = parent / name
    path.mkdir(exist_ok=True)
    return path


def _replace(new: Path, final: Path) -> None:
    """Put folder `new` at `final`, replacing a previous dataset folder there."""
    if not final.exists():
        new.rename(final)
        return
    if not (final / "dataset.json").is_file() and any(final.iterdir()):
        raise DataError(f"{final} exists and is not an nnU-Net dataset (no dataset.json); move it away first")
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    final.rename(old)
    new.rename(final)
    shutil.rmtree(old)


def read_rgb(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB; a file that cannot be read is one error naming it."""
    from segframe.images import read_pil

    return read_pil(path, "RGB")


def read_mask(path: Path) -> np.ndarray:
    """A binary mask (nonzero = inside) from any PIL-readable file: 0/1, 0/255, 1-bit or palette."""
    from segframe.images import read_pil

    return read_pil(path, "L") > 0


def require(paths: dict[str, Path], source: Path, what: str) -> None:
    """Raise a DataError listing every missing file of `paths`."""
    missing = sorted(str(p.relative_to(source)) for p in paths.values() if not p.is_file())
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise DataError(f"{source} is not a complete {what} folder: missing {shown}")
