"""`segframe evaluate`: vessel segmentation metrics per image and on average, inside the field of view.

Predictions and references are matched by file name without extension (nnU-Net writes
`<case>.png`); a pixel is foreground when its value is nonzero. Counts are taken only
inside the FOV mask when one is given, as retinal vessel results are usually reported.
Thin-structure metrics (docs/data.md, "Evaluation"): clDice (centerline Dice, Shit et al., CVPR
2021, scikit-image skeletons) and sensitivity on thin vessels (reference pixels of local width
<= 2 px, from the distance transform of the reference). Skeletons and widths are taken from the
whole masks; their pixels are counted inside the FOV like every other metric.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from segframe.errors import SegframeError

METRICS = ("dice", "iou", "sensitivity", "specificity", "accuracy", "cldice", "thin_sensitivity")
IMAGE_SUFFIXES = {".png", ".gif", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg"}


class EvaluationError(SegframeError):
    """Prediction, reference or FOV files are missing or do not match."""


def confusion(pred: np.ndarray, ref: np.ndarray, fov: np.ndarray | None = None) -> dict[str, int]:
    """True/false positive/negative pixel counts of binary masks, only where `fov` is true."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if pred.shape != ref.shape or (fov is not None and np.shape(fov) != ref.shape):
        shapes = [f"prediction {pred.shape}", f"reference {ref.shape}"] + (
            [f"FOV {np.shape(fov)}"] if fov is not None else [])
        raise EvaluationError(f"mask shapes differ: {' vs '.join(shapes)}")
    if fov is not None:
        fov = np.asarray(fov, bool)
        pred, ref = pred[fov], ref[fov]
    tp = int(np.count_nonzero(pred & ref))
    fp = int(np.count_nonzero(pred & ~ref))
    fn = int(np.count_nonzero(~pred & ref))
    return {"tp": tp, "fp": fp, "fn": fn, "tn": int(pred.size) - tp - fp - fn}


def _ratio(num: int, den: int, empty: float) -> float:
    return num / den if den else empty


def metrics_from_counts(c: dict[str, int]) -> dict[str, float]:
    """Dice, IoU, sensitivity, specificity, accuracy; Dice and IoU are 1 when both masks are empty,
    sensitivity (specificity) is NaN when the reference has no foreground (background)."""
    tp, fp, fn, tn = c["tp"], c["fp"], c["fn"], c["tn"]
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, 1.0),
        "iou": _ratio(tp, tp + fp + fn, 1.0),
        "sensitivity": _ratio(tp, tp + fn, math.nan),
        "specificity": _ratio(tn, tn + fp, math.nan),
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn, math.nan),
    }


def segmentation_metrics(pred: np.ndarray, ref: np.ndarray,
                         fov: np.ndarray | None = None) -> dict[str, float]:
    """All of METRICS for one binary prediction against its reference, inside `fov`."""
    return metrics_from_counts(confusion(pred, ref, fov))


def thin_vessels(ref: np.ndarray) -> np.ndarray:
    """Reference pixels of local width <= 2 px.

    With d the Euclidean distance transform of the reference (distance from a vessel pixel to the
    nearest background pixel; pixels outside the image count as background), a disc of diameter
    3 px fits where d > 1.5 (there all 8 neighbours are vessel). A pixel has local width >= 3 when
    it lies in such a disc, i.e. within the 3x3 neighbourhood of a point with d > 1.5; every other
    vessel pixel has local width <= 2 and is thin. (This is the white top-hat of the reference
    with a 3x3 square: 1- and 2-px vessels are thin, 3-px and wider are not.)
    """
    from scipy import ndimage

    ref = np.asarray(ref, bool)
    dist = ndimage.distance_transform_edt(np.pad(ref, 1))[1:-1, 1:-1]
    thick = ndimage.binary_dilation(dist > 1.5, structure=np.ones((3, 3), bool)) & ref
    return ref & ~thick


def thin_metrics(pred: np.ndarray, ref: np.ndarray, fov: np.ndarray | None = None) -> dict[str, float]:
    """clDice and thin-vessel sensitivity of one binary prediction, counted inside `fov`.

    clDice = 2 Tprec Tsens / (Tprec + Tsens) with Tprec = |S(pred) & ref| / |S(pred)| and
    Tsens = |S(ref) & pred| / |S(ref)|, S = scikit-image's `skeletonize` of the whole mask, the
    skeleton pixels counted inside `fov`. Both skeletons empty: 1; exactly one empty: 0.
    Thin-vessel sensitivity = the share of `thin_vessels(ref)` pixels inside `fov` that `pred`
    covers; NaN when there is no thin reference pixel.
    """
    from skimage.morphology import skeletonize

    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    inside = np.ones(ref.shape, bool) if fov is None else np.asarray(fov, bool)
    if pred.shape != ref.shape or inside.shape != ref.shape:
        raise EvaluationError(f"mask shapes differ: prediction {pred.shape} vs reference {ref.shape} "
                              f"vs FOV {inside.shape}")
    skel_pred, skel_ref = skeletonize(pred) & inside, skeletonize(ref) & inside
    n_pred, n_ref = int(skel_pred.sum()), int(skel_ref.sum())
    if n_pred == 0 or n_ref == 0:
        cldice = 1.0 if n_pred == n_ref else 0.0
    else:
        tprec = np.count_nonzero(skel_pred & ref) / n_pred
        tsens = np.count_nonzero(skel_ref & pred) / n_ref
        cldice = 2 * tprec * tsens / (tprec + tsens) if tprec + tsens else 0.0
    thin = thin_vessels(ref) & inside
    return {"cldice": float(cldice),
            "thin_sensitivity": _ratio(int(np.count_nonzero(thin & pred)), int(thin.sum()), math.nan)}


