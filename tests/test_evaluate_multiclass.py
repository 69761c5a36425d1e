"""`segframe evaluate` on label maps of several classes: every number against a hand count on an 8x8
artery/vein example, a region dataset.json, and the outputs (no silent overwrite, atomic writes)."""

import csv
import errno
import json
import os
import subprocess

import numpy as np
import pytest
from PIL import Image
from skimage.morphology import skeletonize

from segframe.cli import main
from segframe.evaluate import Classes, EvaluationError, class_metrics, classes_from_dataset

LABELS = {"background": 0, "artery": 1, "vein": 2, "crossing": 3, "ignore": 4}
# rows 1-2: an artery with a step; row 4: vein then a crossing; row 6: uncertain (ignore), then vein
REF = np.array([[0, 0, 0, 0, 0, 0, 0, 0],
                [0, 1, 1, 1, 0, 0, 0, 0],
                [0, 0, 0, 1, 1, 1, 1, 0],
                [0, 0, 0, 0, 0, 0, 0, 0],
                [0, 2, 2, 2, 2, 3, 3, 0],
                [0, 0, 0, 0, 0, 0, 0, 0],
                [0, 4, 4, 4, 2, 2, 2, 0],
                [0, 0, 0, 0, 0, 0, 0, 0]])
PRED = np.array([[0, 0, 0, 0, 0, 0, 0, 0],
                 [0, 1, 1, 1, 0, 0, 0, 0],
                 [0, 0, 0, 0, 1, 1, 2, 0],
                 [0, 0, 0, 0, 0, 0, 0, 0],
                 [0, 2, 2, 2, 0, 3, 2, 0],
                 [0, 0, 0, 0, 0, 0, 0, 0],
                 [0, 1, 1, 2, 2, 2, 2, 1],
                 [0, 0, 0, 0, 0, 0, 0, 0]])
FOV = np.ones((8, 8), bool)
FOV[6, 7] = False  # the prediction's stray artery pixel is outside the FOV

# Counted by hand. Scored pixels: the FOV without the reference's ignore pixels (6,1)-(6,3).
# Every vessel is a 1-px line, so every reference pixel is thin and each skeleton is its mask, except
# where a line steps down by a 4-connected corner: skeletonize drops (2,3) from the reference artery.
HAND = {
    # artery: ref 7 px, pred 5 (its (6,1),(6,2) are ignore pixels), TP 5, FN (2,3),(2,6)
    # clDice: Tprec 5/5, Tsens 5/6 (reference skeleton of 6 px, (2,6) missed)
    "artery_dice": 10 / 12, "artery_iou": 5 / 7, "artery_sensitivity": 5 / 7,
    "artery_cldice": 2 * (5 / 6) / (1 + 5 / 6), "artery_thin_sensitivity": 5 / 7,
    # vein: ref 7 px, pred 8 ((2,6), (4,6) wrong), TP 6, FN (4,4); Tprec 6/8, Tsens 6/7
    "vein_dice": 12 / 15, "vein_iou": 6 / 9, "vein_sensitivity": 6 / 7,
    "vein_cldice": 2 * (6 / 8) * (6 / 7) / (6 / 8 + 6 / 7), "vein_thin_sensitivity": 6 / 7,
    # crossing: ref (4,5),(4,6), pred (4,5); skeletons: 1 px and 2 px
    "crossing_dice": 2 / 3, "crossing_iou": 1 / 2, "crossing_sensitivity": 1 / 2,
    "crossing_cldice": 2 / 3, "crossing_thin_sensitivity": 1 / 2,
    # A/V, crossing = artery and vein: 14 reference vessel pixels predicted as vessel (not (2,3),
    # (4,4)); wrong type only at (2,6) (artery as vein); artery (incl. crossing) 8 of them, (2,6) and
    # (4,6) not predicted artery; vein 8, all predicted vein or crossing
    "av_accuracy": 13 / 14, "av_artery_sensitivity": 6 / 8, "av_vein_sensitivity": 8 / 8,
    # artery+crossing: ref 9, pred 6, TP 6; vein+crossing: ref 9, pred 9, TP 8
    "av_artery_dice": 12 / 15, "av_vein_dice": 16 / 18, "av_dice": (12 / 15 + 16 / 18) / 2,
    # vessels' union inside the FOV (63 px), ignore pixels as vessel: ref 19, pred 17, TP 17, FN 2
    "vessel_dice": 34 / 36, "vessel_iou": 17 / 19, "vessel_sensitivity": 17 / 19,
    "vessel_specificity": 44 / 44, "vessel_accuracy": 61 / 63,
    # skeletons: pred 17 px all on vessel; ref 18 px ((2,3) dropped), 17 predicted
    "vessel_cldice": 2 * (17 / 18) / (1 + 17 / 18), "vessel_thin_sensitivity": 17 / 19,
}
for _m in ("dice", "iou", "sensitivity", "cldice", "thin_sensitivity"):
    HAND[f"mean_{_m}"] = (HAND[f"artery_{_m}"] + HAND[f"vein_{_m}"] + HAND[f"crossing_{_m}"]) / 3


