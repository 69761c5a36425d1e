"""`segframe export`: a trained results folder's network as an ONNX graph, and a JSON beside it that says
what the graph expects (channels, intensity preprocessing, classes, patch size).

The results folder is loaded exactly as `segframe predict` loads it (weights-only, checked against the
plans). Padding to the patch multiple and the backbone's mean/std normalisation are part of the network,
so they are part of the graph: it takes images as nnU-Net's preprocessing leaves them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segframe.errors import SegframeError
from segframe.files import write_atomically
from segframe.nnunet.results import ResultsFolder

INPUT, OUTPUT = "image", "logits"

# What each nnU-Net normalisation scheme does to one channel of a raw image, in nnU-Net 2.8.1's
# nnunetv2/preprocessing/normalization/default_normalization_schemes.py.
SCHEMES = {
    "RGBTo01Normalization": "x / 255 (8-bit values 0..255; nnU-Net refuses values above 255)",
    "ZScoreNormalization": "(x - mean(x)) / max(std(x), 1e-8), mean and std of this channel of this image",
    "NoNormalization": "x unchanged, as float32",
    "RescaleTo01Normalization": "(x - min(x)) / max(x - min(x)), over this channel of this image",
    "CTNormalization": "clip x to [{percentile_00_5}, {percentile_99_5}], then (x - {mean}) / {std} "
                       "(the dataset's foreground intensity statistics)",
}


def load_network(model_folder: str | os.PathLike, fold: str, checkpoint: str = "checkpoint_final.pth",
                 trust: bool = False) -> tuple[nn.Module, ResultsFolder]:
    """The network of one fold in eval mode, loaded as `segframe predict` loads it (same checks and trust
    rules), and its results folder."""
    results = ResultsFolder(model_folder)
    network, _, _ = results.load(results.folds([fold], checkpoint), checkpoint, trust)
    return network.eval(), results


def _unsupported_op(exc: BaseException) -> str | None:
    """The aten operator an exporter error names, if any."""
    text = f"{exc} {exc.__cause__ or ''}"
    found = re.search(r"aten[.:]+([A-Za-z0-9_]+)", text)
    return f"aten.{found.group(1)}" if found else None


def _specialization(exc: BaseException) -> str:
    """The first guard of torch.export's constraint-violation message (what fixes the image size)."""
    lines = [line.strip(" -") for line in str(exc).splitlines() if "guard" in line or "specialized" in line]
    return lines[0] if lines else str(exc).splitlines()[0]


# onnxruntime's logits may differ from PyTorch's by this much, relative to the largest logit (at least 1):
# float32 reordering is ~1e-6 on the tiny test models; a size fixed at tracing is off by 1e-2 and more
TOLERANCE = 1e-3


class _NotDynamic(Exception):
    """Why a graph with a dynamic image size was not written (a reason a user can act on)."""


def check_sizes(patch_size: int, patch: tuple[int, int] | None) -> list[tuple[int, int]]:
    """Where a dynamic graph is checked, all far from the traced example: an odd size, nnU-Net's patch
    (12 x 12 ViT patches without one), a larger odd size (97x131, patch, 257x301 for ViT patch 16)."""
    p = patch_size
    return [(6 * p + 1, 8 * p + 3), tuple(patch) if patch else (12 * p, 12 * p), (16 * p + 1, 19 * p - 3)]


def _ort_failure(exc: BaseException) -> str:
    """onnxruntime's error as a few words: the failing operator and its message."""
    text = str(exc)
    op = re.search(r"running (\w+) node", text)
    message = re.search(r"Status Message: (.*)", text)
    detail = message.group(1) if message else (text.strip().splitlines() or [type(exc).__name__])[0]
    return f"{op.group(1)}: {detail[:150]}" if op else detail[:200]


