"""CHASE_DB1 retinal vessels -> nnU-Net raw dataset (first 20 images train, last 8 test).

CHASE_DB1 has no field-of-view masks, so one is derived from each image: red channel
above 20 (the border outside the eye is black), a 5x5 opening to drop JPEG specks, a
15x15 closing to bridge dark vessels at the rim, holes filled, largest component kept.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from scipy import ndimage

from segframe.data.common import Case, DataError, raw_root, read_mask, read_rgb, require, write_dataset

DEFAULT_ID = 502
NAME = "CHASEDB1"
SUBJECTS = [f"{n:02d}{eye}" for n in range(1, 15) for eye in "LR"]
TRAIN, TEST = SUBJECTS[:20], SUBJECTS[20:]
FOV_THRESHOLD = 20


def chase_fov(image: np.ndarray, threshold: int = FOV_THRESHOLD) -> np.ndarray:
    """Field-of-view mask of a fundus image (H, W, 3) uint8 by thresholding its red channel."""
    pad = 8  # edge padding, so the filters treat a field cut by the frame like one inside it
    mask = np.pad(image[..., 0] > threshold, pad, mode="edge")
    mask = ndimage.binary_opening(mask, structure=np.ones((5, 5), bool))
    mask = ndimage.binary_closing(mask, structure=np.ones((15, 15), bool))
    mask = ndimage.binary_fill_holes(mask)[pad:-pad, pad:-pad]
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, labels, range(1, n + 1))
        mask = labels == int(np.argmax(sizes)) + 1
    return mask


def source_files(source: Path) -> dict[str, Path]:
    """Every file the conversion needs, checked to exist."""
    if not source.is_dir():
        raise DataError(f"CHASE_DB1 folder not found: {source}")
    files = {}
    for s in SUBJECTS:
        files[f"{s}/image"] = source / f"Image_{s}.jpg"
        files[f"{s}/label"] = source / f"Image_{s}_1stHO.png"
    require(files, source, "CHASE_DB1 (Image_NNX.jpg and Image_NNX_1stHO.png for 01L..14R)")
    return files


def _cases(source: Path, subjects: list[str]) -> Iterator[Case]:
    for s in subjects:
        image = read_rgb(source / f"Image_{s}.jpg")
        second = source / f"Image_{s}_2ndHO.png"
        yield Case(
            name=f"Image_{s}",
            image=image,
            label=read_mask(source / f"Image_{s}_1stHO.png"),
            fov=chase_fov(image),
            label2=read_mask(second) if second.is_file() else None,
        )


def convert_chase(source: str | os.PathLike, raw: str | os.PathLike | None = None,
                  dataset_id: int = DEFAULT_ID) -> Path:
    """Write CHASE_DB1 from `source` as `<raw>/DatasetXXX_CHASEDB1`; returns the dataset folder."""
    source = Path(source)
    source_files(source)
    return write_dataset(
        raw_root(raw), dataset_id, NAME,
        train=_cases(source, TRAIN), test=_cases(source, TEST),
        description="CHASE_DB1 retinal vessels; labels: first observer; FOV: thresholded red channel",
        reference="Fraz et al., IEEE TBME 59(9), 2012; Owen et al., IOVS 2009",
        licence="CC BY 4.0",
    )
