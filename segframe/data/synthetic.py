"""A generated vessel-like fundus dataset, for running the pipeline when no real data is at hand.

Each image is an orange disc (the field of view) with uneven lighting and noise, and a
tree of dark branching curves that thin out from an optic-disc-like spot. It is fully
determined by the seed. It only exercises the pipeline; its scores say nothing about
real fundus images.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from scipy import ndimage

from segframe.data.common import Case, raw_root, write_dataset

DEFAULT_ID = 503
NAME = "SyntheticVessels"


def _branch(rng: np.random.Generator, canvas: list[np.ndarray], y: float, x: float, angle: float,
            width: int, length: float, depth: int) -> None:
    """Trace one curved vessel from (y, x) and recurse into thinner branches."""
    h, w = canvas[0].shape
    step = 1.0
    turn = rng.normal(0, 0.01)
    for i in range(int(length)):
        turn = 0.9 * turn + rng.normal(0, 0.006)
        angle += turn
        y, x = y + step * np.sin(angle), x + step * np.cos(angle)
        if not (0 <= y < h and 0 <= x < w):
            return
        canvas[width][int(y), int(x)] = True
        if depth > 0 and width > 0 and i > 10 and rng.random() < 0.02:
            side = rng.choice([-1, 1])
            _branch(rng, canvas, y, x, angle + side * rng.uniform(0.4, 1.0), width - 1,
                    length * rng.uniform(0.4, 0.7), depth - 1)


def make_case(rng: np.random.Generator, name: str, size: int = 256) -> Case:
    """One synthetic fundus image with its vessel label and FOV mask."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    c = (size - 1) / 2
    fov = (yy - c) ** 2 + (xx - c) ** 2 <= (0.47 * size) ** 2
    widths = 3  # centreline canvases for vessel half-widths 0..2 pixels
    canvas = [np.zeros((size, size), bool) for _ in range(widths)]
    disc_y = c + rng.uniform(-0.1, 0.1) * size
    disc_x = c + rng.choice([-1, 1]) * rng.uniform(0.15, 0.25) * size
    for k in range(rng.integers(5, 8)):
        angle = 2 * np.pi * k / 6 + rng.normal(0, 0.3)
        _branch(rng, canvas, disc_y, disc_x, angle, widths - 1, size * rng.uniform(0.5, 0.9), 4)
    vessel = np.zeros((size, size), bool)
    for half_width, centre in enumerate(canvas):
        if centre.any():
            vessel |= ndimage.distance_transform_edt(~centre) <= half_width + 0.5
    vessel &= fov
    light = 0.75 + 0.25 * np.exp(-(((yy - disc_y) ** 2 + (xx - disc_x) ** 2) / (0.25 * size) ** 2))
    light *= 1 + 0.1 * ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), size / 16) * size / 16
    base = np.array([200.0, 95.0, 45.0]) * rng.uniform(0.85, 1.1)
    darkening = 1 - 0.35 * ndimage.gaussian_filter(vessel.astype(np.float32), 0.7)
    image = base[None, None, :] * (light * darkening)[..., None]
    image += rng.normal(0, 6, image.shape)
    image[~fov] = rng.uniform(0, 4, (int((~fov).sum()), 3))
    return Case(name=name, image=np.clip(image, 0, 255).astype(np.uint8), label=vessel, fov=fov)


def _cases(prefix: str, count: int, seed: int, size: int) -> Iterator[Case]:
    for i in range(count):
        yield make_case(np.random.default_rng([seed, i]), f"{prefix}_{i:03d}", size)


def make_synthetic(raw: str | os.PathLike | None = None, dataset_id: int = DEFAULT_ID, num_train: int = 20,
                   num_test: int = 8, size: int = 256, seed: int = 0) -> Path:
    """Write a generated vessel dataset as `<raw>/DatasetXXX_SyntheticVessels`; returns its folder."""
    return write_dataset(
        raw_root(raw), dataset_id, NAME,
        train=_cases("train", num_train, seed, size),
        test=_cases("test", num_test, seed + 1, size),
        description="generated vessel-like fundus images (segframe.data.synthetic); for pipeline checks only",
        reference="generated", licence="CC0",
    )
