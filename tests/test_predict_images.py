"""`segframe predict` on the image files users have, and the Python `Predictor` that matches it.

Conversions are checked against hand computations and nnU-Net's own PNG reader; one tiny trained
results folder (the session's UperNet run on the disc world, 1 epoch x 2 iterations: the point is input
handling, not quality) is shared by the end-to-end tests, one per row of issue 14's table.
"""

import json
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunet_discs import NAME, segframe
from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window
from PIL import Image

from segframe.images import ImageError, InputSpec, read_image

# ------------------------------------------------------------------ conversions, no model needed

RGB = InputSpec(channels=3)


def test_eight_bit_rgb_png_matches_nnunet_reader(tmp_path):
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO

    rgb = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    ours, notes = RGB.convert(read_image(tmp_path / "a.png"), "a.png")
    theirs, props = NaturalImage2DIO().read_images([str(tmp_path / "a.png")])
    assert notes == [] and ours.dtype == theirs.dtype and np.array_equal(ours, theirs)


def test_sixteen_bit_rgb_png_is_read_at_full_depth_and_scaled_by_its_bit_depth(tmp_path):
    data = np.random.default_rng(1).integers(0, 4096, (6, 5, 3)).astype(np.uint16)
    data[0, 0, 0] = 4095
    sitk.WriteImage(sitk.GetImageFromArray(data, isVector=True), str(tmp_path / "deep.png"))
    assert np.asarray(Image.open(tmp_path / "deep.png")).max() <= 16  # PIL keeps only the high byte
    array = read_image(tmp_path / "deep.png")
    assert array.dtype == np.uint16 and np.array_equal(array, data)
    out, notes = RGB.convert(array, "deep.png")
    expected = data.transpose(2, 0, 1)[:, None] * (255 / 4095)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert notes == ["uint16 images holding 12-bit data (largest value <= 4095): scaled to 0-255 by 255/4095"]


@pytest.mark.parametrize(("top", "bits"), [(255, 8), (256, 10), (1023, 10), (16383, 14), (65535, 16)])
def test_bit_depth_rule(top, bits):
    array = np.array([[0, top]], np.uint16)
    out, notes = InputSpec(channels=1).convert(array, "x")
    assert out.max() == pytest.approx(top * 255 / (2**bits - 1))
    assert f"{bits}-bit data" in notes[0]


def test_channel_conversions_and_refusals():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out, notes = RGB.convert(gray, "g.png")
    assert np.array_equal(out, np.stack([gray] * 3)[:, None].astype(np.float32)) and "gray" in notes[0]
    rgba = np.dstack([np.stack([gray] * 3, -1), np.full((3, 4), 255, np.uint8)])
    out_rgba, notes = RGB.convert(rgba, "a.png")
    assert np.array_equal(out_rgba, out) and "opaque alpha" in notes[0]
    rgba[1, 1, 3] = 254
    with pytest.raises(ImageError, match=r"^a\.png: has transparent pixels"):
        RGB.convert(rgba, "a.png")
    with pytest.raises(ImageError, match=r"^f\.tif: float values from 0 to 3, a range the training data"):
        RGB.convert(np.array([[0.0, 3.0]], np.float32), "f.tif")
    with pytest.raises(ImageError, match="negative values"):
        RGB.convert(np.array([[-1, 3]], np.int16), "s.tif")
    color = np.random.default_rng(0).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    with pytest.raises(ImageError, match="has 3 channel"):
        InputSpec(channels=1).convert(color, "c.png")
    same, _ = InputSpec(channels=1).convert(np.stack([gray] * 3, -1), "s.png")
    assert np.array_equal(same, gray[None, None].astype(np.float32))


def test_unreadable_files_are_one_line_errors(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:2000])
    (tmp_path / "text.png").write_text("not an image")
    for name in ("cut.png", "text.png"):
        with pytest.raises(ImageError) as info:
            read_image(tmp_path / name)
        message = str(info.value)
        assert message.startswith(f"{tmp_path / name}: cannot read the image (") and "\n" not in message


