"""Reading ordinary image files (PNG, JPEG, TIFF, BMP) and converting them to what a model was trained on.

`read_image` returns the pixels at their stored bit depth (PIL and nnU-Net's PNG reader keep only
the high byte of 16-bit colour PNGs, so those are read with SimpleITK). `InputSpec` is what the
training images were (channels and intensity range, from a results folder's `dataset.json` and
dataset fingerprint); `InputSpec.convert` turns an array into the (C, 1, H, W) float32 layout
nnU-Net's 2D reader gives, by the rule in docs/nnunet.md ("Predicting"):

- channels: gray is repeated to RGB; an alpha channel is dropped if fully opaque; RGB with three
  equal channels becomes gray; anything else that differs from the training channels is refused.
- intensities, when the training images were 8-bit (fingerprint max <= 255): 8-bit data is used as
  is; integer data of more bits is scaled to 0-255 by 255 / (2**b - 1), where b is its bit depth: the
  smallest of 8, 10, 12, 14, 16 bits (or 32) that holds the image's largest value; floats in [0, 1]
  are multiplied by 255. Negative values and floats outside [0, 1] are refused. When the training
  images were not 8-bit, values are used unscaled.

Every refusal is an `ImageError` with one line naming the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segframe.errors import SegframeError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
BIT_DEPTHS = (8, 10, 12, 14, 16, 32)


class ImageError(SegframeError):
    """An image file cannot be read, or cannot be converted safely to what the model expects."""


def reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _png_header(path: Path) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's IHDR chunk, or None if the file is not a PNG."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return head[24], head[25]


def from_pil(im: Any) -> np.ndarray:
    """Pixels of a PIL image at their stored depth: (H, W) or (H, W, C)."""
    if im.mode == "1":
        im = im.convert("L")
    elif im.mode in ("P", "PA"):
        im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
    elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("RGB")
    elif im.mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16)
    return np.asarray(im)


def read_image(path: str | Path) -> np.ndarray:
    """A 2D image file as an array (H, W) or (H, W, C) of its stored dtype; ImageError names the file."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        header = _png_header(path)
        if header and header[0] == 16 and header[1] in (2, 4, 6):  # 16-bit gray+alpha, RGB, RGBA
            import SimpleITK as sitk

            array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        elif path.suffix.lower() in (".tif", ".tiff"):
            array = _read_tiff(path)
        else:
            with Image.open(path) as im:
                if getattr(im, "n_frames", 1) > 1:
                    raise ImageError(f"{path}: has {im.n_frames} frames; a 2D image (one frame) is needed")
                im.load()
                array = from_pil(im)
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, RuntimeError, EOFError) as exc:
        raise ImageError(f"{path}: cannot read the image ({reason(exc)})") from None
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] > 4) or min(array.shape[:2]) < 1:
        raise ImageError(f"{path}: shape {array.shape} is not a 2D gray, RGB or RGBA image")
    return array


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile
    from PIL import Image

    try:
        with tifffile.TiffFile(path) as tif:
            if len(tif.pages) > 1:
                raise ImageError(f"{path}: has {len(tif.pages)} pages; a 2D image (one page) is needed")
            return tif.pages[0].asarray()
    except ImageError:
        raise
    except Exception:  # a codec tifffile lacks: PIL may still read it
        with Image.open(path) as im:
            im.load()
            return from_pil(im)


