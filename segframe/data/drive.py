"""DRIVE retinal vessels -> nnU-Net raw dataset (training/ -> imagesTr, test/ -> imagesTs).

Reads the layout DRIVE is distributed in: `<split>/images/NN_<split>.tif`,
`<split>/1st_manual/NN_manual1.gif`, `<split>/mask/NN_<split>_mask.gif`, and
`test/2nd_manual/NN_manual2.gif` where present. The FOV masks come with the data.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

from segframe.data.common import Case, DataError, raw_root, read_mask, read_rgb, require, write_dataset

DEFAULT_ID = 501
NAME = "DRIVE"


def _numbers(source: Path, split: str) -> list[str]:
    images = source / split / "images"
    if not images.is_dir():
        raise DataError(f"{source} is not a DRIVE folder: missing {split}/images/")
    pattern = re.compile(rf"(\d+)_{split}\.tif")
    numbers = sorted(m.group(1) for p in images.iterdir() if (m := pattern.fullmatch(p.name)))
    if not numbers:
        raise DataError(f"{source} is not a DRIVE folder: no NN_{split}.tif files in {split}/images/")
    return numbers


def _paths(source: Path, split: str, n: str) -> dict[str, Path]:
    return {
        "image": source / split / "images" / f"{n}_{split}.tif",
        "label": source / split / "1st_manual" / f"{n}_manual1.gif",
        "fov": source / split / "mask" / f"{n}_{split}_mask.gif",
    }


def source_files(source: Path) -> dict[str, dict[str, list[str]]]:
    """The case numbers of each split, after checking every needed file exists."""
    if not source.is_dir():
        raise DataError(f"DRIVE folder not found: {source}")
    found = {}
    for split in ("training", "test"):
        numbers = _numbers(source, split)
        needed = {f"{split}/{n}/{k}": p for n in numbers for k, p in _paths(source, split, n).items()}
        require(needed, source, f"DRIVE ({split}/images, {split}/1st_manual, {split}/mask)")
        found[split] = numbers
    return found


def _cases(source: Path, split: str, numbers: list[str]) -> Iterator[Case]:
    for n in numbers:
        paths = _paths(source, split, n)
        second = source / split / "2nd_manual" / f"{n}_manual2.gif"
        yield Case(
            name=f"{n}_{split}",
            image=read_rgb(paths["image"]),
            label=read_mask(paths["label"]),
            fov=read_mask(paths["fov"]),
            label2=read_mask(second) if second.is_file() else None,
        )


def convert_drive(source: str | os.PathLike, raw: str | os.PathLike | None = None,
                  dataset_id: int = DEFAULT_ID) -> Path:
    """Write DRIVE from `source` as `<raw>/DatasetXXX_DRIVE`; returns the dataset folder."""
    source = Path(source)
    numbers = source_files(source)
    return write_dataset(
        raw_root(raw), dataset_id, NAME,
        train=_cases(source, "training", numbers["training"]),
        test=_cases(source, "test", numbers["test"]),
        description="DRIVE retinal vessels; labels: first observer (1st_manual); FOV: the supplied masks",
        reference="Staal et al., IEEE TMI 23(4), 2004",
        licence="see the DRIVE terms of use (not redistributable)",
    )
