"""Vessel metrics: a hand-counted example, scikit-learn on random masks, folder matching and outputs."""

import csv
import json

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from segframe.cli import main
from segframe.evaluate import EvaluationError, confusion, evaluate_folders, segmentation_metrics


def test_hand_counted_example():
    ref = np.array([[1, 1, 0, 0],
                    [1, 0, 0, 0],
                    [0, 0, 0, 1]])
    pred = np.array([[1, 0, 1, 0],
                     [1, 0, 0, 0],
                     [0, 0, 1, 1]])
    fov = np.ones_like(ref)
    fov[2, 3] = 0  # drops one true positive
    # inside the FOV: TP (0,0),(1,0); FN (0,1); FP (0,2),(2,2); TN the other 6
    assert confusion(pred, ref, fov) == {"tp": 2, "fp": 2, "fn": 1, "tn": 6}
    m = segmentation_metrics(pred, ref, fov)
    assert m["dice"] == pytest.approx(4 / 7)
    assert m["iou"] == pytest.approx(2 / 5)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(6 / 8)
    assert m["accuracy"] == pytest.approx(8 / 11)
    assert segmentation_metrics(pred, ref)["accuracy"] == pytest.approx(9 / 12)


def test_matches_sklearn_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(5):
        ref, pred, fov = rng.random((3, 37, 41)) < [[[0.2]], [[0.3]], [[0.7]]]
        y, p = ref[fov], pred[fov]
        m = segmentation_metrics(pred, ref, fov)
        assert m["dice"] == pytest.approx(skm.f1_score(y, p))
        assert m["iou"] == pytest.approx(skm.jaccard_score(y, p))
        assert m["sensitivity"] == pytest.approx(skm.recall_score(y, p))
        assert m["specificity"] == pytest.approx(skm.recall_score(y, p, pos_label=False))
        assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, p))


def test_empty_masks():
    empty = np.zeros((4, 4), bool)
    m = segmentation_metrics(empty, empty)
    assert m["dice"] == 1 and m["iou"] == 1 and np.isnan(m["sensitivity"]) and m["specificity"] == 1
    with pytest.raises(EvaluationError, match="shapes differ"):
        confusion(empty, np.zeros((4, 5)))


def _save(mask, path, scale=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * scale).save(path)


def _folders(tmp_path, names=("a", "b", "c")):
    rng = np.random.default_rng(1)
    truth = {}
    for name in names:
        ref, pred, fov = rng.random((3, 30, 20)) < [[[0.2]], [[0.25]], [[0.8]]]
        _save(pred, tmp_path / "pred" / f"{name}.png")  # 0/1, as nnU-Net writes
        _save(ref, tmp_path / "ref" / f"{name}.png", 255)  # 0/255
        _save(fov, tmp_path / "fov" / f"{name}.png", 255)
        truth[name] = segmentation_metrics(pred, ref, fov)
    (tmp_path / "pred" / "dataset.json").write_text("{}")  # nnU-Net leaves files like this beside
    return truth


def test_folders_and_outputs(tmp_path):
    truth = _folders(tmp_path)
    result = evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "fov")
    assert list(result["cases"]) == ["a", "b", "c"]
    for name, m in truth.items():
        for key, value in m.items():
            assert result["cases"][name][key] == pytest.approx(value)
    assert result["mean"]["dice"] == pytest.approx(np.mean([m["dice"] for m in truth.values()]))

    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"),
                 "--fov", str(tmp_path / "fov"), "--out", str(tmp_path / "out")]) == 0
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["mean"]["iou"] == pytest.approx(result["mean"]["iou"])
    rows = list(csv.DictReader((tmp_path / "out" / "metrics.csv").open()))
    assert [r["case"] for r in rows] == ["a", "b", "c", "mean"]
    assert float(rows[1]["specificity"]) == pytest.approx(truth["b"]["specificity"], abs=1e-6)


def test_missing_prediction_is_named(tmp_path, capsys):
    _folders(tmp_path)
    (tmp_path / "pred" / "b.png").unlink()
    with pytest.raises(EvaluationError, match="no prediction for reference case.* b"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref")
    assert main(["evaluate", "--pred", str(tmp_path / "nowhere"), "--ref", str(tmp_path / "ref")]) == 1
    assert "prediction folder not found" in capsys.readouterr().err