def test_the_hand_count_premises_about_skeletons():
    """What the hand count assumes of scikit-image's skeletons (the reference the code uses)."""
    for mask in (PRED == 1, PRED == 2, PRED == 3, REF == 2, REF == 3, PRED != 0):
        assert (skeletonize(mask) == mask).all()
    for mask in (REF == 1, REF != 0):
        assert list(zip(*np.nonzero(mask & ~skeletonize(mask)), strict=True)) == [(2, 3)]


def classes() -> Classes:
    found = classes_from_dataset({"labels": LABELS}, "dataset.json")
    assert found == Classes({"artery": (1,), "vein": (2,), "crossing": (3,)}, 4, (1, 3), (2, 3))
    return found


def test_every_number_matches_the_hand_count():
    got = class_metrics(PRED, REF, FOV, classes())
    assert list(got) == classes().columns()
    assert got == pytest.approx(HAND)


def test_a_region_dataset_json_gives_the_same_av_scores():
    regions = {"labels": {"background": 0, "artery": [1, 3], "vein": [2, 3], "crossing": 3, "ignore": 4},
               "regions_class_order": [1, 2, 3]}
    found = classes_from_dataset(regions, "dataset.json")
    assert found.values["artery"] == (1, 3) and found.artery == (1, 3) and found.vein == (2, 3)
    got = class_metrics(PRED, REF, FOV, found)
    for key in ("av_accuracy", "av_artery_sensitivity", "av_vein_sensitivity", "av_dice", "vessel_dice"):
        assert got[key] == pytest.approx(HAND[key]), key
    # a region is scored on its ids: artery = artery + crossing, as the A/V Dice counts it
    assert got["artery_dice"] == pytest.approx(HAND["av_artery_dice"])


def test_names_given_for_artery_and_vein_and_binary_datasets():
    renamed = {"background": 0, "a": 1, "v": 2, "x": 3, "ignore": 4}
    assert classes_from_dataset({"labels": renamed}, "d.json").artery == ()  # no A/V scores
    found = classes_from_dataset({"labels": renamed}, "d.json", artery="a", vein="v", crossing="x")
    assert class_metrics(PRED, REF, FOV, found)["av_accuracy"] == pytest.approx(HAND["av_accuracy"])
    with pytest.raises(EvaluationError, match=r"'arteries' is not a foreground label of d.json"):
        classes_from_dataset({"labels": renamed}, "d.json", artery="arteries")
    assert classes_from_dataset({"labels": {"background": 0, "vessel": 1}}, "d.json") is None


def _dataset(root, cases):
    """DatasetXXX/{labelsTs,fovTs,dataset.json} and a prediction folder, as nnU-Net lays them out."""
    for folder in ("labelsTs", "fovTs", "pred"):
        (root / folder).mkdir(parents=True)
    for name, (pred, ref) in cases.items():
        Image.fromarray(ref.astype(np.uint8)).save(root / "labelsTs" / f"{name}.png")
        Image.fromarray(pred.astype(np.uint8)).save(root / "pred" / f"{name}.png")
        Image.fromarray(FOV.astype(np.uint8) * 255).save(root / "fovTs" / f"{name}.png")
    (root / "dataset.json").write_text(json.dumps({"labels": LABELS, "file_ending": ".png"}))


def _evaluate(root, *extra):
    return main(["evaluate", "--pred", str(root / "pred"), "--ref", str(root / "labelsTs"),
                 "--fov", str(root / "fovTs"), *extra])


