"""`segframe evaluate`: vessel segmentation metrics per image and on average, inside the field of view.

Predictions and references are matched by file name without extension (nnU-Net writes
`<case>.png`); a pixel is foreground when its value is nonzero. Counts are taken only
inside the FOV mask when one is given, as retinal vessel results are usually reported.
Thin-structure metrics (docs/data.md, "Evaluation"): clDice (centerline Dice, Shit et al., CVPR
2021, scikit-image skeletons) and sensitivity on thin vessels (reference pixels of local width
<= 2 px, from the distance transform of the reference). Skeletons and widths are taken from the
whole masks; their pixels are counted inside the FOV like every other metric.
With a dataset.json of several foreground classes (`--labels`, or the one beside --ref's parent),
label maps are scored per class, with the artery/vein scores and the vessels' union (`Classes`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segframe.colours import LabelError, class_values, read_dataset, read_label_map
from segframe.errors import SegframeError
from segframe.files import write_all

METRICS = ("dice", "iou", "sensitivity", "specificity", "accuracy", "cldice", "thin_sensitivity")
CLASS_METRICS = ("dice", "iou", "sensitivity", "cldice", "thin_sensitivity")  # per class, and their mean
AV_METRICS = ("av_accuracy", "av_artery_sensitivity", "av_vein_sensitivity", "av_artery_dice",
              "av_vein_dice", "av_dice")
OUTPUTS = ("metrics.json", "metrics.csv")
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


@dataclass(frozen=True)
class Classes:
    """What several-class scoring takes from a dataset.json.

    `values`: each foreground class (not background, not the ignore label) and the label-map values
    it covers (one id, or a region's ids). `ignore`: nnU-Net's ignore label, whose reference pixels
    are left out of every per-class and A/V count. `artery`, `vein`: the ids that count as artery and
    as vein in the A/V scores (a crossing's id in both); empty when the dataset has no such classes.
    """

    values: dict[str, tuple[int, ...]]
    ignore: int | None = None
    artery: tuple[int, ...] = ()
    vein: tuple[int, ...] = ()

    def columns(self) -> list[str]:
        """The metrics of one case, in table order."""
        per_class = [f"{name}_{m}" for name in [*self.values, "mean"] for m in CLASS_METRICS]
        return per_class + (list(AV_METRICS) if self.artery else []) + [f"vessel_{m}" for m in METRICS]


def classes_from_dataset(dataset: dict[str, Any], where: str, artery: str | None = None,
                         vein: str | None = None, crossing: str | None = None) -> Classes | None:
    """The Classes of a dataset.json (read from `where`), or None for a binary dataset (one foreground
    class), which keeps the binary report. Artery, vein and crossing are the labels named `artery`,
    `vein`, `crossing`, or the names given; a name given but not a label is an error."""
    values = class_values(dataset)
    ignore = values.pop("ignore", None)
    values.pop("background", None)
    known = ", ".join(values)
    for given in (artery, vein, crossing):
        if given is not None and given not in values:
            raise EvaluationError(f"{given!r} is not a foreground label of {where} (labels: {known})")
    if len(values) < 2:
        return None
    clash = sorted({"mean", "vessel", "av"} & set(values))
    if clash:
        raise EvaluationError(f"{where}: a label named {', '.join(clash)} would clash with the report's "
                              "own columns (mean_*, vessel_*, av_*); rename it in dataset.json")
    artery, vein, crossing = artery or "artery", vein or "vein", crossing or "crossing"
    a_ids = v_ids = ()
    if artery in values and vein in values:
        both = values.get(crossing, ())
        a_ids, v_ids = tuple(sorted({*values[artery], *both})), tuple(sorted({*values[vein], *both}))
    return Classes(values, None if ignore is None else ignore[0], a_ids, v_ids)


def _mean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else math.nan


def av_metrics(pred: np.ndarray, ref: np.ndarray, scored: np.ndarray, classes: Classes) -> dict[str, float]:
    """The artery/vein scores of label maps, counted where `scored` is true.

    On the pixels both the reference and the prediction mark as artery or vein: accuracy = the share
    whose predicted type shares artery or vein with the reference's (a reference crossing is right as
    artery, vein or crossing), artery (vein) sensitivity = the share of reference artery (vein) pixels
    predicted as artery (vein). Artery (vein) Dice over all scored pixels, and their mean (A/V Dice).
    """
    a_ref, v_ref = np.isin(ref, classes.artery) & scored, np.isin(ref, classes.vein) & scored
    a_pred, v_pred = np.isin(pred, classes.artery), np.isin(pred, classes.vein)
    found = (a_ref | v_ref) & (a_pred | v_pred)
    right = found & ((a_ref & a_pred) | (v_ref & v_pred))
    a_found, v_found = found & a_ref, found & v_ref
    artery_dice = metrics_from_counts(confusion(a_pred, a_ref, scored))["dice"]
    vein_dice = metrics_from_counts(confusion(v_pred, v_ref, scored))["dice"]
    return {
        "av_accuracy": _ratio(int(right.sum()), int(found.sum()), math.nan),
        "av_artery_sensitivity": _ratio(int((a_found & a_pred).sum()), int(a_found.sum()), math.nan),
        "av_vein_sensitivity": _ratio(int((v_found & v_pred).sum()), int(v_found.sum()), math.nan),
        "av_artery_dice": artery_dice,
        "av_vein_dice": vein_dice,
        "av_dice": (artery_dice + vein_dice) / 2,
    }


def class_metrics(pred: np.ndarray, ref: np.ndarray, fov: np.ndarray | None,
                  classes: Classes) -> dict[str, float]:
    """Every column of `classes.columns()` for one pair of label maps.

    Per class (prediction and reference in the class's ids), inside `fov` without the reference's
    ignore pixels: CLASS_METRICS, and their mean over the classes; the A/V scores (`av_metrics`); the
    vessels' union (any nonzero value, ignore pixels included, as vessel): METRICS, inside `fov`.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    union = confusion(pred != 0, ref != 0, fov)  # also checks the shapes
    scored = np.ones(ref.shape, bool) if fov is None else np.asarray(fov, bool)
    if classes.ignore is not None:
        scored = scored & (ref != classes.ignore)
    result: dict[str, float] = {}
    per_class = []
    for name, ids in classes.values.items():
        p, r = np.isin(pred, ids), np.isin(ref, ids)
        m = {**metrics_from_counts(confusion(p, r, scored)), **thin_metrics(p, r, scored)}
        per_class.append(m)
        result.update({f"{name}_{k}": m[k] for k in CLASS_METRICS})
    result.update({f"mean_{k}": _mean([m[k] for m in per_class]) for k in CLASS_METRICS})
    if classes.artery:
        result.update(av_metrics(pred, ref, scored, classes))
    vessel = {**metrics_from_counts(union), **thin_metrics(pred != 0, ref != 0, fov)}
    result.update({f"vessel_{k}": vessel[k] for k in METRICS})
    return result


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


def evaluate_folders(pred: str | Path, ref: str | Path, fov: str | Path | None = None,
                     classes: Classes | None = None) -> dict[str, Any]:
    """Metrics of every reference case, and their mean: {"cases": {name: {...}}, "mean": {...}}.

    Every reference case needs a prediction (and a FOV mask when `fov` is given). Without `classes`
    a pixel is vessel when nonzero; with them the masks are label maps scored by `class_metrics`,
    and the result also holds "columns", "classes", "ignore", "artery" and "vein".
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
        files = [preds[name], ref_path] + ([fovs[name]] if fovs else [])
        try:
            if classes is None:
                masks = _read(preds[name]), _read(ref_path), _read(fovs[name]) if fovs else None
                counts = confusion(*masks)
                cases[name] = {**metrics_from_counts(counts), **thin_metrics(*masks), **counts}
            else:
                fov_mask = _read(fovs[name]) if fovs else None
                cases[name] = class_metrics(read_label_map(preds[name]), read_label_map(ref_path), fov_mask,
                                            classes)
        except EvaluationError as exc:  # name the case and its files
            raise EvaluationError(f"case {name}: {exc} ({', '.join(map(str, files))})") from None
    if classes is None:
        mean = {m: float(np.nanmean([c[m] for c in cases.values()])) for m in METRICS}
        return {"cases": cases, "mean": mean, "inside_fov": fovs is not None}
    columns = classes.columns()
    return {"cases": cases, "mean": {m: _mean([c[m] for c in cases.values()]) for m in columns},
            "inside_fov": fovs is not None, "columns": columns,
            "classes": {n: list(v) for n, v in classes.values.items()}, "ignore": classes.ignore,
            "artery": list(classes.artery), "vein": list(classes.vein)}


def _summary_columns(result: dict[str, Any]) -> list[str]:
    """The per-image table's columns of a several-class result: each class's Dice, their mean, the
    A/V accuracy and Dice, the union's Dice and clDice (the CSV and JSON hold every column)."""
    classes = [f"{n}_dice" for n in result["classes"]]
    av = ["av_accuracy", "av_dice"] if result["artery"] else []
    return [*classes, "mean_dice", *av, "vessel_dice", "vessel_cldice"]


def format_table(result: dict[str, Any]) -> str:
    """A fixed-width text table, one row per case and a final mean row (several classes: then a table
    of each class's mean metrics, and the mean A/V scores)."""
    columns = _summary_columns(result) if "classes" in result else METRICS
    size = max(11, *(len(m) for m in columns)) if "classes" in result else 11
    width = max(len("case"), *(len(n) for n in result["cases"]))
    head = f"{'case':<{width}}  " + "  ".join(f"{m:>{size}}" for m in columns)
    rows = [head, "-" * len(head)]
    for name, c in result["cases"].items():
        rows.append(f"{name:<{width}}  " + "  ".join(f"{c[m]:>{size}.4f}" for m in columns))
    rows.append("-" * len(head))
    rows.append(f"{'mean':<{width}}  " + "  ".join(f"{result['mean'][m]:>{size}.4f}" for m in columns))
    if "classes" not in result:
        return "\n".join(rows)
    names = [*result["classes"], "mean", "vessel"]
    width = max(len("class (mean)"), *(len(n) for n in names))
    head = f"{'class (mean)':<{width}}  " + "  ".join(f"{m:>16}" for m in CLASS_METRICS)
    rows += ["", head, "-" * len(head)]
    for name in names:
        rows.append(f"{name:<{width}}  " + "  ".join(f"{result['mean'][f'{name}_{m}']:>16.4f}"
                                                     for m in CLASS_METRICS))
    if result["artery"]:
        rows += ["", "A/V (mean): " + ", ".join(f"{m[3:]} {result['mean'][m]:.4f}" for m in AV_METRICS)]
    return "\n".join(rows)


def format_markdown(result: dict[str, Any]) -> str:
    """The same table in Markdown."""
    columns = _summary_columns(result) if "classes" in result else METRICS
    rows = ["| case | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, c in result["cases"].items():
        rows.append(f"| {name} | " + " | ".join(f"{c[m]:.4f}" for m in columns) + " |")
    rows.append("| **mean** | " + " | ".join(f"**{result['mean'][m]:.4f}**" for m in columns) + " |")
    return "\n".join(rows)


def json_safe(value: Any) -> Any:
    """`value` with NaN floats replaced by None, so the JSON is standard."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


def check_outputs(out: str | Path, overwrite: bool) -> None:
    """Refuse an --out that is a file, or that holds OUTPUTS already unless `overwrite`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EvaluationError(f"--out {out} is a file, not a folder; choose a folder for "
                              f"{' and '.join(OUTPUTS)}")
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not overwrite:
        raise EvaluationError(f"output folder {out} already holds {', '.join(existing)}; pass --overwrite to "
                              "replace them (other files are never touched) or choose another --out")


def save_results(result: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """Write `metrics.json` and `metrics.csv` (one row per case, then `mean`) into `out`, both or
    neither (temporary files, then renamed); an unwritable `out` is one error naming it and the cause."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EvaluationError(f"cannot write {out}: {exc.strerror or exc}") from None
    json_path, csv_path = out / OUTPUTS[0], out / OUTPUTS[1]
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    if "columns" in result:
        columns = result["columns"]
        writer.writerow(["case", *columns])
        for name, c in result["cases"].items():
            writer.writerow([name, *(f"{c[m]:.6f}" for m in columns)])
        writer.writerow(["mean", *(f"{result['mean'][m]:.6f}" for m in columns)])
    else:
        writer.writerow(["case", *METRICS, "tp", "fp", "fn", "tn"])
        for name, c in result["cases"].items():
            writer.writerow([name, *(f"{c[m]:.6f}" for m in METRICS), c["tp"], c["fp"], c["fn"], c["tn"]])
        writer.writerow(["mean", *(f"{result['mean'][m]:.6f}" for m in METRICS), "", "", "", ""])
    write_all({json_path: json.dumps(json_safe(result), indent=2) + "\n", csv_path: table.getvalue()},
              error=LabelError)
    return json_path, csv_path


def find_labels(ref: str | Path, labels: str | None) -> Path | None:
    """The dataset.json that names the classes: `labels`, else the one beside --ref's parent folder
    (DatasetXXX/labelsTs -> DatasetXXX/dataset.json), else None (a binary evaluation)."""
    if labels:
        if not Path(labels).is_file():
            raise EvaluationError(f"--labels {labels}: file not found (pass a dataset.json)")
        return Path(labels)
    beside = Path(ref).resolve().parent / "dataset.json"
    return beside if beside.is_file() else None


def _evaluate(args: argparse.Namespace) -> int:
    out = Path(args.out or args.pred)
    check_outputs(out, args.overwrite)
    labels = find_labels(args.ref, args.labels)
    classes = None if labels is None else classes_from_dataset(
        read_dataset(labels), str(labels), args.artery, args.vein, args.crossing)
    if classes is None and (args.artery or args.vein or args.crossing):
        raise EvaluationError("--artery, --vein and --crossing need a dataset.json of several classes "
                              f"({labels or 'none found: pass --labels'})")
    result = evaluate_folders(args.pred, args.ref, args.fov, classes)
    where = "inside the FOV" if args.fov else "over the whole image (no --fov given)"
    if classes is not None:
        ignore = "" if classes.ignore is None else f"; ignore label {classes.ignore} left out"
        av = (f"; A/V: artery = ids {list(classes.artery)}, vein = ids {list(classes.vein)}" if classes.artery
              else "; no artery and vein labels, so no A/V scores")
        print(f"classes from {labels}: {', '.join(classes.values)}{ignore}{av}")
    print(f"{len(result['cases'])} cases, metrics {where}:")
    print(format_table(result))
    json_path, csv_path = save_results(result, out)
    print(f"saved {json_path} and {csv_path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `evaluate` subcommand."""
    p = subparsers.add_parser(
        "evaluate", help="Dice, IoU, sensitivity, specificity, accuracy, clDice, thin-vessel sensitivity",
        description="Compare predicted masks with reference masks (matched by file name), inside the field "
                    "of view when --fov is given. Binary (nonzero = vessel) unless a dataset.json names "
                    "several classes: then per class, artery/vein and the vessels' union. Prints a table and "
                    "saves metrics.json and metrics.csv.",
    )
    p.add_argument("--pred", required=True, help="folder of predicted masks, e.g. nnU-Net's output folder")
    p.add_argument("--ref", required=True, help="folder of reference masks, e.g. DatasetXXX/labelsTs")
    p.add_argument("--fov", help="folder of field-of-view masks, e.g. DatasetXXX/fovTs")
    p.add_argument("--out", help="folder for metrics.json and metrics.csv (default: the --pred folder)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace metrics.json and metrics.csv already in the output folder")
    p.add_argument("--labels", help="dataset.json naming the classes (default: the dataset.json beside "
                                    "--ref's folder, e.g. DatasetXXX/dataset.json for DatasetXXX/labelsTs)")
    p.add_argument("--artery", help="label name of arteries in the A/V scores (default: artery)")
    p.add_argument("--vein", help="label name of veins in the A/V scores (default: vein)")
    p.add_argument("--crossing", help="label name counted as artery and as vein (default: crossing)")
    p.set_defaults(func=_evaluate)