# ------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def trained(disc_world, trained_runs, tmp_path_factory):
    """A tiny trained segframe results folder, the env to run commands in, and test images."""
    env, folder = disc_world, trained_runs["upernet"][0]
    root = tmp_path_factory.mktemp("predict")
    images = root / "images"
    images.mkdir()
    rgb = np.asarray(Image.open(Path(env["nnUNet_raw"], NAME, "imagesTs", "ts_000_0000.png")))
    Image.fromarray(rgb).save(images / "plain.png")                                   # no _0000 suffix
    Image.fromarray(rgb).save(images / "scan_0000.jpg", quality=95)                   # JPEG, nnU-Net name
    deep = np.round(rgb.astype(np.float64) * 4095 / 255).astype(np.uint16)            # 12-bit in 16-bit RGB
    sitk.WriteImage(sitk.GetImageFromArray(deep, isVector=True), str(images / "deep.png"))
    flipped = sitk.GetImageFromArray(deep[::-1].copy(), isVector=True)
    sitk.WriteImage(flipped, str(images / "deep flipped.png"))
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])).save(images / "opaque.png")
    gray = rgb[..., 1]
    Image.fromarray(gray).save(images / "gray.bmp")                                   # gray into an RGB model
    Image.fromarray(gray.astype(np.uint16) * 257).save(images / "gray16.tif")         # 16-bit grayscale
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:8] = 0
    Image.fromarray(np.dstack([rgb, alpha])).save(images / "see_through.png")
    Image.fromarray(rgb).save(images / "broken.png")
    (images / "broken.png").write_bytes((images / "broken.png").read_bytes()[:200])
    (images / "notes.txt").write_text("the user's own notes")
    return env, folder, images, rgb


GOOD = ["deep", "deep flipped", "gray", "gray16", "opaque", "plain", "scan"]


@pytest.fixture(scope="module")
def predicted(trained, tmp_path_factory):
    """One `segframe predict` over the mixed folder into an output folder holding the user's files."""
    env, folder, images, _ = trained
    out = tmp_path_factory.mktemp("out")
    (out / "keep.txt").write_text("mine")
    done = segframe(env, "predict", "-i", images, "-o", out, "-m", folder, "-f", "0", "-device", "cpu",
                    "--save_probabilities", check=False)
    return done, out


def errors_of(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith("segframe predict: error:")]


def test_predict_takes_ordinary_images_and_tells_the_truth(predicted):
    done, out = predicted
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "FutureWarning" not in done.stderr, done.stderr
    errors = errors_of(done)
    assert len(errors) == 3, done.stderr
    assert "broken.png: cannot read the image (" in errors[0]
    assert "see_through.png: has transparent pixels" in errors[1]
    assert "2 of 9 input(s) were not predicted: broken.png, see_through.png" in errors[-1]
    assert sorted(p.stem for p in out.glob("*.png")) == GOOD
    assert (out / "keep.txt").read_text() == "mine"
    # every conversion said once per run
    for note in ("uint16 images holding 12-bit data (largest value <= 4095): scaled to 0-255 by 255/4095",
                 "gray images: the channel repeated to RGB",
                 "images with an opaque alpha channel: alpha dropped",
                 "skipped 1 file(s) that are not images: notes.txt"):
        assert done.stdout.count(note) == 1, (note, done.stdout)
    assert "in_channels" not in done.stdout + done.stderr
    assert "perform_everything_on_device" not in done.stdout  # nnU-Net's line about an option we never set


def probs(out: Path, name: str) -> np.ndarray:
    return np.load(out / f"{name}.npz")["probabilities"][:, 0]