def test_cli_finds_the_dataset_json_and_writes_every_column(tmp_path, capsys):
    _dataset(tmp_path, {"a": (PRED, REF), "b": (REF, REF)})
    assert _evaluate(tmp_path) == 0
    out = capsys.readouterr().out
    assert f"classes from {tmp_path / 'dataset.json'}: artery, vein, crossing; ignore label 4" in out
    assert "A/V (mean): accuracy" in out
    rows = list(csv.DictReader((tmp_path / "pred" / "metrics.csv").open()))
    assert [r["case"] for r in rows] == ["a", "b", "mean"]
    assert list(rows[0])[1:] == classes().columns()
    for key, value in HAND.items():
        assert float(rows[0][key]) == pytest.approx(value, abs=1e-6), key
        assert float(rows[1][key]) == 1.0, key  # b: the prediction is the reference
        assert float(rows[2][key]) == pytest.approx((value + 1) / 2, abs=1e-6), key
    saved = json.loads((tmp_path / "pred" / "metrics.json").read_text())
    assert saved["mean"]["av_dice"] == pytest.approx((HAND["av_dice"] + 1) / 2)
    assert saved["classes"] == {"artery": [1], "vein": [2], "crossing": [3]} and saved["ignore"] == 4


def test_an_rgb_reference_is_one_clear_error(tmp_path, capsys):
    _dataset(tmp_path, {"a": (PRED, REF)})
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "labelsTs" / "a.png")
    assert _evaluate(tmp_path) == 1
    err = capsys.readouterr().err
    assert "a RGB image, not a label map" in err and len(err.strip().splitlines()) == 1


def test_existing_metrics_are_kept_unless_overwrite(tmp_path, capsys):
    _dataset(tmp_path, {"a": (PRED, REF)})
    (tmp_path / "pred" / "metrics.json").write_text("mine")
    assert _evaluate(tmp_path) == 1
    err = capsys.readouterr().err
    assert f"output folder {tmp_path / 'pred'} already holds metrics.json; pass --overwrite" in err
    assert (tmp_path / "pred" / "metrics.json").read_text() == "mine"
    assert not (tmp_path / "pred" / "metrics.csv").exists()
    assert _evaluate(tmp_path, "--overwrite") == 0
    assert "av_dice" in json.loads((tmp_path / "pred" / "metrics.json").read_text())["mean"]


@pytest.mark.parametrize("failing", ["open", "replace"])
def test_a_full_disk_leaves_no_file_and_one_line(tmp_path, capsys, monkeypatch, failing):
    _dataset(tmp_path, {"a": (PRED, REF)})
    out = tmp_path / "out"
    real_open = open

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def open_full(file, mode="r", *args, **kwargs):
        if str(file).startswith(str(out)) and "w" in mode:
            full()
        return real_open(file, mode, *args, **kwargs)

    if failing == "open":
        monkeypatch.setattr("builtins.open", open_full)
        monkeypatch.setattr("io.open", open_full)  # pathlib's
    else:
        monkeypatch.setattr(os, "replace", full)
    assert _evaluate(tmp_path, "--out", str(out)) == 1
    err = capsys.readouterr().err
    assert err.startswith("segframe evaluate: error: cannot write ") and "No space left on device" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert sorted(os.listdir(out)) == []  # neither metrics file, nor a temporary one
    monkeypatch.undo()
    assert _evaluate(tmp_path, "--out", str(out)) == 0


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nothing can be written into: permissions, or (as root, who ignores them) a read-only tmpfs."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("root without permission to mount a read-only tmpfs")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_read_only_out_is_one_line_naming_it(tmp_path, read_only_folder, capsys):
    _dataset(tmp_path, {"a": (PRED, REF)})
    for out in (read_only_folder, read_only_folder / "sub"):
        assert _evaluate(tmp_path, "--out", str(out)) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"segframe evaluate: error: cannot write {out}"), err
        assert "Read-only file system" in err or "Permission denied" in err, err
        assert len(err.strip().splitlines()) == 1
    assert os.listdir(read_only_folder) == []


def test_a_binary_dataset_json_keeps_the_binary_report(tmp_path, capsys):
    _dataset(tmp_path, {"a": ((PRED != 0) * 1, (REF != 0) * 1)})
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "vessel": 1}}))
    assert _evaluate(tmp_path) == 0
    out = capsys.readouterr().out.splitlines()
    # the binary report's table as segframe evaluate printed it before classes were read
    assert out[:2] == ["1 cases, metrics inside the FOV:", "case         dice          iou  sensitivity  "
                       "specificity     accuracy       cldice  thin_sensitivity"]
    rows = list(csv.reader((tmp_path / "pred" / "metrics.csv").open()))
    assert rows[0] == ["case", "dice", "iou", "sensitivity", "specificity", "accuracy", "cldice",
                       "thin_sensitivity", "tp", "fp", "fn", "tn"]
    assert rows[1][-4:] == ["17", "0", "2", "44"]  # the union's hand count above
