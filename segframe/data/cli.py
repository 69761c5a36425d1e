"""`segframe data chase|drive|synthetic`: write an nnU-Net raw dataset from a source folder."""

from __future__ import annotations

import argparse
import json

from segframe.data import chase, drive, synthetic


def _report(folder) -> int:
    info = json.loads((folder / "dataset.json").read_text())
    print(f"wrote {folder}: {info['numTraining']} training, {info['numTest']} test cases")
    print(f"next: nnUNetv2_plan_and_preprocess -d {int(folder.name[7:10])} -c 2d")
    return 0


def _chase(args: argparse.Namespace) -> int:
    return _report(chase.convert_chase(args.source, args.raw, args.dataset_id))


def _drive(args: argparse.Namespace) -> int:
    return _report(drive.convert_drive(args.source, args.raw, args.dataset_id))


def _synthetic(args: argparse.Namespace) -> int:
    return _report(synthetic.make_synthetic(args.raw, args.dataset_id, args.num_train, args.num_test,
                                            args.size, args.seed))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `data` subcommand with `chase`, `drive` and `synthetic`."""
    data = subparsers.add_parser(
        "data", help="convert a vessel dataset to an nnU-Net raw dataset",
        description="Write DatasetXXX_<Name> under --raw (default $nnUNet_raw): imagesTr, labelsTr, "
                    "imagesTs, dataset.json, plus labelsTs (test references) and fovTr/fovTs "
                    "(field-of-view masks).",
    )
    sub = data.add_subparsers(dest="source_kind", metavar="DATASET", required=True)

    def common(p: argparse.ArgumentParser, default_id: int) -> None:
        p.add_argument("--raw", help="nnU-Net raw folder to write into (default: $nnUNet_raw)")
        p.add_argument("--dataset-id", type=int, default=default_id,
                       help=f"nnU-Net dataset id (default {default_id})")

    p = sub.add_parser("chase", help="CHASE_DB1: first 20 images train, last 8 test; FOV from thresholding")
    p.add_argument("--source", required=True, help="folder with Image_NNX.jpg and Image_NNX_1stHO.png")
    common(p, chase.DEFAULT_ID)
    p.set_defaults(func=_chase)

    p = sub.add_parser("drive", help="DRIVE: training/ -> train, test/ -> test; FOV masks as supplied")
    p.add_argument("--source", required=True, help="folder with training/ and test/ as DRIVE ships them")
    common(p, drive.DEFAULT_ID)
    p.set_defaults(func=_drive)

    p = sub.add_parser("synthetic", help="generated vessel-like images (for pipeline checks, no real data)")
    common(p, synthetic.DEFAULT_ID)
    p.add_argument("--num-train", type=int, default=20, help="training images (default 20)")
    p.add_argument("--num-test", type=int, default=8, help="test images (default 8)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=_synthetic)