def logit_quantum(folder: Path, shape: tuple[int, int]) -> np.ndarray:
    """Per pixel, the float16 step of nnU-Net's sliding-window logits (hand computation).

    nnU-Net sums Gaussian-weighted tile logits in float16 and divides by the summed weights. Where
    the weight is tiny (1.1e-6 at a tile's corner, so at the image's corners) the product is a
    float16 subnormal, a multiple of 2**-24: the logit there is known only to 2**-24 / weight
    (0.053 at pixel (0, 0) of this 64x64 image with 42x42 tiles). Elsewhere float16's relative
    step 2**-11 bounds it: 2**-9 allows logits up to 4 in magnitude (this model's are near 0).
    """
    patch = json.loads((folder / "plans.json").read_text())["configurations"]["2d"]["patch_size"]
    gaussian = compute_gaussian(tuple(patch), 1 / 8, 10, torch.float16, torch.device("cpu")).float().numpy()
    weight = np.zeros(shape)
    rows, columns = compute_steps_for_sliding_window(shape, patch, 0.5)
    for y in rows:
        for x in columns:
            weight[y:y + patch[0], x:x + patch[1]] += gaussian
    return 2.0**-24 / weight + 2.0**-9


def assert_same_prediction(actual: np.ndarray, desired: np.ndarray, folder: Path, atol: float) -> None:
    """Two-class probabilities equal within `atol` plus what nnU-Net's float16 logits allow: each
    logit off by a quantum q moves the softmax by at most 2q * p(1-p) <= q / 2."""
    bound = atol + logit_quantum(folder, desired.shape[1:]) / 2
    worst = np.abs(actual - desired) - bound
    where = np.unravel_index(worst.argmax(), worst.shape)
    assert (worst <= 0).all(), f"exceeds the bound by {worst.max():.3g} at {where}"


def test_logit_quantum_explains_the_corner():
    """The bound is real: one float16 step of a corner logit is 2**-24 / 1.13e-6, about 0.053."""
    corner = compute_gaussian((42, 42), 1 / 8, 10, torch.float16, torch.device("cpu"))[0, 0]
    logits = torch.tensor([0.10, 0.12, 0.15])
    stored = (logits * corner).half().float() / corner.float()  # what nnU-Net's accumulation keeps
    assert stored[0] == stored[1] and 0.05 < stored[2] - stored[0] < 0.056


def test_conversions_give_the_prediction_of_the_original(trained, predicted):
    _, folder, _, _ = trained
    _, out = predicted
    plain = probs(out, "plain")
    assert plain.shape[0] == 2 and np.allclose(plain.sum(0), 1, atol=1e-4)
    np.testing.assert_allclose(probs(out, "opaque"), plain, atol=1e-6)                # alpha dropped exactly
    assert_same_prediction(probs(out, "deep"), plain, folder, atol=2e-3)              # 12-bit rescaled
    np.testing.assert_allclose(probs(out, "gray16"), probs(out, "gray"), atol=1e-6)   # 16-bit gray = 8-bit
    assert not np.allclose(probs(out, "gray"), plain, atol=1e-3)                      # gray is another input
    with open(out / "plain.pkl", "rb") as f:
        assert pickle.load(f)["spacing"] == (999, 1, 1)  # nnU-Net's properties, as its export saves them


