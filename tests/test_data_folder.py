"""`segframe data folder` and `data lesav`: matching, colour tables, splits, regions, ignore label, errors."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segframe.cli import main
from segframe.data import DataError, convert_folder, lesav

LESAV_REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "LES-AV"
H, W = 12, 16
RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)
CLASSES = ["artery=255,0,0", "vein=0,0,255", "crossing=0,255,0"]
LESAV_LIKE = {"classes": CLASSES, "ignore": "255,255,255"}


def _colour_mask(rng, h=H, w=W):
    """An RGB mask of black, red, blue, green and white, and its label map (white = ignore 4)."""
    label = rng.integers(0, 5, (h, w)).astype(np.uint8)
    mask = np.array([(0, 0, 0), RED, BLUE, GREEN, WHITE], np.uint8)[label]
    return mask, label


def write_folder(root: Path, stems=("1", "2", "10", "11"), seed=0, fov=True):
    """images/N.png, labels/N_mask.png (colour-coded), fov/N_fov.gif; returns {stem: (image, label, fov)}."""
    rng = np.random.default_rng(seed)
    truth = {}
    for sub in ("images", "labels", "fov"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for stem in stems:
        image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        mask, label = _colour_mask(rng)
        inside = rng.random((H, W)) < 0.8
        Image.fromarray(image).save(root / "images" / f"{stem}.png")
        Image.fromarray(mask).save(root / "labels" / f"{stem}_mask.png")
        if fov:
            Image.fromarray(inside.astype(np.uint8) * 255).save(root / "fov" / f"{stem}_fov.gif")
        truth[stem] = (image, label, inside)
    return truth


def _png(path):
    return np.asarray(Image.open(path))


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _label_manager(folder: Path):
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    info = json.loads((folder / "dataset.json").read_text())
    return LabelManager(info["labels"], info.get("regions_class_order")), info


def _nnunet_accepts(folder: Path):
    """nnU-Net's own label manager and per-case checks (its verifier spawns workers, so its parts)."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import check_cases, verify_labels
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    manager, info = _label_manager(folder)
    expected = manager.all_labels + ([manager.ignore_label] if manager.has_ignore_label else [])
    cases = get_filenames_of_train_images_and_targets(str(folder), info)
    io = determine_reader_writer_from_dataset_json(info, next(iter(cases.values()))["images"][0])
    for case in cases.values():
        assert verify_labels(case["label"], io, expected)
        assert check_cases(case["images"], case["label"], len(info["channel_names"]), io)
    return manager, info


