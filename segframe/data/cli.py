"""`segframe data chase|drive|synthetic|folder|lesav`: write an nnU-Net raw dataset from a source folder."""

from __future__ import annotations

import argparse
import json

from segframe.data import chase, drive, folder, lesav, synthetic


def _report(dataset) -> int:
    info = json.loads((dataset / "dataset.json").read_text())
    print(f"wrote {dataset}: {info['numTraining']} training, {info['numTest']} test cases")
    if info["labels"] != {"background": 0, "vessel": 1}:
        order = info.get("regions_class_order")
        print("labels: " + ", ".join(f"{k} {v}" for k, v in info["labels"].items())
              + (f"; regions_class_order {order}" if order else ""))
    print(f"next: nnUNetv2_plan_and_preprocess -d {int(dataset.name[7:10])} -c 2d")
    return 0


def _chase(args: argparse.Namespace) -> int:
    return _report(chase.convert_chase(args.source, args.raw, args.dataset_id))


def _drive(args: argparse.Namespace) -> int:
    return _report(drive.convert_drive(args.source, args.raw, args.dataset_id))


def _synthetic(args: argparse.Namespace) -> int:
    return _report(synthetic.make_synthetic(args.raw, args.dataset_id, args.num_train, args.num_test,
                                            args.size, args.seed))


def _folder(args: argparse.Namespace) -> int:
    return _report(folder.convert_folder(
        args.images, args.labels, args.fov, args.raw, args.dataset_id, args.name, args.classes, args.ignore,
        args.nearest_colour, folder.read_test_list(args.test_list) if args.test_list else None,
        args.test_fraction, args.seed, args.region, progress=print, scale=args.scale,
    ))


def _lesav(args: argparse.Namespace) -> int:
    return _report(lesav.convert_lesav(args.source, args.raw, args.dataset_id, args.regions, progress=print,
                                       scale=args.scale))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `data` subcommand with `chase`, `drive`, `synthetic`, `folder` and `lesav`."""
    data = subparsers.add_parser(
        "data", help="convert a vessel dataset to an nnU-Net raw dataset",
        description="Write DatasetXXX_<Name> under --raw (default $nnUNet_raw): imagesTr, labelsTr, "
                    "imagesTs, dataset.json, plus labelsTs (test references) and fovTr/fovTs "
                    "(field-of-view masks).",
    )
    sub = data.add_subparsers(dest="source_kind", metavar="DATASET", required=True)

    def scale(p: argparse.ArgumentParser) -> None:
        p.add_argument("--scale", type=float, default=1.0, metavar="F",
                       help="resize every case by F in (0, 1] (images bilinear, masks nearest; default 1)")

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

    p = sub.add_parser(
        "folder", help="your own folder of images and masks (index or colour-coded), optional FOV masks",
        description="Match images and masks by name (N.png <-> N.png, N_mask.gif, N_label.png, ...; "
                    f"suffixes: {', '.join(folder.MASK_SUFFIXES)}), check every mask, and write an nnU-Net "
                    "raw dataset. Class ids follow the order of --classes; black is background.",
    )
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--labels", required=True, help="folder of masks, one per image")
    p.add_argument("--fov", help="folder of field-of-view masks, one per image (nonzero inside)")
    common(p, folder.DEFAULT_ID)
    p.add_argument("--name", help="dataset name (default: the name of the folder holding --images)")
    p.add_argument("--classes", nargs="+", metavar="NAME=R,G,B",
                   help="class table of colour-coded masks, e.g. artery=255,0,0 vein=0,0,255 (NAME=VALUE "
                        "for index masks); without it mask values 1..K are the class ids")
    p.add_argument("--ignore", metavar="R,G,B",
                   help="colour of uncertain pixels, written as nnU-Net's ignore label (the highest label)")
    p.add_argument("--nearest-colour", action="store_true",
                   help="map colours outside the table to the nearest table colour (anti-aliased/JPEG masks)")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--test-list", metavar="FILE", help="file naming the test cases, one a line")
    split.add_argument("--test-fraction", type=float, default=0.0, metavar="F",
                       help="share of cases drawn at random for the test split (default 0: all train)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --test-fraction draw (default 0)")
    p.add_argument("--region", action="append", metavar="NAME=CLASS+CLASS",
                   help="an nnU-Net region named after the class it predicts, e.g. --region "
                        "artery=artery+crossing (one per class); label maps stay, dataset.json lists regions")
    scale(p)
    p.set_defaults(func=_folder)

    p = sub.add_parser("lesav", help="LES-AV arteries/veins: fixed 11 + 11 split, supplied FOV masks")
    p.add_argument("--source", required=True,
                   help="folder with images/, arteries-and-veins/ and masks/ as LES-AV ships them")
    common(p, lesav.DEFAULT_ID)
    p.add_argument("--regions", action="store_true",
                   help="nnU-Net regions artery = artery+crossing, vein = vein+crossing, crossing")
    scale(p)
    p.set_defaults(func=_lesav)