def test_output_folder_is_safe(trained, predicted):
    env, folder, images, _ = trained
    _, out = predicted
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    done = segframe(env, "predict", "-i", images, "-o", out, "-m", folder, "-f", "0", "-device", "cpu",
                    check=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "already holds 7 file(s) this run would write: deep flipped.png, deep.png" in done.stderr
    assert "--overwrite" in done.stderr and "keep.txt" not in done.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_overwrite_replaces_only_what_the_run_writes_and_exits_zero(trained, predicted, tmp_path):
    env, folder, images, _ = trained
    _, out = predicted
    good = tmp_path / "good"
    good.mkdir()
    for name in ("plain.png", "scan_0000.jpg"):
        (good / name).write_bytes((images / name).read_bytes())
    (out / "plain.png").write_bytes(b"old")
    npz = (out / "plain.npz").stat().st_mtime_ns
    done = segframe(env, "predict", "-i", good, "-o", out, "-m", folder, "-device", "cpu", "--overwrite")
    assert done.returncode == 0 and "wrote 2 prediction(s)" in done.stdout
    assert np.asarray(Image.open(out / "plain.png")).shape == (64, 64)
    assert (out / "keep.txt").read_text() == "mine" and (out / "plain.npz").stat().st_mtime_ns == npz


def test_serial_run_writes_what_the_threaded_default_wrote(trained, predicted, tmp_path):
    """The fixture ran with the default -npp 3 -nps 3; one reader and one writer give the same files,
    errors and notes in the same order (no job is paired with another job's prediction)."""
    env, folder, images, _ = trained
    threaded, out = predicted
    serial = segframe(env, "predict", "-i", images, "-o", tmp_path / "serial", "-m", folder, "-f", "0",
                      "-device", "cpu", "--save_probabilities", "-npp", "1", "-nps", "1", check=False)
    assert serial.returncode == 1
    assert errors_of(serial) == errors_of(threaded) and len(errors_of(serial)) == 3
    assert sorted(p.name for p in (tmp_path / "serial").iterdir()) == sorted(
        p.name for p in out.iterdir() if p.name != "keep.txt")
    for name in GOOD:
        assert np.array_equal(np.asarray(Image.open(tmp_path / "serial" / f"{name}.png")),
                              np.asarray(Image.open(out / f"{name}.png"))), name
        np.testing.assert_allclose(probs(tmp_path / "serial", name), probs(out, name), atol=1e-6)
    def notes(done):  # each conversion note once, whichever reader thread met it first
        return sorted(line for line in done.stdout.splitlines() if line.startswith("segframe: ")
                      and not line.startswith(("segframe: predicting", "segframe: wrote")))
    assert notes(serial) == notes(threaded) and len(notes(serial)) >= 4
    bad = segframe(env, "predict", "-i", images, "-o", tmp_path / "x", "-m", folder, "-npp", "0", check=False)
    assert bad.returncode == 2 and "-npp: must be at least 1, got 0" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "x").exists()