def test_colour_masks_with_ignore_fov_and_test_list(tmp_path, capsys):
    truth = write_folder(tmp_path / "src")
    (tmp_path / "test.txt").write_text("# held out\n10.png\n\n")
    before = _tree(tmp_path / "src")
    assert main(["data", "folder", "--images", str(tmp_path / "src" / "images"), "--labels",
                 str(tmp_path / "src" / "labels"), "--fov", str(tmp_path / "src" / "fov"), "--raw",
                 str(tmp_path / "raw"), "--name", "Toy", "--classes", *CLASSES, "--ignore", "255,255,255",
                 "--test-list", str(tmp_path / "test.txt")]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "raw" / "Dataset600_Toy"
    assert f"wrote {folder}: 3 training, 1 test cases" in out and "writing [4/4]" in out
    assert _tree(tmp_path / "src") == before
    manager, info = _nnunet_accepts(folder)
    assert info["labels"] == {"background": 0, "artery": 1, "vein": 2, "crossing": 3, "ignore": 4}
    assert manager.ignore_label == 4 and manager.all_labels == [0, 1, 2, 3] and not manager.has_regions
    assert info["label_colours"] == {"background": [0, 0, 0], "artery": [255, 0, 0], "vein": [0, 0, 255],
                                     "crossing": [0, 255, 0], "ignore": [255, 255, 255]}
    assert sorted(p.name for p in (folder / "imagesTs").iterdir()) == ["10_0000.png"]
    for stem, (image, label, inside) in truth.items():
        split = "Ts" if stem == "10" else "Tr"
        np.testing.assert_array_equal(_png(folder / f"images{split}" / f"{stem}_0000.png"), image)
        np.testing.assert_array_equal(_png(folder / f"labels{split}" / f"{stem}.png"), label)
        np.testing.assert_array_equal(_png(folder / f"fov{split}" / f"{stem}.png"), inside.astype(np.uint8))
    counts = np.bincount(np.concatenate([t[1].ravel() for t in truth.values()]), minlength=5)
    pixels = ", ".join(f"{n} {c}" for n, c in zip(info["labels"], counts, strict=True))
    assert f"label pixels: {pixels}" in out


def test_index_masks_fraction_split_and_no_fov(tmp_path):
    rng = np.random.default_rng(1)
    for sub in ("img", "lab"):
        (tmp_path / sub).mkdir()
    labels = {}
    for stem in ("a", "b", "c", "d"):
        image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        Image.fromarray(image).save(tmp_path / "img" / f"{stem}.jpg")
        labels[stem] = rng.integers(0, 3, (H, W)).astype(np.uint8)
        Image.fromarray(labels[stem]).save(tmp_path / "lab" / f"{stem}_label.png")
    folder = convert_folder(tmp_path / "img", tmp_path / "lab", raw=tmp_path / "raw", dataset_id=7,
                            name="Idx", test_fraction=0.5, seed=3)
    _, info = _nnunet_accepts(folder)
    assert info["labels"] == {"background": 0, "class_1": 1, "class_2": 2}
    assert "label_colours" not in info and not (folder / "fovTr").exists()
    test = sorted(p.stem for p in (folder / "labelsTs").iterdir())
    expected = sorted(np.random.default_rng(3).choice(["a", "b", "c", "d"], 2, replace=False).tolist())
    assert test == expected
    for stem in test:
        np.testing.assert_array_equal(_png(folder / "labelsTs" / f"{stem}.png"), labels[stem])

    Image.fromarray(labels["a"] * 127).save(tmp_path / "lab" / "a_label.png")  # values 0/127/254
    with pytest.raises(DataError, match="--classes vessel=255"):
        convert_folder(tmp_path / "img", tmp_path / "lab", raw=tmp_path / "raw", dataset_id=8, name="Idx2")

    for stem, label in labels.items():  # 0/255 GIFs (a palette of two gray levels), named by value
        (tmp_path / "lab" / f"{stem}_label.png").unlink()
        Image.fromarray((label > 0).astype(np.uint8) * 255).save(tmp_path / "lab" / f"{stem}_label.gif")
    folder = convert_folder(tmp_path / "img", tmp_path / "lab", raw=tmp_path / "raw", dataset_id=9,
                            name="Gif", classes=["vessel=255"])
    info = json.loads((folder / "dataset.json").read_text())
    assert info["labels"] == {"background": 0, "vessel": 1}
    assert info["label_colours"] == {"background": [0, 0, 0], "vessel": [255, 255, 255]}
    np.testing.assert_array_equal(_png(folder / "labelsTr" / "b.png"), (labels["b"] > 0).astype(np.uint8))


def test_regions_are_accepted_by_nnunet_and_give_back_the_classes(tmp_path):
    import torch
    from batchgeneratorsv2.transforms.utils.seg_to_regions import ConvertSegmentationToRegionsTransform

    truth = write_folder(tmp_path / "src", stems=("1", "2"))
    folder = convert_folder(tmp_path / "src" / "images", tmp_path / "src" / "labels", raw=tmp_path / "raw",
                            name="Reg", **LESAV_LIKE,
                            regions=["crossing=crossing", "artery=artery+crossing", "vein=vein+crossing"])
    manager, info = _nnunet_accepts(folder)
    assert info["labels"] == {"background": 0, "artery": [1, 3], "vein": [2, 3], "crossing": [3], "ignore": 4}
    assert info["regions_class_order"] == [1, 2, 3] and manager.has_regions
    assert list(info["label_colours"]) == list(info["labels"])
    label = _png(folder / "labelsTr" / "1.png")
    np.testing.assert_array_equal(label, truth["1"][1])  # label maps unchanged
    # what nnU-Net trains on: one channel per region; a perfect prediction of it must give back the classes
    regions = ConvertSegmentationToRegionsTransform(manager.foreground_regions)(
        segmentation=torch.from_numpy(label[None].astype(np.int16)))["segmentation"]
    back = manager.convert_probabilities_to_segmentation(regions.float()).numpy()
    known = label != manager.ignore_label
    np.testing.assert_array_equal(back[known], label[known])

    with pytest.raises(DataError, match="crossing would be predicted as vein"):
        convert_folder(tmp_path / "src" / "images", tmp_path / "src" / "labels", raw=tmp_path / "raw",
                       name="Reg", dataset_id=9, **LESAV_LIKE,
                       regions=["artery=artery+crossing", "vein=vein+crossing"])


def _raises(tmp_path, match, **kwargs):
    """The conversion fails with `match`, the source is unchanged and nothing is added to raw/."""
    before = _tree(tmp_path / "src")
    raw_before = sorted((tmp_path / "raw").rglob("*"))
    options = {"fov": tmp_path / "src" / "fov", **LESAV_LIKE, **kwargs}
    with pytest.raises(DataError, match=match):
        convert_folder(tmp_path / "src" / "images", tmp_path / "src" / "labels", raw=tmp_path / "raw",
                       name="Bad", **options)
    assert _tree(tmp_path / "src") == before
    assert sorted((tmp_path / "raw").rglob("*")) == raw_before


def test_bad_tables_are_refused(tmp_path):
    write_folder(tmp_path / "src", stems=("1",))
    _raises(tmp_path, "maps artery and vein to one colour 255,0,0",
            classes=["artery=255,0,0", "vein=255,0,0"])
    _raises(tmp_path, r"--ignore colour 0,0,255 is also vein", ignore="0,0,255")
    _raises(tmp_path, r"maps background \(black\) and artery", classes=["artery=0,0,0"])
    _raises(tmp_path, "expected a colour", classes=["artery=red"])


def test_colour_not_in_table_is_named_and_nearest_colour_maps_it(tmp_path):
    write_folder(tmp_path / "src", stems=("1", "2"))
    for stem, n in (("1", 2), ("2", 3)):  # anti-aliased edge pixels, 5 in all, first seen in 1_mask.png
        mask = _png(tmp_path / "src" / "labels" / f"{stem}_mask.png").copy()
        mask[0, :n] = (250, 6, 3)
        Image.fromarray(mask).save(tmp_path / "src" / "labels" / f"{stem}_mask.png")
    _raises(tmp_path, r"1 mask colours are not in the class table: 250,6,3 \(5 px, first in 1_mask.png\)"
                      r".*--nearest-colour")
    folder = convert_folder(tmp_path / "src" / "images", tmp_path / "src" / "labels", raw=tmp_path / "raw",
                            name="Near", nearest_colour=True, **LESAV_LIKE)
    assert (_png(folder / "labelsTr" / "2.png")[0, :3] == 1).all()  # nearest to red: artery


def test_size_and_matching_errors(tmp_path):
    write_folder(tmp_path / "src", stems=("1", "2"))
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "src" / "labels" / "3_mask.png")
    _raises(tmp_path, r"unmatched files: 3_mask.png in .*labels \(no image named 3 in .*images\)")
    (tmp_path / "src" / "labels" / "3_mask.png").unlink()
    Image.fromarray(np.zeros((H, W + 1, 3), np.uint8)).save(tmp_path / "src" / "labels" / "2_mask.png")
    _raises(tmp_path, f"2: mask 2_mask.png is {W + 1}x{H}, image 2.png is {W}x{H}")
    (tmp_path / "src" / "labels" / "2_mask.png").unlink()
    _raises(tmp_path, r"2.png \(no label mask")


