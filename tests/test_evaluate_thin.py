"""clDice and thin-vessel sensitivity against hand-made masks (values computed by hand in the
comments), the width rule of `thin_vessels`, the FOV, empty masks, and `segframe evaluate`'s outputs."""

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image
from skimage.morphology import skeletonize

from segframe.cli import main
from segframe.evaluate import segmentation_metrics, thin_metrics, thin_vessels


def t_shape() -> np.ndarray:
    """A 1-px crossbar (row 5, cols 5..24: 20 px) with a 1-px branch (col 15, rows 6..15: 10 px)."""
    t = np.zeros((25, 30), bool)
    t[5, 5:25] = True
    t[6:16, 15] = True
    return t


def bar_and_branch() -> tuple[np.ndarray, np.ndarray]:
    """A 5-px wide vessel (rows 5..9, cols 5..24: 100 px) and a 1-px branch below it (col 15,
    rows 10..19: 10 px). Returns (whole reference, the wide vessel alone)."""
    ref = np.zeros((30, 30), bool)
    ref[5:10, 5:25] = True
    wide = ref.copy()
    ref[10:20, 15] = True
    return ref, wide


def test_perfect_prediction():
    ref, _ = bar_and_branch()
    m = {**segmentation_metrics(ref, ref), **thin_metrics(ref, ref)}
    assert m["dice"] == m["cldice"] == m["thin_sensitivity"] == 1.0


def test_missed_thin_branch_of_a_one_pixel_tree():
    """Prediction = the crossbar only. A 1-px tree is its own skeleton (checked), so
    Tprec = 20/20 = 1, Tsens = 20/30 = 2/3, clDice = 2 * 1 * 2/3 / (1 + 2/3) = 0.8; every reference
    pixel is 1 px wide, so thin sensitivity = 20/30."""
    ref = t_shape()
    assert np.array_equal(skeletonize(ref), ref)
    pred = np.zeros_like(ref)
    pred[5, 5:25] = True
    m = thin_metrics(pred, ref)
    assert m["cldice"] == pytest.approx(0.8)
    assert m["thin_sensitivity"] == pytest.approx(2 / 3)


def test_missed_thin_branch_beside_a_wide_vessel():
    """Prediction = the 5-px vessel only: the thin pixels are exactly the 10 branch pixels, none
    predicted, so thin sensitivity is 0 while plain sensitivity is 100/110."""
    ref, wide = bar_and_branch()
    branch = ref & ~wide
    assert np.array_equal(thin_vessels(ref), branch)
    m = {**segmentation_metrics(wide, ref), **thin_metrics(wide, ref)}
    assert m["thin_sensitivity"] == 0.0
    assert m["sensitivity"] == pytest.approx(100 / 110)
    assert m["cldice"] < 1.0  # the branch's centerline is missed (Tprec is 1: S(pred) lies in the bar)


def test_thickened_vessel_keeps_cldice_and_thin_sensitivity():
    """Reference: a 1-px vessel (row 6, cols 5..24: 20 px). Prediction: 3 px wide around it with
    tapered ends (rows 5..7, cols 6..23, plus (6, 5) and (6, 24): 56 px), whose skeleton is row 6,
    cols 6..23 (on the reference). Tprec = 18/18, Tsens = 20/20: clDice 1, thin sensitivity 1,
    but Dice = 2 * 20 / (20 + 56) = 10/19."""
    ref = np.zeros((13, 30), bool)
    ref[6, 5:25] = True
    pred = np.zeros_like(ref)
    pred[5:8, 6:24] = True
    pred[6, 5] = pred[6, 24] = True
    assert pred.sum() == 56
    m = {**segmentation_metrics(pred, ref), **thin_metrics(pred, ref)}
    assert m["cldice"] == 1.0 and m["thin_sensitivity"] == 1.0
    assert m["dice"] == pytest.approx(10 / 19)


@pytest.mark.parametrize(("width", "thin"), [(1, True), (2, True), (3, False), (4, False), (7, False)])
def test_local_width_rule(width, thin):
    """Straight vessels of each width, one touching the image border (outside counts as background):
    1- and 2-px vessels are entirely thin, 3 px and wider entirely not."""
    for top in (0, 6):
        ref = np.zeros((20, 30), bool)
        ref[top:top + width, 4:26] = True
        assert np.array_equal(thin_vessels(ref), ref if thin else np.zeros_like(ref)), (width, top)


def test_diagonal_one_pixel_vessel_is_thin():
    ref = np.eye(20, dtype=bool) | np.eye(20, k=1, dtype=bool)  # 2 px thick staircase
    assert np.array_equal(thin_vessels(ref), ref)


def test_empty_masks_and_fov():
    empty = np.zeros((10, 10), bool)
    ref = t_shape()
    both = thin_metrics(empty, empty)
    assert both["cldice"] == 1.0 and math.isnan(both["thin_sensitivity"])
    assert thin_metrics(np.zeros_like(ref), ref) == {"cldice": 0.0, "thin_sensitivity": 0.0}
    # a FOV of rows 0..5 leaves only the crossbar: the missed branch no longer counts
    pred = np.zeros_like(ref)
    pred[5, 5:25] = True
    fov = np.zeros_like(ref)
    fov[:6] = True
    assert thin_metrics(pred, ref, fov) == {"cldice": 1.0, "thin_sensitivity": 1.0}


def test_evaluate_reports_them_in_table_json_and_csv(tmp_path, capsys):
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    ref = t_shape()
    pred = np.zeros_like(ref)
    pred[5, 5:25] = True
    Image.fromarray(ref.astype(np.uint8)).save(ref_dir / "a.png")
    Image.fromarray(pred.astype(np.uint8)).save(pred_dir / "a.png")
    Image.fromarray(ref.astype(np.uint8)).save(ref_dir / "b.png")
    Image.fromarray(ref.astype(np.uint8)).save(pred_dir / "b.png")
    assert main(["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir)]) == 0
    out = capsys.readouterr().out
    assert "cldice" in out and "thin_sensitivity" in out
    result = json.loads((pred_dir / "metrics.json").read_text())
    assert result["cases"]["a"]["cldice"] == pytest.approx(0.8)
    assert result["mean"]["cldice"] == pytest.approx(0.9)
    assert result["mean"]["thin_sensitivity"] == pytest.approx((2 / 3 + 1) / 2)
    rows = list(csv.DictReader((pred_dir / "metrics.csv").open()))
    assert float(rows[0]["cldice"]) == pytest.approx(0.8)
    assert rows[-1]["case"] == "mean" and float(rows[-1]["thin_sensitivity"]) == pytest.approx(5 / 6)
