"""A folder of images and a folder of masks (+ optional FOV masks) -> nnU-Net raw dataset.

Files are matched by stem: the mask (and FOV mask) of image `N.png` is `N.<ext>` or
`N_<suffix>.<ext>` with a suffix of MASK_SUFFIXES (`N_mask.gif`, `N_label.png`, ...). Masks are
index images (pixel value = class id) or colour-coded with a class table (`ClassTable`): the
table's order gives the class ids 1..K, black (value 0) is background, and the `ignore` colour
becomes nnU-Net's ignore label K + 1. Every mask is read and checked before anything is written.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from segframe.data.common import Case, DataError, check_free, raw_root, read_mask, read_rgb, write_dataset
from segframe.images import IMAGE_SUFFIXES, ImageError, reason

DEFAULT_ID = 600
MASK_SUFFIXES = ("mask", "label", "labels", "seg", "gt", "manual", "manual1", "fov")
FILE_SUFFIXES = (*IMAGE_SUFFIXES, ".gif")
SHOWN = 10  # unknown colours listed by name in an error; the rest are counted

Colour = tuple[int, ...]  # (r, g, b), or (v,) for a gray value / index
Progress = Callable[[str], None]


@dataclass(frozen=True)
class CaseFiles:
    image: Path
    label: Path
    fov: Path | None


@dataclass(frozen=True)
class ClassTable:
    """Foreground classes (ids 1..K in order) with the mask colour of each, and the ignore colour.

    `coloured` is False for a table made from index masks' own values (no colours to store).
    """

    names: tuple[str, ...]
    colours: tuple[Colour, ...]
    ignore: Colour | None = None
    coloured: bool = True

    @classmethod
    def parse(cls, classes: Sequence[str], ignore: str | None = None) -> ClassTable:
        """From `NAME=R,G,B` (or `NAME=VALUE` for index masks) items and an `R,G,B` ignore colour."""
        names, colours = [], []
        for item in classes:
            name, sep, value = item.partition("=")
            if not sep or not name.strip():
                raise DataError(f"--classes {item!r}: expected NAME=R,G,B (or NAME=VALUE for index masks)")
            names.append(name.strip())
            colours.append(_colour(value, f"--classes {item}"))
        table = cls(tuple(names), tuple(colours), _colour(ignore, "--ignore") if ignore else None)
        table.check()
        return table

    def check(self) -> None:
        """The table's own errors: names, mixed colour kinds, a colour used twice or for background."""
        if not self.names:
            raise DataError("--classes names no class")
        for name in self.names:
            if name in ("background", "ignore") or self.names.count(name) > 1:
                raise DataError(f"class name {name!r} is reserved or given twice; choose another name")
        if len({len(c) for c in (*self.colours, *([self.ignore] if self.ignore else []))}) > 1:
            raise DataError("--classes and --ignore mix R,G,B colours with single values; use one kind")
        owners: dict[Colour, str] = {self.background: "background (black)"}
        for name, colour in zip(self.names, self.colours, strict=True):
            if colour in owners:
                raise DataError(f"--classes maps {owners[colour]} and {name} to one colour "
                                f"{_show(colour)}; each class needs its own colour")
            owners[colour] = name
        if self.ignore in owners:
            raise DataError(f"--ignore colour {_show(self.ignore)} is also {owners[self.ignore]}; "
                            f"the ignore colour must differ from every class and from black")

    @property
    def rgb(self) -> bool:
        return len(self.colours[0]) == 3

    @property
    def background(self) -> Colour:
        return (0, 0, 0) if self.rgb else (0,)

    def ids(self) -> dict[Colour, int]:
        """Label value of each colour: background 0, classes 1..K, ignore K + 1."""
        ids = {self.background: 0, **{c: i for i, c in enumerate(self.colours, 1)}}
        if self.ignore:
            ids[self.ignore] = len(self.names) + 1
        return ids

    def colour_of(self) -> dict[str, list[int]]:
        """dataset.json's `label_colours` entries: label name -> [r, g, b] (a gray value v as [v, v, v])."""
        names = ("background", *self.names, *(["ignore"] if self.ignore else []))
        return {n: list(c) * (3 // len(c)) for n, c in zip(names, self.ids(), strict=True)}


def _colour(text: str, what: str) -> Colour:
    try:
        colour = tuple(int(v) for v in text.split(","))
    except ValueError:
        colour = ()
    if len(colour) not in (1, 3) or not all(0 <= v <= 65535 for v in colour) or (
            len(colour) == 3 and max(colour) > 255):
        raise DataError(f"{what}: expected a colour R,G,B (0-255 each) or one index value, got {text!r}")
    return colour


def _show(colour: Colour) -> str:
    return ",".join(str(v) for v in colour)


def _code(colour: Colour) -> int:
    return (colour[0] << 16 | colour[1] << 8 | colour[2]) if len(colour) == 3 else colour[0]


def _decode(code: int, rgb: bool) -> Colour:
    return (code >> 16 & 255, code >> 8 & 255, code & 255) if rgb else (code,)


def natural_key(name: str) -> list:
    """Sort key putting `2` before `10`."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _files(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"{what} folder not found: {folder}")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in FILE_SUFFIXES:
            if path.stem in files:
                raise DataError(f"{folder} holds {files[path.stem].name} and {path.name}: one file per name")
            files[path.stem] = path
    if not files:
        raise DataError(f"{what} folder {folder} holds no image files ({', '.join(FILE_SUFFIXES)})")
    return files


def _image_stem(stem: str, images: dict[str, Path]) -> str:
    """The image stem a mask stem names: itself, or itself without a `_<suffix>` of MASK_SUFFIXES."""
    base, _, suffix = stem.rpartition("_")
    return base if stem not in images and base and suffix.lower() in MASK_SUFFIXES else stem


def match_files(images: Path, labels: Path, fov: Path | None = None) -> dict[str, CaseFiles]:
    """Image stem -> its files, in natural order; every file not matched is named in one error."""
    image_files = _files(images, "image")
    found: dict[str, dict[str, Path]] = {"label": {}, "fov": {}}
    problems = []
    for kind, folder in (("label", labels), ("fov", fov)):
        if folder is None:
            continue
        for stem, path in _files(folder, kind).items():
            owner = _image_stem(stem, image_files)
            if owner not in image_files:
                problems.append(f"{path.name} in {folder} (no image named {owner} in {images})")
            elif owner in found[kind]:
                problems.append(f"{path.name} and {found[kind][owner].name} in {folder} (two for {owner})")
            else:
                found[kind][owner] = path
        problems += [f"{image_files[s].name} (no {kind} mask in {folder})"
                     for s in image_files if s not in found[kind]]
    if problems:
        more = f"; and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        shown = "; ".join(problems[:SHOWN]) + more
        raise DataError(f"unmatched files: {shown}. A mask of N.png is named N.<ext> or N_<suffix>.<ext> "
                        f"with suffix {', '.join(MASK_SUFFIXES)}")
    return {s: CaseFiles(image_files[s], found["label"][s], found["fov"].get(s))
            for s in sorted(image_files, key=natural_key)}


def _open(path: Path, load: bool = True):
    """A PIL image, its pixels loaded or (load=False) only its header read; ImageError names a bad file."""
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(path)
        if load:
            im.load()
        return im
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{path}: cannot read the image ({reason(exc)})") from None


def _size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header."""
    with _open(path, load=False) as im:
        return im.size


def read_codes(path: Path, rgb: bool) -> np.ndarray:
    """A mask as (H, W) integer codes: 0xRRGGBB of its colours when `rgb`, else its index values.

    An index mask is gray, 1-bit or palette; a palette or RGB mask whose colours are all gray is read
    as those gray values, a palette mask with other colours as its palette indices.
    """
    with _open(path) as im:
        if rgb:
            a = np.asarray(im.convert("RGB")).astype(np.int64)
            return a[..., 0] << 16 | a[..., 1] << 8 | a[..., 2]
        if im.mode in ("RGB", "RGBA", "P"):
            a = np.asarray(im.convert("RGB"))
            if (a == a[..., :1]).all():
                return a[..., 0].astype(np.int64)
            if im.mode != "P":
                raise DataError(f"{path} is a colour mask: give its colours with --classes NAME=R,G,B ...")
        elif im.mode not in ("1", "L", "I", "I;16"):
            raise DataError(f"{path}: mask mode {im.mode} is neither an index nor an RGB image")
        return np.asarray(im).astype(np.int64)


@dataclass
class _Colours:
    """Pixel count and first file of every colour found in the masks."""

    count: dict[int, int]
    first: dict[int, str]


def _scan(files: dict[str, CaseFiles], rgb: bool, progress: Progress | None) -> _Colours:
    """Read every mask once: sizes against image and FOV, colours with counts."""
    found = _Colours({}, {})
    sizes = []
    if progress:
        progress(f"checking {len(files)} masks against their images (sizes, colours)")
    for stem, f in files.items():
        codes = read_codes(f.label, rgb)
        mask_size = codes.shape[::-1]
        for what, path in (("image", f.image), ("FOV mask", f.fov)):
            if path is not None and _size(path) != mask_size:
                w, h = _size(path)
                sizes.append(f"{stem}: mask {f.label.name} is {mask_size[0]}x{mask_size[1]}, "
                             f"{what} {path.name} is {w}x{h}")
        values, counts = np.unique(codes, return_counts=True)
        for v, n in zip(values.tolist(), counts.tolist(), strict=True):
            found.count[v] = found.count.get(v, 0) + n
            found.first.setdefault(v, f.label.name)
    if sizes:
        raise DataError("masks and images differ in size: " + "; ".join(sizes))
    return found


def _index_table(found: _Colours, ignore: str | None) -> ClassTable:
    """Classes class_1..class_K from index masks' values 1..K (each must occur)."""
    ignore_colour = _colour(ignore, "--ignore") if ignore else None
    values = set(found.count) - {0, ignore_colour[0] if ignore_colour else None}
    top = max(values, default=0)
    missing = sorted(set(range(1, top + 1)) - values)
    if not values or missing:
        shown = ", ".join(str(v) for v in sorted(values)[:SHOWN])
        raise DataError(f"the index masks hold values {shown or 'only 0'}, not the class ids 1..K"
                        f"{f' (missing {missing[:SHOWN]})' if missing else ''}; name their values with "
                        f"--classes NAME=VALUE ... (e.g. --classes vessel=255)")
    table = ClassTable(tuple(f"class_{v}" for v in range(1, top + 1)), tuple((v,) for v in range(1, top + 1)),
                       ignore_colour, coloured=False)
    table.check()
    return table


def _mapping(table: ClassTable, found: _Colours, nearest: bool) -> tuple[dict[int, int], int]:
    """Code -> label value of every colour found, and the pixels mapped by nearest colour."""
    ids = {_code(c): i for c, i in table.ids().items()}
    unknown = sorted((c for c in found.count if c not in ids), key=lambda c: -found.count[c])
    if unknown and not nearest:
        listed = "; ".join(f"{_show(_decode(c, table.rgb))} ({found.count[c]} px, first in {found.first[c]})"
                           for c in unknown[:SHOWN])
        rest = unknown[SHOWN:]
        more = f"; and {len(rest)} more ({sum(found.count[c] for c in rest)} px)" if rest else ""
        raise DataError(
            f"{len(unknown)} mask colours are not in the class table: {listed}{more}. Add them to --classes "
            f"(or --ignore); if they are anti-aliasing or JPEG artefacts, --nearest-colour maps every pixel "
            f"to the nearest colour of the table (black and --ignore included)")
    mapping = dict(ids)
    if unknown:
        known = np.array([c for c in table.ids()], float)
        for code in unknown:
            distance = ((known - np.array(_decode(code, table.rgb), float)) ** 2).sum(1)
            mapping[code] = list(table.ids().values())[int(np.argmin(distance))]
    return mapping, sum(found.count[c] for c in unknown)


def parse_regions(items: Sequence[str]) -> dict[str, list[str]]:
    """`NAME=CLASS+CLASS` items -> {name: [classes]}."""
    regions: dict[str, list[str]] = {}
    for item in items:
        name, sep, members = item.partition("=")
        if not sep or not name.strip() or not members.strip() or name.strip() in regions:
            raise DataError(f"--region {item!r}: expected NAME=CLASS+CLASS..., each NAME once")
        regions[name.strip()] = [m.strip() for m in members.split("+")]
    return regions


def dataset_labels(table: ClassTable, regions: dict[str, list[str]] | None) -> tuple[dict, list[int] | None]:
    """dataset.json's `labels`, and `regions_class_order` for region-based training (else None).

    A region is named after the class its pixels get back at prediction. nnU-Net writes the regions
    in `regions_class_order` one after the other, so they are ordered widest first, and every class
    must come back as itself from the regions that hold it.
    """
    class_id = {n: i for i, n in enumerate(table.names, 1)}
    ignore = {"ignore": len(table.names) + 1} if table.ignore else {}
    if not regions:
        return {"background": 0, **class_id, **ignore}, None
    for name, members in regions.items():
        unknown = [m for m in (name, *members) if m not in class_id]
        if unknown:
            raise DataError(f"--region {name}: {', '.join(unknown)} is not a class of --classes "
                            f"({', '.join(table.names)}); a region is named after a class")
    order = sorted(regions, key=lambda n: -len(set(regions[n])))
    for cls in table.names:
        back = next((r for r in reversed(order) if cls in regions[r]), None)
        if back != cls:
            raise DataError(f"with these regions a pixel of class {cls} would be predicted as "
                            f"{back or 'background'}; give {cls} a region of its own (--region {cls}={cls})")
    labels = {"background": 0, **{r: sorted(class_id[m] for m in set(regions[r])) for r in order}, **ignore}
    return labels, [class_id[r] for r in order]


def _split(stems: list[str], test_names: Sequence[str] | None, test_fraction: float, seed: int) -> set[str]:
    if test_names is not None:
        test = {n if n in stems else Path(n).stem for n in test_names}
        unknown = sorted(test - set(stems), key=natural_key)
        if unknown:
            raise DataError(f"test list names cases with no image: {', '.join(unknown[:SHOWN])}")
    else:
        if not 0 <= test_fraction < 1:
            raise DataError(f"--test-fraction must be at least 0 and below 1, got {test_fraction}")
        rng = np.random.default_rng(seed)
        test = set(rng.choice(stems, round(test_fraction * len(stems)), replace=False).tolist())
    if len(test) == len(stems):
        raise DataError("the test split takes every case; leave some for training")
    return test


def read_test_list(path: str | os.PathLike) -> list[str]:
    """Case names from a file, one a line (a file name's extension is dropped); blank and # lines skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise DataError(f"cannot read the test list {path}: {reason(exc)}") from None
    return [s for line in lines if (s := line.split("#")[0].strip())]


def rescale(case: Case, scale: float) -> Case:
    """`case` resized by `scale`: the image with PIL's antialiased bilinear filter, label and FOV masks by
    nearest neighbour (class ids stay class ids)."""
    if scale == 1:
        return case
    h, w = case.image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))

    def resize(array: np.ndarray, resample: Image.Resampling) -> np.ndarray:
        return np.asarray(Image.fromarray(array).resize(size, resample))

    return Case(name=case.name, image=resize(case.image, Image.Resampling.BILINEAR),
                label=resize(case.label, Image.Resampling.NEAREST),
                fov=None if case.fov is None else resize(case.fov, Image.Resampling.NEAREST))


def _cases(files: dict[str, CaseFiles], stems: list[str], split: str, table: ClassTable,
           mapping: dict[int, int], progress: Progress | None, counter: list[int],
           scale: float = 1.0) -> Iterator[Case]:
    keys = np.array(sorted(mapping))
    values = np.array([mapping[k] for k in keys.tolist()], np.uint16)
    for stem in stems:
        f = files[stem]
        counter[0] += 1
        if progress:
            progress(f"writing [{counter[0]}/{len(files)}] {stem} ({split})")
        codes = read_codes(f.label, table.rgb)
        unique, inverse = np.unique(codes.ravel(), return_inverse=True)
        pos = np.searchsorted(keys, unique).clip(max=len(keys) - 1)
        if (keys[pos] != unique).any():
            raise DataError(f"{f.label} changed while converting (a colour not seen before); run again")
        label = values[pos][inverse].reshape(codes.shape)
        yield rescale(Case(name=stem, image=read_rgb(f.image), label=label,
                           fov=read_mask(f.fov) if f.fov else None), scale)


def convert_folder(
    images: str | os.PathLike,
    labels: str | os.PathLike,
    fov: str | os.PathLike | None = None,
    raw: str | os.PathLike | None = None,
    dataset_id: int = DEFAULT_ID,
    name: str | None = None,
    classes: Sequence[str] | None = None,
    ignore: str | None = None,
    nearest_colour: bool = False,
    test_names: Sequence[str] | None = None,
    test_fraction: float = 0.0,
    seed: int = 0,
    regions: Sequence[str] | None = None,
    progress: Progress | None = None,
    scale: float = 1.0,
    description: str = "",
    reference: str = "",
    licence: str = "",
) -> Path:
    """Write `<raw>/DatasetXXX_<name>` from folders of images, masks and FOV masks; returns its folder.

    `classes` and `ignore` use the command's syntax (`artery=255,0,0`, `255,255,255`); without
    `classes` the masks are index masks whose values 1..K are the class ids. `test_names` (case
    names) or `test_fraction` of the cases drawn with `seed` go to imagesTs/labelsTs. `regions`
    (`artery=artery+crossing`, ...) writes nnU-Net's region-based labels. `scale` resizes every case
    (`rescale`), e.g. 0.5 for large fundus images on a small machine.
    """
    if not 0 < scale <= 1:
        raise DataError(f"--scale {scale}: give a factor in (0, 1], e.g. 0.5 for half the width and height")
    images, labels = Path(images), Path(labels)
    name = name or images.resolve().parent.name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
        raise DataError(f"dataset name {name!r}: use letters, digits, - and _ (pass --name)")
    root = raw_root(raw)
    check_free(root, dataset_id, name)
    table = ClassTable.parse(classes, ignore) if classes else None
    region_items = parse_regions(regions) if regions else None
    files = match_files(images, labels, Path(fov) if fov else None)
    test = _split(list(files), test_names, test_fraction, seed)
    found = _scan(files, table.rgb if table else False, progress)
    table = table or _index_table(found, ignore)
    mapping, remapped = _mapping(table, found, nearest_colour)
    label_dict, order = dataset_labels(table, region_items)
    extra = {}
    if order:
        extra["regions_class_order"] = order
    if table.coloured:
        colours = table.colour_of()
        extra["label_colours"] = {n: colours[n] for n in label_dict}
    if progress:
        pixels = {}
        for code, n in found.count.items():
            pixels[mapping[code]] = pixels.get(mapping[code], 0) + n
        names = ("background", *table.names, *(["ignore"] if table.ignore else []))
        progress("label pixels: " + ", ".join(f"{n} {pixels.get(i, 0)}" for i, n in enumerate(names)))
        if remapped:
            progress(f"--nearest-colour: {remapped} pixels of colours outside the table took the nearest")
    counter = [0]
    train_stems = [s for s in files if s not in test]
    test_stems = [s for s in files if s in test]
    return write_dataset(
        root, dataset_id, name,
        train=_cases(files, train_stems, "training", table, mapping, progress, counter, scale),
        test=_cases(files, test_stems, "test", table, mapping, progress, counter, scale),
        description=(description or f"converted by segframe data folder from {images} and {labels}")
        + (f"; resized by {scale:g}" if scale != 1 else ""),
        reference=reference, licence=licence, labels=label_dict, extra=extra,
    )