def compare_with_pytorch(model: nn.Module, onnx_file: Path, sizes: list[tuple[int, int]],
                         batches: list[int]) -> tuple[list[dict[str, Any]], str | None]:
    """Run the graph in onnxruntime and `model` in PyTorch on the same random images (one per size and
    batch): what was measured at each size, and the first disagreement or failure as one line."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # a failing node is reported below, in one line
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    checked: list[dict[str, Any]] = []
    for (h, w), batch in zip(sizes, batches, strict=True):
        x = torch.randn(batch, int(model.in_channels), h, w, generator=generator)
        with torch.no_grad():
            expected = model(x).float().numpy()
        try:
            got = session.run(None, {INPUT: x.numpy()})[0]
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors have no common type
            return checked, f"onnxruntime cannot run the graph at {h}x{w} ({_ort_failure(exc)})"
        if got.shape != expected.shape:
            return checked, f"the graph's logits at {h}x{w} are {got.shape}, PyTorch's {expected.shape}"
        diff = float(np.abs(got - expected).max())
        checked.append({"size": [h, w], "batch": batch, "max_abs_diff": diff})
        if not diff <= TOLERANCE * max(1.0, float(np.abs(expected).max())):  # NaN disagrees too
            return checked, f"the graph's logits differ from PyTorch's by up to {diff:.2g} at {h}x{w}"
    return checked, None


def export_onnx(model: nn.Module, path: str | os.PathLike, size: tuple[int, int] | None = None,
                fallback_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """Write `model` (a ViTSegModel in eval mode) to `path` as ONNX, checked; returns what the graph
    accepts: {"dynamic_size", "size" (fixed height, width or None), "min_size" (dynamic only), "reason"
    (why the size is fixed), "checked" (size, batch and largest logit difference where onnxruntime was
    compared with PyTorch)}.

    Input `image` (batch, C, height, width) float32, output `logits` (batch, K, height, width). The batch
    is always dynamic. With `size=None`, height and width are dynamic if torch.export traces the forward
    for every size from `min_size` on and onnxruntime's logits match PyTorch's at the sizes of
    `check_sizes` (the patch is `fallback_size`); otherwise the graph is exported for `fallback_size`
    instead, with the reason, or, without one, that is an error. With `size=(h, w)` the graph takes
    exactly that size and is checked there. A graph that fails its check is never written. The file is
    written to a temporary name and renamed: `path` holds either its old content or the complete graph.

    Exporter: torch.export (the dynamo exporter). A traced graph (the legacy TorchScript exporter)
    silently keeps every shape the example input gave to Python code (e.g. the token grid a position
    embedding was resized to): it runs at other sizes and returns wrong logits. So does torch.export
    with Dim.AUTO / Dim.DYNAMIC, whose guards the ONNX graph drops (measured: logits off by 0.06 at
    257x300), and so do operators whose lowering computes numbers from the traced size without a guard
    (nn.AdaptiveAvgPool2d: onnxruntime errors or logits off by 0.08 away from the example): hence the
    check in onnxruntime. torch.onnx's graph optimizer (onnxscript) stays on although it is most of an
    export's time: the demo model's graph exported without it did not load in onnxruntime ("Duplicate
    definition of name (mean)"; torch 2.14.1).
    """
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:  # torch.onnx's exporter needs the first two, the check onnxruntime; none is segframe's
        raise SegframeError(f"exporting to ONNX needs {', '.join(missing)}: pip install {' '.join(missing)}")
    path = Path(path)
    p = int(model.patch_size)
    if size is not None:
        checked = _write_checked(model, path, tuple(size))
        return {"dynamic_size": False, "size": list(size), "reason": None, "checked": checked}
    min_side = p * getattr(model.neck, "min_tokens", 2)
    try:
        checked = _write_checked(model, path, None, min_side, fallback_size)
        return {"dynamic_size": True, "size": None, "reason": None, "min_size": [min_side, min_side],
                "checked": checked}
    except _NotDynamic as exc:
        reason = str(exc)
    if fallback_size is None:
        raise SegframeError(f"cannot export the network with a dynamic image size: {reason}") from None
    return {**export_onnx(model, path, tuple(fallback_size)), "reason": reason}


def _write_checked(model: nn.Module, path: Path, size: tuple[int, int] | None, min_side: int = 0,
                   patch: tuple[int, int] | None = None) -> list[dict[str, Any]]:
    """Export for `size` (None: dynamic from `min_side`), check the graph against PyTorch, then put it at
    `path`; what was checked. A dynamic graph that cannot be traced or fails its check raises
    _NotDynamic with the reason, a fixed one SegframeError."""
    p = int(model.patch_size)
    # the example is not a multiple of the patch, so the padding of the graph is the general one
    example = torch.rand(2, int(model.in_channels), *(size or (min_side + 3, min_side + p + 5)))
    shapes = {0: torch.export.Dim("batch", min=1)}
    if size is None:
        shapes.update({2: torch.export.Dim("height", min=min_side),
                       3: torch.export.Dim("width", min=min_side)})
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=(shapes,), strict=False)
    except Exception as exc:  # noqa: BLE001 - every tracing failure becomes one line
        violation = isinstance(exc, torch._dynamo.exc.UserError)  # the forward fixes the size
        if size is None:
            if violation:
                raise _NotDynamic(f"the network's code computes numbers from the image size "
                                  f"({_specialization(exc)})") from None
            if "Cannot create Dim" in str(exc):  # torch's solver failed to phrase the violation
                raise _NotDynamic("the network's code computes numbers from the image size (torch.export "
                                  "found conditions on the size that it cannot state as a range)") from None
            raise _NotDynamic("torch.export cannot trace the network with a symbolic image size "
                              f"({_first_line(exc)[:150]})") from None
        if violation:
            raise SegframeError(f"cannot export the network for {size[0]}x{size[1]} images with a "
                                f"dynamic batch: {_specialization(exc)}") from None
        raise _export_error(model, exc) from None
    optimizer_log = logging.getLogger("onnxscript")
    level = optimizer_log.level
    optimizer_log.setLevel(logging.ERROR)  # one "Skipping constant folding" line per Split otherwise
    try:
        with torch.no_grad():
            onnx_program = torch.onnx.export(program, (example,), dynamo=True, input_names=[INPUT],
                                             output_names=[OUTPUT], verbose=False)
    except Exception as exc:  # noqa: BLE001
        raise _export_error(model, exc) from None
    finally:
        optimizer_log.setLevel(level)
    import onnx_ir as ir  # onnxscript's IR: the exporter names symbolic dimensions s0, s1, ...

    for value in (onnx_program.model.graph.inputs[0], onnx_program.model.graph.outputs[0]):
        dims = list(value.shape)
        value.shape = ir.Shape(["batch", dims[1], *(["height", "width"] if size is None else dims[2:])])
    sizes = [size, size] if size else check_sizes(p, patch)
    batches = [1, 2] if size else [2] + [1] * (len(sizes) - 1)
    checked: list[dict[str, Any]] = []

    def save_and_check(temporary: Path) -> None:  # renamed to `path` only when it passed
        onnx_program.save(str(temporary), external_data=False)
        measured, failure = compare_with_pytorch(model, temporary, sizes, batches)
        checked.extend(measured)
        if failure and size is None:
            raise _NotDynamic(failure)
        if failure:
            raise SegframeError(f"the graph exported for {size[0]}x{size[1]} images is wrong: {failure}; "
                                "nothing was written")

    write_atomically(path, save_and_check)
    return checked


def _export_error(model: nn.Module, exc: BaseException) -> SegframeError:
    m = getattr(model, "config", None)
    what = f"decoder {m.model.decoder.name!r} on backbone {m.model.backbone.name!r}" if m else "the network"
    op = _unsupported_op(exc)
    if op:
        return SegframeError(f"cannot export {what} to ONNX: the exporter has no translation for operator "
                             f"{op} ({type(exc).__name__})")
    return SegframeError(f"cannot export {what} to ONNX: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"


def describe(results: ResultsFolder, model: nn.Module, graph: dict[str, Any], fold: str,
             checkpoint: str, onnx_name: str) -> dict[str, Any]:
    """The JSON written beside the graph: what a deployment must feed it and what comes out."""
    import segframe

    plans = results.plans_manager
    conf = results.configuration_manager
    dataset = results.dataset_json
    names = dataset.get("channel_names") or dataset.get("modality") or {}
    intensity = plans.plans.get("foreground_intensity_properties_per_channel", {})
    schemes, masks = list(conf.normalization_schemes), list(conf.use_mask_for_norm)
    channels = []
    for i, scheme in enumerate(schemes):
        raw = SCHEMES.get(scheme, f"nnU-Net's {scheme} (a custom scheme: see its run())")
        if scheme == "CTNormalization":
            raw = raw.format(**{k: intensity.get(str(i), {}).get(k) for k in
                                ("percentile_00_5", "percentile_99_5", "mean", "std")})
        if scheme == "ZScoreNormalization" and masks[i]:
            raw += "; over the nonzero region of the image only, pixels outside it set to 0"
        channels.append({"index": i, "name": names.get(str(i), ""), "scheme": scheme, "raw_to_input": raw})
    cfg = model.config.model
    inside = [f"padding bottom/right to a multiple of {model.patch_size} px (reflect) and cropping back"]
    if model.in_channels == 1:
        inside.append("the one channel repeated to three")
    if cfg.normalize == "backbone":
        inside.append(f"the backbone's normalisation (x - {list(model.backbone.mean)}) / "
                      f"{list(model.backbone.std)} per channel")
    size = ["batch", model.in_channels, "height", "width"] if graph["dynamic_size"] else \
        ["batch", model.in_channels, *graph["size"]]
    return {
        "onnx": onnx_name,
        "segframe_version": segframe.__version__,
        "input": {"name": INPUT, "shape": size, "dtype": "float32",
                  **({"min_size": graph["min_size"]} if graph["dynamic_size"] else {}),
                  **({"fixed_size_reason": graph["reason"]} if graph["reason"] else {})},
        "output": {"name": OUTPUT, "shape": ["batch", model.num_classes, *size[2:]],
                   "meaning": "class logits at every pixel: softmax over axis 1 gives probabilities, "
                              "argmax the label index"},
        "classes": dict(dataset["labels"]),
        "channels": channels,
        "preprocessing": {
            "normalization_schemes": schemes,
            "use_mask_for_norm": masks,
            "per_channel": "input channel i = raw_to_input(raw channel i), as nnU-Net preprocesses",
            "spacing": list(conf.spacing),
            "in_the_graph": inside,
        },
        "patch_size": list(conf.patch_size),
        "checked": {"what": "onnxruntime's logits against PyTorch's on random images; max_abs_diff at most "
                            f"{TOLERANCE} times the largest logit (at least 1)", "at": graph["checked"]},
        "backbone": {"name": cfg.backbone.name, "size": cfg.backbone_size},
        "decoder": cfg.decoder.name,
        "fold": fold,
        "checkpoint": checkpoint,
    }


def sidecar(path: Path) -> Path:
    """The JSON written beside `path` (model.onnx -> model.json)."""
    return path.with_suffix(".json")


def export_command(args: argparse.Namespace) -> int:
    """`segframe export`: check everything, then write the graph and its JSON (nothing on refusal)."""
    out = Path(args.o)
    if out.suffix != ".onnx":
        raise SegframeError(f"-o {out}: give the ONNX file to write, ending in .onnx")
    targets = [out, sidecar(out)]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not args.overwrite:
        raise SegframeError(f"{' and '.join(existing)} already exist(s): pass --overwrite to replace, or "
                            "choose another -o")
    if not out.parent.is_dir():
        raise SegframeError(f"-o {out}: folder {out.parent} does not exist")
    model, results = load_network(args.m, args.f, args.chk, args.trust_checkpoint)
    size = tuple(args.size) if args.size else None
    graph = export_onnx(model, out, size, fallback_size=tuple(results.configuration_manager.patch_size))
    info = describe(results, model, graph, args.f, args.chk, out.name)
    write_atomically(sidecar(out), json.dumps(info, indent=2) + "\n")
    shape = "x".join(str(s) for s in info["input"]["shape"])
    print(f"segframe: wrote {out} (input {INPUT} {shape}, output {OUTPUT}) and {sidecar(out)}", flush=True)
    at = ", ".join(f"{c['size'][0]}x{c['size'][1]}" for c in graph["checked"])
    print(f"segframe: checked in onnxruntime against PyTorch at {at}: largest logit difference "
          f"{max(c['max_abs_diff'] for c in graph['checked']):.2g}", flush=True)
    if graph["reason"]:
        print(f"segframe: no graph for every image size: {graph['reason']}; so the graph takes "
              f"{graph['size'][0]}x{graph['size'][1]} images only (nnU-Net's patch: its sliding window feeds "
              "tiles of this size)", flush=True)
    return 0
