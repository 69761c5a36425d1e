"""`segframe predict` and the Python `Predictor`: a trained results folder applied to ordinary image files.

Inputs are PNG (8/16-bit, gray/RGB/RGBA), JPEG, TIFF or BMP files with any name, or nnU-Net's
`CASE_XXXX.<ending>` channel files; each is converted to what the model was trained on
(`segframe.images.InputSpec`) and predicted by nnU-Net's own predictor (preprocessing, sliding
window, Gaussian weighting, mirroring, resampling back; on the CPU the window runs in one thread,
`segframe.nnunet.window`). Files in nnU-Net formats that are not
ordinary images (e.g. `.nii.gz`) are read and written by the plans' own reader/writer.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import re
import sys
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segframe.colours import colour_path, colour_table, write_colour_maps
from segframe.errors import SegframeError
from segframe.files import write_atomically
from segframe.images import IMAGE_SUFFIXES, ImageError, InputSpec, read_image, read_pil, reason
from segframe.nnunet import use_ext_trainer
from segframe.nnunet.results import ResultsFolder
from segframe.nnunet.runtime import bf16_network, emulated_bf16_note, torch_device
from segframe.nnunet.window import SegframePredictor

SPACING_2D = {"spacing": (999, 1, 1)}  # what nnU-Net's NaturalImage2DIO gives every 2D image
PRECISIONS = ("fp32", "bf16")  # the network's arithmetic at prediction (`--precision`)


@dataclass(frozen=True)
class Job:
    """One image to predict: its output name, its file(s) (several for nnU-Net channel files), ending."""

    name: str
    files: tuple[Path, ...]
    ending: str


def _ending(path: Path, file_ending: str) -> str:
    return file_ending if path.name.lower().endswith(file_ending.lower()) else path.suffix.lower()


def find_inputs(source: Path, file_ending: str) -> tuple[list[Job], list[str], list[Path]]:
    """The images of folder `source` (jobs), the names of other files there (skipped), and its symbolic
    links whose target does not exist (broken: inputs that cannot be predicted).

    `CASE_0000.<ext>` (with `CASE_0001...` for more channels) is one image named CASE, as in nnU-Net;
    any other image file is one image named after its stem.
    """
    accepted = {*IMAGE_SUFFIXES, file_ending.lower()}
    entries = sorted(p for p in source.iterdir() if not p.name.startswith("."))
    broken = [p for p in entries if p.is_symlink() and not p.exists()]
    entries = [p for p in entries if p not in broken]
    images = [p for p in entries if p.is_file() and _ending(p, file_ending) in accepted]
    if not images and broken:
        return [], [], broken
    if not images:
        held = ", ".join(p.name + ("/" if p.is_dir() else "") for p in entries[:10]) or "nothing"
        held += f" and {len(entries) - 10} more" if len(entries) > 10 else ""
        raise SegframeError(
            f"no images in input folder {source} (it holds {held}); accepted: "
            f"{', '.join(sorted(accepted))} files, with any name")
    groups: dict[tuple[str, str], list[tuple[int, Path]]] = {}
    for p in images:
        ext = _ending(p, file_ending)
        m = re.fullmatch(r"(.+)_(\d{4})", p.name[: -len(ext)])
        if m:
            groups.setdefault((m.group(1), ext), []).append((int(m.group(2)), p))
    jobs, grouped = [], set()
    for (case, ext), members in groups.items():
        members.sort()
        if [i for i, _ in members] == list(range(len(members))):
            jobs.append(Job(case, tuple(p for _, p in members), ext))
            grouped.update(p for _, p in members)
    for p in images:
        if p not in grouped:
            ext = _ending(p, file_ending)
            jobs.append(Job(p.name[: -len(ext)], (p,), ext))
    by_name: dict[str, list[Path]] = {}
    for job in jobs:
        by_name.setdefault(job.name, []).append(job.files[0])
    clashes = {n: fs for n, fs in by_name.items() if len(fs) > 1}
    if clashes:
        listing = "; ".join(f"{', '.join(f.name for f in fs)} -> {n}" for n, fs in sorted(clashes.items()))
        raise SegframeError(f"input files would write the same output: {listing}; rename one of each")
    skipped = [p.name for p in entries if p.is_dir() or p not in images]
    return sorted(jobs, key=lambda j: j.name), skipped, broken


class Predictor:
    """A trained segframe results folder as a Python object: `predict(image)` -> label map.

    `Predictor.from_results(folder)` rebuilds the model from the folder alone (no YAML) and
    wraps nnU-Net's `nnUNetPredictor` (as `SegframePredictor`: on the CPU its sliding window runs in one
    thread), so preprocessing, sliding window, mirroring and resampling are nnU-Net's. Images are
    converted to what the model was trained on as `segframe predict` does.
    """

    def __init__(self, predictor: Any, results: ResultsFolder, folds: list[int | str], checkpoint: str,
                 spec: InputSpec, notify: Callable[[str], None] | None = None):
        self.nnunet = predictor
        self.results = results
        self.model_folder = results.folder
        self.folds = folds
        self.checkpoint = checkpoint
        self.spec = spec
        self.labels = results.labels
        self.notify = notify or (lambda text: print(f"segframe: {text}", file=sys.stderr, flush=True))
        self._said: set[str] = set()
        self._lock = threading.Lock()  # `segframe predict -npp` reads images in several threads

    @classmethod
    def from_results(cls, folder: str | os.PathLike | ResultsFolder, folds: list[int | str] | None = None,
                     checkpoint: str = "checkpoint_final.pth", device: Any = "auto",
                     trust_checkpoint: bool = False, step_size: float = 0.5, mirroring: bool = True,
                     progress: bool = False, notify: Callable[[str], None] | None = None,
                     precision: str = "fp32") -> Predictor:
        """Load `folder` (TRAINER__PLANS__CONFIGURATION, or its ResultsFolder): `folds` default to every fold
        with `checkpoint`; `device` is "auto", "cpu", "cuda", "mps" or a torch.device; `trust_checkpoint`
        allows checkpoints that need full unpickling (only for files you trust); `precision` "bf16"
        runs the network under bfloat16 autocast on the CPU (see `bf16_network`)."""
        results = folder if isinstance(folder, ResultsFolder) else ResultsFolder(folder)
        chosen = results.folds(None if folds is None else [str(f) for f in folds], checkpoint)
        device = torch_device(device)
        if precision not in PRECISIONS:
            raise SegframeError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        if precision == "bf16" and device.type != "cpu":
            raise SegframeError(f"--precision bf16 is for prediction on the CPU; on {device.type} "
                                "nnU-Net's own autocast applies (fp16 on CUDA): leave --precision at fp32")
        use_ext_trainer()
        # off CUDA, nnU-Net prints that it turned off perform_everything_on_device, which we never set
        with contextlib.redirect_stdout(io.StringIO()):
            predictor = SegframePredictor(
                tile_step_size=step_size, use_gaussian=True, use_mirroring=mirroring,
                perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                allow_tqdm=progress,
            )
        results.initialize(predictor, chosen, checkpoint, trust_checkpoint)
        made = cls(predictor, results, chosen, checkpoint, results.input_spec(), notify)
        if precision == "bf16":
            bf16_network(predictor.network)
            if note := emulated_bf16_note("--precision bf16"):
                made._say([note])
        return made

    def _say(self, notes: list[str]) -> None:
        with self._lock:  # one reader thread at a time, so two notes never interleave in a line
            for note in notes:
                if note not in self._said:
                    self._said.add(note)
                    self.notify(note)

    def prepare(self, image: Any, name: str | None = None) -> tuple[np.ndarray, dict]:
        """(C, 1, H, W) float32 and nnU-Net properties from a path, a PIL image or an (H, W[, C]) array."""
        if isinstance(image, (str, os.PathLike)):
            name = name or str(image)
            array = read_image(image)
        elif hasattr(image, "mode") and hasattr(image, "getbands"):  # a PIL image
            from segframe.images import from_pil

            array = from_pil(image)
        else:
            array = np.asarray(image)
        data, notes = self.spec.convert(array, name or "image")
        self._say(notes)
        return data, dict(SPACING_2D)

    def predict(self, image: Any, probabilities: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """The label map (H, W) of `image`; with `probabilities`, also the (K, H, W) class probabilities."""
        data, props = self.prepare(image)
        seg, probs = self.run(data, props, probabilities)
        if seg.ndim == 3:  # nnU-Net's 2D layout (1, H, W), probabilities (K, 1, H, W)
            seg, probs = seg[0], None if probs is None else probs[:, 0]
        return (seg, probs) if probabilities else seg

    def run(self, data: np.ndarray, props: dict, probabilities: bool = False) -> tuple[np.ndarray, Any]:
        """nnU-Net's prediction of prepared data: (segmentation, probabilities or None), nnU-Net's shapes."""
        try:
            out = self.nnunet.predict_single_npy_array(data, props, None, None, probabilities)
        except RuntimeError as exc:  # the sliding window's float16 sum (ours on the CPU, nnU-Net's elsewhere)
            if "overflow float16" not in str(exc) and "Encountered inf in predicted array" not in str(exc):
                raise
            raise SegframeError(
                f"{self.model_folder} cannot predict: the network's logits overflow the float16 sums of "
                "nnU-Net's sliding window (inf); its weights diverged in training. Train it again with a "
                "lower train.initial_lr (`segframe train` stops a run that diverges so before saving "
                "it)") from None
        return (out[0], out[1]) if probabilities else (out, None)

    def read_job(self, job: Job) -> tuple[np.ndarray, dict]:
        """The prepared data of one input of `segframe predict`."""
        if job.ending not in IMAGE_SUFFIXES:  # an nnU-Net format: its own reader, no conversion
            reader = self.nnunet.plans_manager.image_reader_writer_class()
            try:
                data, props = reader.read_images([str(f) for f in job.files])
            except Exception as exc:
                raise ImageError(f"{job.files[0]}: cannot read the image ({reason(exc)})") from None
            if data.shape[0] != self.spec.channels:
                raise ImageError(f"{job.files[0]}: has {data.shape[0]} channel(s), the model was trained "
                                 f"on {self.spec.channels}")
            return data, props
        arrays = [read_image(f) for f in job.files]
        if len(arrays) == 1:
            return self.prepare(arrays[0], str(job.files[0]))
        shapes = {a.shape[:2] for a in arrays}
        if len(shapes) > 1:
            sizes = sorted(shapes)
            raise ImageError(f"{job.files[0]}: the channel files of {job.name} differ in size: {sizes}")
        stacked = np.concatenate([a if a.ndim == 3 else a[..., None] for a in arrays], axis=2)
        return self.prepare(stacked, str(job.files[0]))

    def write(self, job: Job, out: Path, seg: np.ndarray, probs: Any, props: dict) -> None:
        """Write a prediction as nnU-Net does: the mask (PNG for ordinary images), and probabilities. Each
        file is encoded in memory first where it can be (a writer that fails on a full disk while closing
        its own file reports that again when it is garbage-collected), then written atomically."""
        files = output_files(job, out, probs is not None)
        if job.ending in IMAGE_SUFFIXES:  # the bytes nnU-Net's NaturalImage2DIO.write_seg writes (imageio)
            import imageio.v3 as iio

            png = iio.imwrite("<bytes>", seg[0].astype(np.uint8 if np.max(seg) < 255 else np.uint16,
                                                      copy=False), extension=".png")
            write_atomically(files[0], png)
        else:
            writer = self.nnunet.plans_manager.image_reader_writer_class()
            write_atomically(files[0], lambda path: writer.write_seg(seg, str(path), props),
                             failures=(OSError, RuntimeError, ValueError))
        if probs is not None:
            import pickle

            buffer = io.BytesIO()
            np.savez_compressed(buffer, probabilities=probs)
            write_atomically(files[1], buffer.getvalue())
            write_atomically(files[2], pickle.dumps(props))


def fov_masks(folder: Path, jobs: list[Job]) -> dict[Job, Path]:
    """The field-of-view mask `<name>.png` in `folder` of each job (as `segframe data` writes fovTs);
    refused before anything runs when the folder or a mask is missing."""
    if not folder.is_dir():
        raise SegframeError(f"--fov {folder} is not a folder of field-of-view masks (<name>.png)")
    masks = {job: folder / f"{job.name}.png" for job in jobs}
    missing = [path.name for path in masks.values() if not path.is_file()]
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise SegframeError(f"--fov {folder} has no mask for {len(missing)} input(s): {shown}; each input "
                            "needs <name>.png there")
    return masks


def clear_outside(seg: np.ndarray, probs: Any, inside: np.ndarray, source: Path) -> tuple[np.ndarray, Any]:
    """nnU-Net's (1, H, W) segmentation with background (label 0) outside the field of view `inside`
    (H, W), and there probability 1 for the background."""
    if inside.shape != seg.shape[-2:]:
        raise ImageError(f"{source}: the field-of-view mask is {inside.shape[1]}x{inside.shape[0]}, the "
                         f"image {seg.shape[-1]}x{seg.shape[-2]}")
    seg = seg.copy()
    seg[..., ~inside] = 0
    if probs is not None:
        probs = np.array(probs, copy=True)
        probs[..., ~inside] = 0
        probs[0][..., ~inside] = 1
    return seg, probs


def prepare_output_folder(out: Path) -> None:
    """Create `-o` and write a file into it (removed again), so that a folder that cannot take the outputs
    is one error before any prediction."""
    import tempfile

    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".segframe-write-test-") as probe:
            probe.write(b"0")
            probe.flush()
    except OSError as exc:
        raise SegframeError(f"cannot write into the output folder {out}: {reason(exc)}") from None


def output_files(job: Job, out: Path, probabilities: bool) -> list[Path]:
    """What predicting `job` writes into `out`: the mask (PNG for ordinary images), and probabilities."""
    base = out / job.name
    ending = job.ending if job.ending not in IMAGE_SUFFIXES else ".png"
    return [Path(f"{base}{ending}")] + ([Path(f"{base}.npz"), Path(f"{base}.pkl")] if probabilities else [])


def predict_command(args: argparse.Namespace) -> int:
    """`segframe predict`: each image of -i written under its stem in -o; exit 1 if any was not predicted."""
    results = ResultsFolder(args.m)
    folds = results.folds(args.f, args.chk)
    source, out = Path(args.i), Path(args.o)
    if not source.is_dir():
        raise SegframeError(f"input folder {source} does not exist")
    if source.resolve() == out.resolve():
        raise SegframeError("-o must differ from -i: predictions would be written among the input images")
    ending = results.dataset_json.get("file_ending", ".png")
    jobs, skipped, broken = find_inputs(source, ending)
    if out.exists() and not out.is_dir():
        raise SegframeError(f"-o {out} is a file, not a folder: name a folder for the masks")
    fov = fov_masks(Path(args.fov), jobs) if args.fov else {}
    writes = {job: output_files(job, out, args.save_probabilities) for job in jobs}
    if args.colour:  # refused and replaced like the masks; a bad colour table before any prediction
        colour_table(results.dataset_json)
        writes = {job: [*files, colour_path(out, job.name)] for job, files in writes.items()}
    existing = sorted(str(p.relative_to(out)) for files in writes.values() for p in files if p.exists())
    if existing and not args.overwrite:
        shown = ", ".join(existing[:10]) + (f" and {len(existing) - 10} more" if len(existing) > 10 else "")
        raise SegframeError(
            f"output folder {out} already holds {len(existing)} file(s) this run would write: {shown}; "
            "pass --overwrite to replace them (other files are never touched) or choose another -o")
    device = torch_device(args.device)
    predictor = Predictor.from_results(
        results, folds=folds, checkpoint=args.chk, device=device, trust_checkpoint=args.trust_checkpoint,
        step_size=args.step_size, mirroring=not args.disable_tta, progress=True,
        notify=lambda text: print(f"segframe: {text}", flush=True), precision=args.precision,
    )
    if skipped:
        print(f"segframe: skipped {len(skipped)} file(s) that are not images: {', '.join(skipped[:10])}"
              + (" ..." if len(skipped) > 10 else ""), flush=True)
    failed = []
    for link in broken:
        print(f"segframe predict: error: {link}: the link is broken (it points to {os.readlink(link)}, which "
              "does not exist)", file=sys.stderr, flush=True)
        failed.append(link.name)
    prepare_output_folder(out)
    print(f"segframe: predicting {len(jobs)} image(s) {source} -> {out} with folds {folds} ({args.chk}) "
          f"on {device}", flush=True)
    with ThreadPoolExecutor(args.npp) as readers, ThreadPoolExecutor(args.nps) as writers:
        # -npp images are read ahead while the network predicts; up to -nps masks are being written
        upcoming, reads, writes = iter(jobs), deque(), deque()
        for job in itertools.islice(upcoming, args.npp):
            reads.append((job, readers.submit(predictor.read_job, job)))
        while reads:
            job, read = reads.popleft()
            following = next(upcoming, None)
            if following is not None:
                reads.append((following, readers.submit(predictor.read_job, following)))
            try:
                data, props = read.result()
            except ImageError as exc:
                print(f"segframe predict: error: {exc}", file=sys.stderr, flush=True)
                failed.append(job.files[0].name)
                continue
            seg, probs = predictor.run(data, props, args.save_probabilities)
            if fov:
                try:
                    seg, probs = clear_outside(seg, probs, read_pil(fov[job], "L") > 0, fov[job])
                except ImageError as exc:
                    print(f"segframe predict: error: {exc}", file=sys.stderr, flush=True)
                    failed.append(job.files[0].name)
                    continue
            writes.append(writers.submit(predictor.write, job, out, seg, probs, props))
            while len(writes) > args.nps:
                writes.popleft().result()
        for write in writes:
            write.result()
    done = len(jobs) + len(broken) - len(failed)
    print(f"segframe: wrote {done} prediction(s) to {out}", flush=True)
    if args.colour:
        masks = {job.name: output_files(job, out, False)[0] for job in jobs
                 if job.ending in IMAGE_SUFFIXES and job.files[0].name not in failed}
        coloured = write_colour_maps(masks, out, results.dataset_json)
        print(f"segframe: wrote {len(coloured)} colour-coded map(s) to {out / 'colour'}", flush=True)
    if failed:
        raise SegframeError(f"{len(failed)} of {len(jobs) + len(broken)} input(s) were not predicted: "
                            f"{', '.join(failed)}")
    return 0
