"""Dataset converters: DRIVE and CHASE_DB1 layouts, nnU-Net's own dataset checks, re-runs, clear errors."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segframe.cli import main
from segframe.data import DataError, chase_fov, convert_chase, convert_drive, make_synthetic
from segframe.data.chase import SUBJECTS

CHASE_REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "CHASEDB1"
H, W = 20, 26  # not square, so a transposed array would be caught


def _rng_image(rng, h=H, w=W):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _rng_mask(rng, h=H, w=W):
    return rng.random((h, w)) < 0.3


def _gif(mask, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(path)


def write_drive(root: Path, seed=0, train=("21", "22"), test=("01", "02")):
    """A DRIVE folder in the distributed layout: RGB TIFF images, 0/255 GIF masks."""
    rng = np.random.default_rng(seed)
    truth = {}
    for split, numbers in (("training", train), ("test", test)):
        for n in numbers:
            image, label, fov = _rng_image(rng), _rng_mask(rng), _rng_mask(rng)
            (root / split / "images").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / split / "images" / f"{n}_{split}.tif")
            _gif(label, root / split / "1st_manual" / f"{n}_manual1.gif")
            _gif(fov, root / split / "mask" / f"{n}_{split}_mask.gif")
            second = None
            if split == "test":
                second = _rng_mask(rng)
                _gif(second, root / split / "2nd_manual" / f"{n}_manual2.gif")
            truth[f"{n}_{split}"] = (image, label, fov, second)
    return truth


def _png(path):
    return np.asarray(Image.open(path))


def _nnunet_checks(folder: Path):
    """nnU-Net's own dataset checks, run in this process (its verifier spawns workers)."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import check_cases, verify_labels
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.preprocessing.normalization import map_channel_name_to_normalization as norm
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    dataset_json = json.loads((folder / "dataset.json").read_text())
    cases = get_filenames_of_train_images_and_targets(str(folder), dataset_json)
    assert len(cases) == dataset_json["numTraining"]
    first = next(iter(cases.values()))["images"][0]
    io = determine_reader_writer_from_dataset_json(dataset_json, first)
    for case in cases.values():
        assert verify_labels(case["label"], io, [0, 1])
        assert check_cases(case["images"], case["label"], len(dataset_json["channel_names"]), io)
    image, _ = io().read_images(cases[next(iter(cases))]["images"])
    assert image.shape[0] == len(dataset_json["channel_names"]) == 3
    assert {norm.get_normalization_scheme(n).__name__ for n in dataset_json["channel_names"].values()} == {
        "RGBTo01Normalization"
    }


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_drive_conversion(tmp_path):
    truth = write_drive(tmp_path / "DRIVE")
    folder = convert_drive(tmp_path / "DRIVE", tmp_path / "raw")
    assert folder == tmp_path / "raw" / "Dataset501_DRIVE"
    info = json.loads((folder / "dataset.json").read_text())
    assert info["labels"] == {"background": 0, "vessel": 1}
    assert info["numTraining"] == 2 and info["file_ending"] == ".png"
    names = sorted(p.name for p in (folder / "imagesTr").iterdir())
    assert names == ["21_training_0000.png", "22_training_0000.png"]
    assert sorted(p.name for p in (folder / "imagesTs").iterdir()) == ["01_test_0000.png", "02_test_0000.png"]
    for name, (image, label, fov, second) in truth.items():
        split = "Tr" if name.endswith("training") else "Ts"
        np.testing.assert_array_equal(_png(folder / f"images{split}" / f"{name}_0000.png"), image)
        np.testing.assert_array_equal(_png(folder / f"labels{split}" / f"{name}.png"), label.astype(np.uint8))
        np.testing.assert_array_equal(_png(folder / f"fov{split}" / f"{name}.png"), fov.astype(np.uint8))
        if second is not None:
            second_png = _png(folder / "labelsTs_2nd" / f"{name}.png")
            np.testing.assert_array_equal(second_png, second.astype(np.uint8))
    _nnunet_checks(folder)


def test_rerun_gives_same_folder_and_leaves_nothing_behind(tmp_path):
    write_drive(tmp_path / "DRIVE")
    raw = tmp_path / "raw"
    (raw / "notes.txt").parent.mkdir(parents=True)
    (raw / "notes.txt").write_text("user file")
    first = _tree(convert_drive(tmp_path / "DRIVE", raw))
    second = _tree(convert_drive(tmp_path / "DRIVE", raw))
    assert first == second
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset501_DRIVE", "notes.txt"]


def test_drive_missing_file_is_named(tmp_path):
    write_drive(tmp_path / "DRIVE")
    (tmp_path / "DRIVE" / "test" / "mask" / "02_test_mask.gif").unlink()
    with pytest.raises(DataError, match="test/mask/02_test_mask.gif"):
        convert_drive(tmp_path / "DRIVE", tmp_path / "raw")
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())
    with pytest.raises(DataError, match="missing training/images"):
        convert_drive(tmp_path, tmp_path / "raw")


def test_same_id_other_name_is_an_error_and_kept(tmp_path):
    write_drive(tmp_path / "DRIVE")
    other = tmp_path / "raw" / "Dataset501_Mine"
    other.mkdir(parents=True)
    (other / "dataset.json").write_text("{}")
    with pytest.raises(DataError, match="Dataset501_Mine"):
        convert_drive(tmp_path / "DRIVE", tmp_path / "raw")
    assert (other / "dataset.json").read_text() == "{}"
    assert convert_drive(tmp_path / "DRIVE", tmp_path / "raw", dataset_id=601).name == "Dataset601_DRIVE"


