"""Class names and colours of a dataset.json, label maps read and coloured for a person to look at.

A label map holds class ids (0 background, 1, 2, ...). A dataset.json names them in `labels`
(name -> id, or name -> list of ids for nnU-Net's regions, whose predictions hold the ids of
`regions_class_order`) and may give each name a colour under `label_colours` (name -> [R, G, B]).
Classes without a colour get the default palette: the older fork's black, red, blue, green, then
other distinct colours.
"""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Any

import numpy as np

from segframe.errors import SegframeError
from segframe.files import read_json, write_atomically

Colour = tuple[int, int, int]
# the fork's convert_masks.py colours (background, artery, vein, other), then distinct ones
PALETTE: tuple[Colour, ...] = ((0, 0, 0), (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255),
                               (255, 255, 0), (255, 0, 255), (0, 255, 255), (255, 128, 0), (128, 0, 255))
LABEL_MODES = ("1", "L", "P", "I", "I;16")  # PIL modes whose pixel values are class ids


class LabelError(SegframeError):
    """A dataset.json's labels or colours, or a label map, cannot be used."""


def default_colour(class_id: int) -> Colour:
    """PALETTE's colour for `class_id`; past its end, hues spread by the golden ratio."""
    if class_id < len(PALETTE):
        return PALETTE[class_id]
    r, g, b = colorsys.hsv_to_rgb((class_id * 0.618034) % 1.0, 0.8, 1.0)
    return round(r * 255), round(g * 255), round(b * 255)


def read_dataset(path: str | Path) -> dict[str, Any]:
    """A dataset.json with a `labels` table; LabelError names the file and what is wrong."""
    dataset = read_json(path, "dataset.json", LabelError)
    if not isinstance(dataset.get("labels"), dict):
        raise LabelError(f"{path} has no `labels` table (name -> class id) as nnU-Net's dataset.json has")
    return dataset


def class_values(dataset: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Each name of `labels` and the label-map values it covers: (id,) or a region's ids."""
    values = {}
    for name, value in dataset["labels"].items():
        ids = value if isinstance(value, list) else [value]
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise LabelError(f"dataset.json labels: {name!r} is {value!r}, expected a class id or a list "
                             "of ids")
        values[name] = tuple(ids)
    return values


def label_names(dataset: dict[str, Any]) -> dict[int, str]:
    """The name of each id a label map (reference or prediction) holds."""
    values = class_values(dataset)
    names = {v[0]: n for n, v in values.items() if len(v) == 1}
    order = dataset.get("regions_class_order")
    if order:  # region i of `labels` (after background, before ignore) is written as order[i]
        regions = [n for n in values if n not in ("background", "ignore")]
        names.update(zip((int(i) for i in order), regions, strict=False))
    return dict(sorted(names.items()))


def colour_table(dataset: dict[str, Any]) -> dict[int, Colour]:
    """id -> colour of every id of `label_names`: `label_colours` where given, else the default palette."""
    names = label_names(dataset)
    given = dataset.get("label_colours") or {}
    unknown = sorted(set(given) - set(names.values()))
    if unknown:
        raise LabelError(f"dataset.json label_colours names {', '.join(unknown)}, which are not labels "
                         f"(labels: {', '.join(names.values())})")
    table = {}
    for class_id, name in names.items():
        colour = given.get(name, default_colour(class_id))
        if not (isinstance(colour, (list, tuple)) and len(colour) == 3
                and all(isinstance(c, int) and 0 <= c <= 255 for c in colour)):
            raise LabelError(f"dataset.json label_colours: {name!r} is {colour!r}, expected [R, G, B] "
                             "in 0-255")
        table[class_id] = tuple(colour)
    return table


def colourise(labels: np.ndarray, table: dict[int, Colour]) -> np.ndarray:
    """(H, W, 3) uint8: each pixel the colour of its id (ids missing from `table` get the default)."""
    labels = np.asarray(labels)
    if labels.size and labels.min() < 0:
        raise LabelError("a label map holds negative values")
    top = max(int(labels.max()) if labels.size else 0, *table)
    lookup = np.array([table.get(i, default_colour(i)) for i in range(top + 1)], np.uint8)
    return lookup[labels.astype(np.intp)]


def read_label_map(path: str | Path) -> np.ndarray:
    """The class ids of a label-map image (gray, palette or 16-bit PNG, ...); an RGB image is refused."""
    from PIL import Image, UnidentifiedImageError

    from segframe.images import reason

    try:
        with Image.open(path) as im:
            if im.mode not in LABEL_MODES:
                raise LabelError(f"{path}: a {im.mode} image, not a label map of class ids (0, 1, 2, ...); "
                                 "convert colour-coded masks first (segframe data folder --classes)")
            return np.asarray(im).astype(np.int64)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise LabelError(f"{path}: cannot read the image ({reason(exc)})") from None


def png_bytes(array: np.ndarray) -> bytes:
    """`array` encoded as PNG."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def colour_path(out: Path, case: str) -> Path:
    """Where `segframe predict --colour` writes the coloured map of `case`."""
    return out / "colour" / f"{case}.png"


def write_colour_maps(masks: dict[str, Path], out: Path, dataset: dict[str, Any] | Path) -> list[Path]:
    """The colour-coded PNG of each case's label map in `masks` (case -> file), as `colour_path`; the colours
    of `dataset` (a dataset.json's content, or its file)."""
    table = colour_table(dataset if isinstance(dataset, dict) else read_dataset(dataset))
    written = []
    for case, mask in masks.items():
        target = colour_path(out, case)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LabelError(f"cannot write {target.parent}: {exc.strerror or exc}") from None
        write_atomically(target, png_bytes(colourise(read_label_map(mask), table)), error=LabelError)
        written.append(target)
    return written