def test_no_images_is_an_error_listing_the_folder(trained, tmp_path):
    env, folder, _, _ = trained
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "readme.md").write_text("x")
    (tmp_path / "in" / "sub").mkdir()
    done = segframe(env, "predict", "-i", tmp_path / "in", "-o", tmp_path / "o", "-m", folder,
                    "-device", "cpu", check=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "no images in input folder" in done.stderr and "readme.md, sub/" in done.stderr
    assert ".jpg" in done.stderr and ".png" in done.stderr and ".tif" in done.stderr
    assert not (tmp_path / "o").exists()


# another process: the same ops, summed in another order where the threads differ (nnU-Net caps its
# network's at nnUNet_def_n_proc, the CLI sets the rest to the CPU count), so float32's last bits
FLOAT_NOISE = 1e-4


def assert_labels_of_cli(labels: np.ndarray, out: Path, name: str) -> None:
    """labels are what `segframe predict` wrote for `name`, wherever its probabilities are further from
    a tie than float noise (nearly everywhere)."""
    reference = probs(out, name)
    clear = np.abs(reference[1] - reference[0]) > 2 * FLOAT_NOISE
    assert clear.mean() > 0.9
    assert np.array_equal(labels[clear], np.asarray(Image.open(out / f"{name}.png"))[clear])


def test_python_api_matches_segframe_predict(trained, predicted):
    import segframe

    _, folder, images, rgb = trained
    _, out = predicted
    notes = []
    predictor = segframe.Predictor.from_results(folder, folds=[0], device="cpu", notify=notes.append)
    labels, probabilities = predictor.predict(images / "plain.png", probabilities=True)
    assert labels.shape == (64, 64) and probabilities.shape == (2, 64, 64)
    np.testing.assert_allclose(probabilities, probs(out, "plain"), atol=FLOAT_NOISE)
    assert_labels_of_cli(labels, out, "plain")
    assert np.array_equal(predictor.predict(rgb), labels)                                    # numpy (H, W, C)
    with Image.open(images / "opaque.png") as im:
        assert np.array_equal(predictor.predict(im), labels)                                 # PIL RGBA
    assert_labels_of_cli(predictor.predict(images / "gray.bmp"), out, "gray")
    assert notes.count("gray images: the channel repeated to RGB, as the model was trained on RGB") == 1
    with pytest.raises(ImageError, match="see_through.png: has transparent pixels"):
        predictor.predict(images / "see_through.png")


def test_bf16_prediction_runs_the_network_in_bfloat16_and_keeps_the_labels(trained, predicted, monkeypatch):
    """precision="bf16" (`segframe predict --precision bf16`): the network's matrix products run in
    bfloat16 (a hook on a Linear sees its output dtype), nnU-Net receives float32 logits, and the
    probabilities stay within bfloat16's rounding of fp32's (8 bits of mantissa: ~0.4% of a logit),
    with fp32's labels wherever fp32 is further from a tie than that. A CPU without native bfloat16 is
    told."""
    import segframe
    import segframe.nnunet.runtime as runtime
    from segframe.errors import SegframeError

    _, folder, images, _ = trained
    _, out = predicted
    monkeypatch.setattr(runtime, "native_bf16", lambda: False)
    notes = []
    predictor = segframe.Predictor.from_results(folder, folds=[0], device="cpu", precision="bf16",
                                                notify=notes.append)
    assert any("no native bfloat16" in note for note in notes)
    network = predictor.nnunet.network
    linear = next(m for m in network.modules() if isinstance(m, torch.nn.Linear))
    seen = []
    hooks = [linear.register_forward_hook(lambda m, i, o: seen.append(("linear", o.dtype))),
             network.register_forward_hook(lambda m, i, o: seen.append(("network", o.dtype)))]
    labels, probabilities = predictor.predict(images / "plain.png", probabilities=True)
    for hook in hooks:
        hook.remove()
    assert ("linear", torch.bfloat16) in seen and ("linear", torch.float32) not in seen
    # the module's own output is bf16 under autocast; the instance forward hands nnU-Net float32
    logits = network(torch.zeros(1, 3, 48, 48))
    assert logits.dtype == torch.float32
    reference = probs(out, "plain")
    off = np.abs(probabilities - reference)
    assert 0 < off.max() < 0.02, off.max()  # bfloat16 rounding shows, and stays small (seen: 0.0015)
    # a label can change only where fp32's two probabilities are closer than bf16 moved them. The model is
    # an unseeded 2-iteration run, so how many pixels sit near a tie differs from run to run: no share
    # of them is asserted, only that the labels off every near-tie pixel are fp32's
    clear = np.abs(reference[1] - reference[0]) > 2 * off.max() + 2 * FLOAT_NOISE
    assert clear.any() and np.array_equal(labels[clear], reference.argmax(0)[clear])
    with pytest.raises(SegframeError, match="precision 'fp16': use one of fp32, bf16"):
        segframe.Predictor.from_results(folder, folds=[0], device="cpu", precision="fp16")
    with pytest.raises(SegframeError, match="--precision bf16 is for prediction on the CPU; on cuda"):
        segframe.Predictor.from_results(folder, folds=[0], device=torch.device("cuda"), precision="bf16")


# ------------------------------------------------------------------ corrupted files elsewhere

def corrupt(path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, format="PNG")
    path.write_bytes(path.read_bytes()[:1500])


def test_segframe_data_names_a_corrupted_image(tmp_path, capsys):
    from segframe.cli import main
    from segframe.data.chase import SUBJECTS

    source = tmp_path / "CHASEDB1"
    source.mkdir()
    image = np.full((24, 24, 3), 120, np.uint8)
    for s in SUBJECTS:
        Image.fromarray(image).save(source / f"Image_{s}.jpg")
        Image.fromarray(np.zeros((24, 24), np.uint8)).save(source / f"Image_{s}_1stHO.png")
    corrupt(source / "Image_03R_1stHO.png")
    code = main(["data", "chase", "--source", str(source), "--raw", str(tmp_path / "raw")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"{source / 'Image_03R_1stHO.png'}: cannot read the image (" in err


def test_segframe_evaluate_names_a_corrupted_mask_and_a_mismatched_case(tmp_path, capsys):
    from segframe.cli import main

    for folder in ("pred", "ref"):
        (tmp_path / folder).mkdir()
        for case in ("a", "b"):
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / folder / f"{case}.png")
    Image.fromarray(np.zeros((8, 9), np.uint8)).save(tmp_path / "pred" / "b.png")
    code = main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "case b: mask shapes differ: prediction (8, 9) vs reference (8, 8)" in err
    corrupt(tmp_path / "pred" / "a.png")
    code = main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref")])
    err = capsys.readouterr().err
    assert code == 1 and f"{tmp_path / 'pred' / 'a.png'}: cannot read the image (" in err
    assert len(err.strip().splitlines()) == 1, err


def test_colour_writes_each_mask_coloured_from_the_dataset_table_and_refuses_overwrites(trained, tmp_path):
    import shutil

    env, folder, images, _ = trained
    copy = tmp_path / folder.name  # the shared results folder with a colour table in its dataset.json
    shutil.copytree(folder, copy)
    dataset = json.loads((copy / "dataset.json").read_text())
    names = list(dataset["labels"])
    table = {names[0]: [10, 20, 30], names[1]: [200, 100, 0]}
    (copy / "dataset.json").write_text(json.dumps({**dataset, "label_colours": table}))
    good = tmp_path / "in"
    good.mkdir()
    for name in ("plain.png", "gray.bmp"):
        (good / name).write_bytes((images / name).read_bytes())
    out = tmp_path / "out"
    args = ("predict", "-i", good, "-o", out, "-m", copy, "-device", "cpu", "--disable_tta", "--colour")
    done = segframe(env, *args)
    assert f"wrote 2 colour-coded map(s) to {out / 'colour'}" in done.stdout
    for name in ("plain", "gray"):
        labels = np.asarray(Image.open(out / f"{name}.png"))  # nnU-Net's label map is kept as written
        expected = np.where(labels[..., None] == 1, [200, 100, 0], [10, 20, 30])
        assert np.array_equal(np.asarray(Image.open(out / "colour" / f"{name}.png")), expected)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    again = segframe(env, *args, check=False)
    assert again.returncode == 1 and "already holds 4 file(s) this run would write" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before


OPENED: list[str] | None = None  # while a list: every file the process opens (an audit hook, see below)


def _record_open(event: str, args: tuple) -> None:
    if event == "open" and OPENED is not None and isinstance(args[0], (str, Path)):
        OPENED.append(str(args[0]))


def test_one_prediction_reads_the_results_folder_once(trained, tmp_path, monkeypatch):
    """`segframe predict` of one image (in this process) opens dataset.json and plans.json once each and
    validates the stored config once: the results folder is read by one ResultsFolder (before it, 6, 3 and 3
    times). Python's audit hook sees every open, nnU-Net's and the C library's included."""
    import sys

    import segframe.nnunet.plans as plans
    from segframe.cli import main
    from segframe.config import validate_config

    global OPENED
    _, folder, images, _ = trained
    source = tmp_path / "in"
    source.mkdir()
    (source / "plain.png").write_bytes((images / "plain.png").read_bytes())
    validated = []

    def counted(*args, **kwargs):
        validated.append(args)
        return validate_config(*args, **kwargs)

    monkeypatch.setattr(plans, "validate_config", counted)
    sys.addaudithook(_record_open)
    OPENED = []
    try:
        code = main(["predict", "-i", str(source), "-o", str(tmp_path / "out"), "-m", str(folder), "-f", "0",
                     "-device", "cpu", "--disable_tta"])
        opened = [Path(p) for p in OPENED]
    finally:
        OPENED = None
    assert code == 0 and (tmp_path / "out" / "plain.png").is_file()
    inside = [p.name for p in opened if p.parent == folder]
    assert inside.count("dataset.json") == 1 and inside.count("plans.json") == 1, inside
    assert len(validated) == 1