def test_folder_that_is_not_a_dataset_is_not_replaced(tmp_path):
    write_drive(tmp_path / "DRIVE")
    target = tmp_path / "raw" / "Dataset501_DRIVE"
    target.mkdir(parents=True)
    (target / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not an nnU-Net dataset"):
        convert_drive(tmp_path / "DRIVE", tmp_path / "raw")
    assert (target / "keep.txt").read_text() == "mine"


def _disc_image(h=60, w=64):
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 <= 25**2
    image = np.zeros((h, w, 3), np.uint8)
    image[disc] = (180, 90, 40)
    return image, disc


def test_chase_fov_is_the_bright_disc():
    image, disc = _disc_image()
    image[5, 5] = (255, 255, 255)  # a bright speck outside the eye
    image[28:31, 4:14] = (10, 5, 2)  # a dark vessel crossing the rim
    image[30, 32] = (0, 0, 0)  # a dark pixel inside
    fov = chase_fov(image)
    assert fov.dtype == bool
    assert not fov[5, 5] and fov[30, 32]
    # the rim notch is closed again; only the disc's one-pixel tips may be lost
    assert np.count_nonzero(fov != disc) <= 6
    image, disc = _disc_image(h=40)  # a field cut by the top and bottom of the frame
    assert disc[0].any() and np.count_nonzero(chase_fov(image) != disc) <= 6


def write_chase(root: Path, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    image, _ = _disc_image()
    for s in SUBJECTS:
        Image.fromarray(image).save(root / f"Image_{s}.jpg")
        for obs in ("1st", "2nd"):
            Image.fromarray(_rng_mask(rng, 60, 64)).convert("1").save(root / f"Image_{s}_{obs}HO.png")


def test_chase_conversion_split_and_errors(tmp_path):
    write_chase(tmp_path / "CHASE")
    folder = convert_chase(tmp_path / "CHASE", tmp_path / "raw")
    assert folder.name == "Dataset502_CHASEDB1"
    train = sorted(p.name[:-9] for p in (folder / "imagesTr").iterdir())
    test = sorted(p.name[:-9] for p in (folder / "imagesTs").iterdir())
    assert train[0] == "Image_01L" and train[-1] == "Image_10R" and len(train) == 20
    assert test == [f"Image_{n}{e}" for n in range(11, 15) for e in "LR"]
    assert sorted(p.stem for p in (folder / "labelsTs").iterdir()) == test
    assert sorted(p.stem for p in (folder / "fovTs").iterdir()) == test
    assert sorted(p.stem for p in (folder / "labelsTs_2nd").iterdir()) == test
    ref = np.asarray(Image.open(tmp_path / "CHASE" / "Image_12R_1stHO.png").convert("L")) > 0
    np.testing.assert_array_equal(_png(folder / "labelsTs" / "Image_12R.png"), ref.astype(np.uint8))
    _nnunet_checks(folder)

    (tmp_path / "CHASE" / "Image_07R_1stHO.png").unlink()
    with pytest.raises(DataError, match="Image_07R_1stHO.png"):
        convert_chase(tmp_path / "CHASE", tmp_path / "raw")
    with pytest.raises(DataError, match="not found"):
        convert_chase(tmp_path / "nowhere", tmp_path / "raw")


@pytest.mark.skipif(not CHASE_REAL.is_dir(), reason="CHASE_DB1 not present")
def test_chase_fov_on_a_real_image():
    image = np.asarray(Image.open(CHASE_REAL / "Image_11L.jpg").convert("RGB"))
    fov = chase_fov(image)
    label = np.asarray(Image.open(CHASE_REAL / "Image_11L_1stHO.png").convert("L")) > 0
    assert 0.6 < fov.mean() < 0.75  # the round field covers about 69% of the frame
    assert not fov[:10, :10].any() and fov[480, 500]
    assert np.count_nonzero(label & ~fov) < 0.001 * label.sum()


def test_synthetic_is_deterministic_and_valid(tmp_path):
    a = _tree(make_synthetic(tmp_path / "a", num_train=3, num_test=2, size=64, seed=3))
    b = _tree(make_synthetic(tmp_path / "b", num_train=3, num_test=2, size=64, seed=3))
    assert a == b
    folder = tmp_path / "a" / "Dataset503_SyntheticVessels"
    label = _png(folder / "labelsTr" / "train_000.png")
    fov = _png(folder / "fovTr" / "train_000.png")
    assert set(np.unique(label)) == {0, 1} and not (label & (1 - fov)).any()
    assert 0.02 < label.mean() < 0.3
    _nnunet_checks(folder)


def test_cli(tmp_path, capsys):
    write_drive(tmp_path / "DRIVE")
    assert main(["data", "drive", "--source", str(tmp_path / "DRIVE"), "--raw", str(tmp_path / "raw"),
                 "--dataset-id", "42"]) == 0
    assert "Dataset042_DRIVE" in capsys.readouterr().out
    assert main(["data", "chase", "--source", str(tmp_path / "DRIVE"), "--raw", str(tmp_path / "raw")]) == 1
    assert "Image_01L.jpg" in capsys.readouterr().err


def test_cli_needs_an_output_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    assert main(["data", "synthetic"]) == 1
    assert "--raw" in capsys.readouterr().err
