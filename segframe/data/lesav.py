"""LES-AV retinal arteries and veins -> nnU-Net raw dataset: `data folder` with LES-AV's colours and split.

Images keep their native size (21 at 1620x1444, one at 2196x1958). Labels: artery 1, vein 2,
crossing 3 (artery over vein), and the white vessel pixels of uncertain type as nnU-Net's ignore
label 4; with `regions`, artery = {artery, crossing} and vein = {vein, crossing} (nnU-Net's regions).
"""

from __future__ import annotations

import os
from pathlib import Path

from segframe.data.common import DataError, require
from segframe.data.folder import Progress, convert_folder

DEFAULT_ID = 504
NAME = "LESAV"
CLASSES = ("artery=255,0,0", "vein=0,0,255", "crossing=0,255,0")
IGNORE = "255,255,255"
REGIONS = ("artery=artery+crossing", "vein=vein+crossing", "crossing=crossing")
TRAIN = ("111", "119", "12", "15", "33", "34", "37", "42", "49", "53", "90")
TEST = ("224", "240", "275", "279", "304", "318", "367", "370", "486", "529", "586")


def source_files(source: Path) -> None:
    """Check that `source` holds every LES-AV file the conversion reads."""
    if not source.is_dir():
        raise DataError(f"LES-AV folder not found: {source}")
    files = {}
    for n in TRAIN + TEST:
        files[f"{n}/image"] = source / "images" / f"{n}.png"
        files[f"{n}/label"] = source / "arteries-and-veins" / f"{n}.png"
        files[f"{n}/fov"] = source / "masks" / f"{n}_mask.gif"
    require(files, source, "LES-AV (images/N.png, arteries-and-veins/N.png, masks/N_mask.gif)")


def convert_lesav(source: str | os.PathLike, raw: str | os.PathLike | None = None,
                  dataset_id: int = DEFAULT_ID, regions: bool = False,
                  progress: Progress | None = None, scale: float = 1.0) -> Path:
    """Write LES-AV from `source` as `<raw>/DatasetXXX_LESAV`; returns the dataset folder."""
    source = Path(source)
    source_files(source)
    return convert_folder(
        source / "images", source / "arteries-and-veins", fov=source / "masks", raw=raw,
        dataset_id=dataset_id, name=NAME, classes=CLASSES, ignore=IGNORE, test_names=TEST,
        regions=REGIONS if regions else None, progress=progress, scale=scale,
        description="LES-AV retinal arteries and veins; uncertain vessel pixels are the ignore label; "
                    "FOV: the supplied masks",
        reference="Orlando et al., MICCAI 2018",
        licence="scientific use only, no commercial use (see the dataset's README.txt)",
    )