def _images(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise EvaluationError(f"{what} folder not found: {folder}")
    found = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    if not found:
        kinds = ", ".join(sorted(IMAGE_SUFFIXES))
        raise EvaluationError(f"no image files ({kinds}) in {what} folder {folder}")
    return found


def _read(path: Path) -> np.ndarray:
    from segframe.data.common import read_mask

    return read_mask(path)


def evaluate_folders(pred: str | Path, ref: str | Path, fov: str | Path | None = None) -> dict[str, Any]:
    """Metrics of every reference case, and their mean: {"cases": {name: {...}}, "mean": {...}}.

    Every reference case needs a prediction (and a FOV mask when `fov` is given).
    """
    refs = _images(Path(ref), "reference")
    preds = _images(Path(pred), "prediction")
    fovs = _images(Path(fov), "FOV") if fov else None
    for what, have in (("prediction", preds), ("FOV", fovs)):
        missing = [] if have is None else sorted(set(refs) - set(have))
        if missing:
            raise EvaluationError(f"no {what} for reference case(s) {', '.join(missing)}")
    cases = {}
    for name, ref_path in refs.items():
        try:
            masks = _read(preds[name]), _read(ref_path), _read(fovs[name]) if fovs else None
            counts = confusion(*masks)
        except EvaluationError as exc:  # name the case and its files
            files = [preds[name], ref_path] + ([fovs[name]] if fovs else [])
            raise EvaluationError(f"case {name}: {exc} ({', '.join(map(str, files))})") from None
        cases[name] = {**metrics_from_counts(counts), **thin_metrics(*masks), **counts}
    mean = {m: float(np.nanmean([c[m] for c in cases.values()])) for m in METRICS}
    return {"cases": cases, "mean": mean, "inside_fov": fovs is not None}


def format_table(result: dict[str, Any]) -> str:
    """A fixed-width text table, one row per case and a final mean row."""
    width = max(len("case"), *(len(n) for n in result["cases"]))
    head = f"{'case':<{width}}  " + "  ".join(f"{m:>11}" for m in METRICS)
    rows = [head, "-" * len(head)]
    for name, c in result["cases"].items():
        rows.append(f"{name:<{width}}  " + "  ".join(f"{c[m]:>11.4f}" for m in METRICS))
    rows.append("-" * len(head))
    rows.append(f"{'mean':<{width}}  " + "  ".join(f"{result['mean'][m]:>11.4f}" for m in METRICS))
    return "\n".join(rows)


def format_markdown(result: dict[str, Any]) -> str:
    """The same table in Markdown."""
    rows = ["| case | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for name, c in result["cases"].items():
        rows.append(f"| {name} | " + " | ".join(f"{c[m]:.4f}" for m in METRICS) + " |")
    rows.append("| **mean** | " + " | ".join(f"**{result['mean'][m]:.4f}**" for m in METRICS) + " |")
    return "\n".join(rows)


def json_safe(value: Any) -> Any:
    """`value` with NaN floats replaced by None, so the JSON is standard."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


def save_results(result: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """Write `metrics.json` and `metrics.csv` (one row per case, then `mean`) into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / "metrics.json", out / "metrics.csv"
    json_path.write_text(json.dumps(json_safe(result), indent=2) + "\n")
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", *METRICS, "tp", "fp", "fn", "tn"])
        for name, c in result["cases"].items():
            writer.writerow([name, *(f"{c[m]:.6f}" for m in METRICS), c["tp"], c["fp"], c["fn"], c["tn"]])
        writer.writerow(["mean", *(f"{result['mean'][m]:.6f}" for m in METRICS), "", "", "", ""])
    return json_path, csv_path


def _evaluate(args: argparse.Namespace) -> int:
    result = evaluate_folders(args.pred, args.ref, args.fov)
    where = "inside the FOV" if args.fov else "over the whole image (no --fov given)"
    print(f"{len(result['cases'])} cases, metrics {where}:")
    print(format_table(result))
    json_path, csv_path = save_results(result, args.out or args.pred)
    print(f"saved {json_path} and {csv_path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `evaluate` subcommand."""
    p = subparsers.add_parser(
        "evaluate", help="Dice, IoU, sensitivity, specificity, accuracy, clDice, thin-vessel sensitivity",
        description="Compare predicted masks with reference masks (matched by file name, nonzero = vessel), "
                    "inside the field of view when --fov is given. Prints a table and saves "
                    "metrics.json and metrics.csv.",
    )
    p.add_argument("--pred", required=True, help="folder of predicted masks, e.g. nnU-Net's output folder")
    p.add_argument("--ref", required=True, help="folder of reference masks, e.g. DatasetXXX/labelsTs")
    p.add_argument("--fov", help="folder of field-of-view masks, e.g. DatasetXXX/fovTs")
    p.add_argument("--out", help="folder for metrics.json and metrics.csv (default: the --pred folder)")
    p.set_defaults(func=_evaluate)
