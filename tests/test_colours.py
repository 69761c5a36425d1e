"""Colour tables from a dataset.json, coloured label maps (against hand-written colours), label-map
reading, and atomic writes of the coloured maps."""

import errno
import json
import os

import numpy as np
import pytest
from PIL import Image

from segframe.colours import (
    LabelError,
    colour_table,
    colourise,
    label_names,
    read_label_map,
    write_colour_maps,
)

LESAV = {"labels": {"background": 0, "artery": 1, "vein": 2, "crossing": 3, "ignore": 4},
         "label_colours": {"background": [0, 0, 0], "artery": [255, 0, 0], "vein": [0, 0, 255],
                           "crossing": [0, 255, 0], "ignore": [255, 255, 255]}}
REGIONS = {"labels": {"background": 0, "artery": [1, 3], "vein": [2, 3], "crossing": 3, "ignore": 4},
           "regions_class_order": [1, 2, 3]}
LABELS = np.array([[0, 1, 2],
                   [3, 4, 1]])


def test_the_dataset_table_colours_each_pixel():
    got = colourise(LABELS, colour_table(LESAV))
    black, red, blue, green, white = (0, 0, 0), (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)
    assert got.dtype == np.uint8 and got.tolist() == [[list(black), list(red), list(blue)],
                                                      [list(green), list(white), list(red)]]


def test_without_a_table_the_forks_colours_then_distinct_ones():
    plain = {"labels": {"background": 0, "a": 1, "b": 2, "c": 3, "d": 4, "e": 5}}
    table = colour_table(plain)
    # the older fork's convert_masks.py: background black, 1 red, 2 blue, 3 green
    assert [table[i] for i in range(4)] == [(0, 0, 0), (255, 0, 0), (0, 0, 255), (0, 255, 0)]
    assert len(set(table.values())) == 6
    half = colour_table({**plain, "label_colours": {"b": [1, 2, 3]}})  # only some names given
    assert half[2] == (1, 2, 3) and half[1] == (255, 0, 0)
    many = colourise(np.arange(40).reshape(4, 10), table).reshape(-1, 3)  # ids past the palette
    assert len({tuple(c) for c in many}) == 40


def test_region_predictions_hold_the_ids_of_regions_class_order():
    assert label_names(REGIONS) == {0: "background", 1: "artery", 2: "vein", 3: "crossing", 4: "ignore"}
    table = colour_table({**REGIONS, "label_colours": LESAV["label_colours"]})
    assert table == {0: (0, 0, 0), 1: (255, 0, 0), 2: (0, 0, 255), 3: (0, 255, 0), 4: (255, 255, 255)}


@pytest.mark.parametrize(("colours", "message"), [
    ({"arteries": [255, 0, 0]}, "label_colours names arteries, which are not labels"),
    ({"artery": [255, 0]}, r"'artery' is \[255, 0\], expected \[R, G, B\] in 0-255"),
    ({"artery": [256, 0, 0]}, r"'artery' is \[256, 0, 0\]"),
])
def test_a_bad_table_is_one_clear_error(colours, message):
    with pytest.raises(LabelError, match=message):
        colour_table({**LESAV, "label_colours": colours})


def test_label_maps_are_read_as_ids_and_rgb_is_refused(tmp_path):
    Image.fromarray(LABELS.astype(np.uint8)).save(tmp_path / "gray.png")
    palette = Image.fromarray(LABELS.astype(np.uint8), mode="P")
    palette.putpalette([255, 255, 255, 0, 0, 0] * 128)  # index 0 drawn white: the ids still count
    palette.save(tmp_path / "palette.png")
    for name in ("gray.png", "palette.png"):
        assert read_label_map(tmp_path / name).tolist() == LABELS.tolist()
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(LabelError, match=r"rgb.png: a RGB image, not a label map"):
        read_label_map(tmp_path / "rgb.png")


def _maps(tmp_path):
    (tmp_path / "masks").mkdir()
    Image.fromarray(LABELS.astype(np.uint8)).save(tmp_path / "masks" / "a.b.png")
    (tmp_path / "dataset.json").write_text(json.dumps(LESAV))
    return {"a.b": tmp_path / "masks" / "a.b.png"}


def test_write_colour_maps_names_them_by_case(tmp_path):
    written = write_colour_maps(_maps(tmp_path), tmp_path / "out", tmp_path / "dataset.json")
    assert written == [tmp_path / "out" / "colour" / "a.b.png"]
    assert np.asarray(Image.open(written[0]))[0, 1].tolist() == [255, 0, 0]
    assert os.listdir(tmp_path / "out" / "colour") == ["a.b.png"]


def test_a_full_disk_leaves_no_coloured_map(tmp_path, monkeypatch):
    masks = _maps(tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(LabelError, match=r"cannot write .*a\.b\.png: No space left on device$"):
        write_colour_maps(masks, tmp_path / "out", tmp_path / "dataset.json")
    assert os.listdir(tmp_path / "out" / "colour") == []


def test_class_overlay_marks_each_kind_of_pixel_and_draws_a_legend():
    from segframe import demo

    image = np.full((2, 4, 3), 100, np.uint8)
    truth = np.array([[1, 2, 0, 4],
                      [3, 1, 2, 0]])
    pred = np.array([[1, 1, 2, 0],
                     [3, 0, 2, 0]])
    fov = np.ones((2, 4), bool)
    fov[1, 3] = False
    classes = {i: (name, tuple(LESAV["label_colours"][name])) for i, name in enumerate(LESAV["labels"])}
    picture = demo.overlay(image, truth, pred, fov, classes, ignore=4)
    width = 4 * 4 + 3 * 8
    # the panels, then the legend: 7 entries, one per 24-px row in this narrow picture
    assert picture.shape == (2 + 7 * 24, width, 3)
    panels = picture[:2]
    assert panels[:, 12:16].tolist() == colourise(truth, colour_table(LESAV)).tolist()  # truth
    assert panels[:, 24:28].tolist() == colourise(pred, colour_table(LESAV)).tolist()  # prediction
    errors = panels[:, -4:].tolist()
    # right artery, vein as artery (other class), false vessel, ignore (image dimmed by 0.6)
    assert errors[0] == [[255, 0, 0], [255, 255, 0], [255, 0, 255], [60, 60, 60]]
    # right crossing, missed artery, right vein, background outside the FOV (0.6 * 0.4)
    assert errors[1] == [[0, 255, 0], [0, 255, 255], [0, 0, 255], [24, 24, 24]]
    legend = {tuple(c) for c in picture[2:].reshape(-1, 3)}
    for colour in [(255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 0), (255, 0, 255), (0, 255, 255)]:
        assert colour in legend  # each entry's square
    assert (0, 0, 0) in legend  # the names' text