def read_pil(path: str | Path, mode: str) -> np.ndarray:
    """An image file converted by PIL to `mode` ("RGB", "L", ...); ImageError names an unreadable file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{path}: cannot read the image ({reason(exc)})") from None


def bit_depth(array: np.ndarray) -> int:
    """Bits of integer data by the documented rule: the smallest of BIT_DEPTHS that holds its max."""
    top = int(array.max()) if array.size else 0
    return next(b for b in BIT_DEPTHS if top <= 2**b - 1)


@dataclass(frozen=True)
class InputSpec:
    """What a model's training images were: channels, and whether they were 8-bit (0-255)."""

    channels: int
    eight_bit: bool = True
    low: float = 0.0
    high: float = 255.0

    @classmethod
    def from_dataset(cls, dataset: dict, fingerprint: Path) -> InputSpec:
        """From a dataset.json's content (channels) and a dataset_fingerprint.json (intensities)."""
        channels = len(dataset.get("channel_names") or dataset.get("modality") or {"0": ""})
        if not fingerprint.is_file():
            names = set((dataset.get("channel_names") or {}).values())
            return cls(channels, eight_bit=names == {"rgb_to_0_1"})
        props = json.loads(fingerprint.read_text()).get("foreground_intensity_properties_per_channel", {})
        low = min((float(p["min"]) for p in props.values()), default=0.0)
        high = max((float(p["max"]) for p in props.values()), default=255.0)
        return cls(channels, eight_bit=low >= 0 and high <= 255, low=low, high=high)

    def convert(self, array: np.ndarray, name: str) -> tuple[np.ndarray, list[str]]:
        """(C, 1, H, W) float32 for nnU-Net, and the conversions done (said by the caller once per run).

        `name` (a file name) starts every error message.
        """
        notes: list[str] = []
        array = np.asarray(array)
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3 or array.shape[2] > 4 or array.size == 0:
            raise ImageError(f"{name}: shape {array.shape} is not a 2D gray, RGB or RGBA image (H, W[, C])")
        array = self._drop_alpha(array, name, notes)
        array = self._intensities(array, name, notes)
        array = self._channels(array, name, notes)
        return np.ascontiguousarray(array.transpose(2, 0, 1)[:, None], dtype=np.float32), notes

    def _drop_alpha(self, array: np.ndarray, name: str, notes: list[str]) -> np.ndarray:
        c = array.shape[2]
        if c not in (2, 4) or self.channels == c:
            return array
        alpha = array[..., -1]
        kind = array.dtype.kind
        opaque = np.iinfo(array.dtype).max if kind in "ui" else True if kind == "b" else 1.0
        if (alpha < opaque).any():
            raise ImageError(
                f"{name}: has transparent pixels (alpha below {opaque:g}); the model was trained on "
                f"{self.channels}-channel images without alpha: flatten the image onto a background first")
        notes.append("images with an opaque alpha channel: alpha dropped")
        return array[..., :-1]

    def _channels(self, array: np.ndarray, name: str, notes: list[str]) -> np.ndarray:
        c = array.shape[2]
        if c == self.channels:
            return array
        if c == 1 and self.channels == 3:
            notes.append("gray images: the channel repeated to RGB, as the model was trained on RGB")
            return np.repeat(array, 3, axis=2)
        if c == 3 and self.channels == 1 and (array == array[..., :1]).all():
            notes.append("RGB images with three equal channels: used as gray")
            return array[..., :1]
        want = {1: "gray", 3: "RGB"}.get(self.channels, f"{self.channels} channels")
        raise ImageError(
            f"{name}: has {c} channel(s), the model was trained on {self.channels}; convert it to {want}")

    def _intensities(self, array: np.ndarray, name: str, notes: list[str]) -> np.ndarray:
        kind = array.dtype.kind
        if kind == "b":
            notes.append("1-bit images: used as 0/255")
            return array.astype(np.float32) * 255
        if kind not in "uif":
            raise ImageError(f"{name}: {array.dtype} pixels are not an image")
        low, high = (float(array.min()), float(array.max()))
        if not self.eight_bit:
            if array.dtype != np.uint8 or self.high > 255:
                notes.append(f"intensities used unscaled (training data range {self.low:g} to {self.high:g})")
            return array.astype(np.float32)
        trained = "the model was trained on 8-bit images (0-255)"
        if kind == "f":
            if not np.isfinite(array).all() or low < 0 or high > 1:
                raise ImageError(
                    f"{name}: float values from {low:g} to {high:g}, a range the training data never had "
                    f"({trained}); save it as an 8-bit image or scale it to 0-1")
            notes.append("float images in [0, 1]: multiplied by 255")
            return array.astype(np.float32) * 255
        if low < 0:
            raise ImageError(
                f"{name}: negative values (down to {low:g}), a range the training data never had "
                f"({trained}); save it as an unsigned 8- or 16-bit image")
        if array.dtype == np.uint8:
            return array
        bits = bit_depth(array)
        if bits == 8:
            notes.append(f"{array.dtype} images holding 8-bit data (largest value <= 255): used as is")
            return array.astype(np.float32)
        top = 2**bits - 1
        notes.append(f"{array.dtype} images holding {bits}-bit data (largest value <= {top}): "
                     f"scaled to 0-255 by 255/{top}")
        return array.astype(np.float64) * (255.0 / top)