def test_dataset_id_taken(tmp_path):
    write_folder(tmp_path / "src", stems=("1",))
    (tmp_path / "raw" / "Dataset600_Other").mkdir(parents=True)
    _raises(tmp_path, "already holds Dataset600_Other with id 600")


def test_lesav_split_regions_and_cli(tmp_path, capsys):
    root = tmp_path / "LES-AV"  # LES-AV's layout and names, tiny generated files
    truth = write_folder(root, stems=lesav.TRAIN + lesav.TEST, fov=False)
    (root / "labels").rename(root / "arteries-and-veins")
    (root / "fov").rmdir()
    (root / "masks").mkdir()
    for stem, (_, _, inside) in truth.items():
        (root / "arteries-and-veins" / f"{stem}_mask.png").rename(root / "arteries-and-veins" / f"{stem}.png")
        Image.fromarray(inside.astype(np.uint8)).save(root / "masks" / f"{stem}_mask.gif")
    assert main(["data", "lesav", "--source", str(root), "--raw", str(tmp_path / "raw"), "--regions"]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "raw" / "Dataset504_LESAV"
    assert "labels: background 0, artery [1, 3], vein [2, 3], crossing [3], ignore 4; " \
           "regions_class_order [1, 2, 3]" in out and "writing [22/22] 586 (test)" in out
    assert sorted(p.stem for p in (folder / "labelsTs").iterdir()) == sorted(lesav.TEST)
    assert sorted(p.name[:-9] for p in (folder / "imagesTr").iterdir()) == sorted(lesav.TRAIN)
    np.testing.assert_array_equal(_png(folder / "labelsTs" / "224.png"), truth["224"][1])
    np.testing.assert_array_equal(_png(folder / "fovTr" / "12.png"), truth["12"][2].astype(np.uint8))
    _nnunet_accepts(folder)

    (root / "masks" / "90_mask.gif").unlink()
    assert main(["data", "lesav", "--source", str(root), "--raw", str(tmp_path / "raw")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing masks/90_mask.gif" in err


@pytest.mark.skipif(not LESAV_REAL.is_dir(), reason="LES-AV not present")
def test_lesav_real_masks(tmp_path):
    """The real colours, on a 200x240 crop of one case (the full images take seconds each to write)."""
    lesav.source_files(LESAV_REAL)
    crop = np.s_[600:800, 700:940]
    src = tmp_path / "src"
    for sub, name in (("images", "12.png"), ("arteries-and-veins", "12.png"), ("masks", "12_mask.gif")):
        (src / sub).mkdir(parents=True)
        with Image.open(LESAV_REAL / sub / name) as im:
            assert im.size == (1620, 1444)
            Image.fromarray(np.asarray(im)[crop]).save(src / sub / name)
    folder = convert_folder(src / "images", src / "arteries-and-veins", fov=src / "masks",
                            raw=tmp_path / "raw", name="One", classes=lesav.CLASSES, ignore=lesav.IGNORE)
    _nnunet_accepts(folder)
    mask = _png(LESAV_REAL / "arteries-and-veins" / "12.png")[crop]
    expected = np.zeros(mask.shape[:2], np.uint8)
    for value, colour in enumerate((RED, BLUE, GREEN, WHITE), 1):
        expected[(mask == colour).all(-1)] = value
    assert set(np.unique(expected)) == {0, 1, 2, 3, 4}  # the crop holds every class and uncertain pixels
    np.testing.assert_array_equal(_png(folder / "labelsTr" / "12.png"), expected)


def test_scale_resizes_images_bilinear_and_masks_nearest(tmp_path):
    truth = write_folder(tmp_path / "src", stems=("1", "2"))
    src = tmp_path / "src"
    folder = convert_folder(src / "images", src / "labels", src / "fov", raw=tmp_path / "raw", name="Half",
                            scale=0.5, **LESAV_LIKE)
    info = json.loads((folder / "dataset.json").read_text())
    assert info["description"].endswith("; resized by 0.5")
    for stem, (image, label, inside) in truth.items():
        # the reference: PIL's own resize of the source arrays to (W/2, H/2)
        image_half = Image.fromarray(image).resize((W // 2, H // 2), Image.Resampling.BILINEAR)
        label_half = Image.fromarray(label).resize((W // 2, H // 2), Image.Resampling.NEAREST)
        fov_half = Image.fromarray(inside).resize((W // 2, H // 2), Image.Resampling.NEAREST)
        np.testing.assert_array_equal(_png(folder / "imagesTr" / f"{stem}_0000.png"), np.asarray(image_half))
        np.testing.assert_array_equal(_png(folder / "labelsTr" / f"{stem}.png"), np.asarray(label_half))
        fov_written = _png(folder / "fovTr" / f"{stem}.png")
        np.testing.assert_array_equal(fov_written, np.asarray(fov_half).astype(np.uint8))
        assert set(np.unique(_png(folder / "labelsTr" / f"{stem}.png"))) <= set(np.unique(label))
    with pytest.raises(DataError, match=r"--scale 1.5: give a factor in \(0, 1\]"):
        convert_folder(tmp_path / "src" / "images", tmp_path / "src" / "labels", raw=tmp_path / "raw2",
                       scale=1.5, **LESAV_LIKE)
