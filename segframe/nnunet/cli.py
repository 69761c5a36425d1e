"""`segframe train`, `predict`, `export` and `trainer-path`: nnU-Net v2 with a segframe model.

`train` writes the segframe plans variant (the YAML inside nnU-Net's plans) and runs nnU-Net's
own training with nnUNetTrainerSegframe (`--val_best` validates checkpoint_best.pth into its own
folder); `predict` rebuilds the model from a results folder alone and runs nnU-Net's predictor;
`export` writes that model as ONNX (segframe.nnunet.export). nnunetv2 is imported only when a
command runs.
`nnUNetv2_train_vit` is `segframe train` under the older fork's name.
"""

from __future__ import annotations

import argparse
import sys

from segframe.nnunet import EXT_TRAINER_DIR, TRAINER_NAME


def _positive(text: str) -> int:
    """An argparse type: a whole number >= 1 (argparse turns the ValueError into a usage error)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _train(args: argparse.Namespace) -> int:
    from segframe.nnunet.train import train_command

    return train_command(args)


def _predict(args: argparse.Namespace) -> int:
    from segframe.nnunet.predict import predict_command

    return predict_command(args)


def _export(args: argparse.Namespace) -> int:
    from segframe.nnunet.export import export_command

    return export_command(args)


def _trainer_path(args: argparse.Namespace) -> int:
    print(EXT_TRAINER_DIR)
    return 0


def _trust_argument(parser: argparse.ArgumentParser, what: str = "checkpoints") -> None:
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help=f"allow {what} that need full unpickling (can run code: only files you trust)")


def _results_folder_arguments(parser: argparse.ArgumentParser) -> None:
    """-m, -chk and --trust-checkpoint: the results folder and checkpoint a command loads."""
    parser.add_argument("-m", required=True, help="results folder TRAINER__PLANS__CONFIGURATION")
    parser.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint file name in each fold")
    _trust_argument(parser)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `train`, `predict` and `trainer-path` subcommands."""
    train = subparsers.add_parser(
        "train", help="train a segframe model inside nnU-Net v2 from a YAML config",
        description="Store the config in a segframe plans variant and run nnU-Net's training with "
                    f"{TRAINER_NAME}. Plan and preprocess first: nnUNetv2_plan_and_preprocess -d ID -c 2d",
    )
    train.add_argument("dataset", help="dataset id or DatasetXXX_Name")
    train.add_argument("configuration", help="nnU-Net configuration, normally 2d")
    train.add_argument("fold", help="fold 0-4 (or 'all')")
    train.add_argument("--config", help="segframe YAML (needed to start; --c and --val reuse the stored one)")
    train.add_argument("--name", help="plans tag of this run (default: the config file's name)")
    train.add_argument("-p", default="nnUNetPlans", help="nnU-Net plans the segframe plans derive from")
    train.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"], help="default cuda")
    train.add_argument("--c", action="store_true", help="continue from the fold's latest checkpoint")
    train.add_argument("--val", action="store_true", help="only run the final validation")
    train.add_argument("--val_best", action="store_true",
                       help="validate with checkpoint_best.pth instead of the final weights, into "
                            "fold_X/validation_best (after training; with --val: only that validation)")
    train.add_argument("--npz", action="store_true", help="also save validation probabilities")
    train.add_argument("--overwrite", action="store_true", help="train again over a fold with checkpoints")
    train.add_argument("--num-gpus", type=int, default=1, help="GPUs for nnU-Net's DDP (default 1)")
    _trust_argument(train, "--c/--val checkpoints")
    train.set_defaults(func=_train)

    predict = subparsers.add_parser(
        "predict", help="predict a folder of images with a trained segframe results folder (no YAML needed)",
        description="Rebuild the model from an nnU-Net results folder and run nnU-Net's predictor "
                    "(sliding window, Gaussian weighting, mirroring, export).",
    )
    predict.add_argument("-i", required=True,
                         help="input folder: PNG (8/16-bit, gray/RGB/RGBA), JPEG, TIFF or BMP files with any "
                              "name, or nnU-Net's CASE_0000.<ext>; each mask is written as <stem>.png")
    predict.add_argument("-o", required=True, help="output folder")
    _results_folder_arguments(predict)
    predict.add_argument("-f", nargs="+", help="folds to ensemble (default: every fold with -chk)")
    predict.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"], help="default cuda")
    predict.add_argument("--step_size", type=float, default=0.5, help="sliding-window step (of the patch)")
    predict.add_argument("--disable_tta", action="store_true", help="no mirroring (4x faster in 2D)")
    predict.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                         help="the network's arithmetic on -device cpu: bf16 autocast is faster on CPUs with "
                              "AVX512_BF16 or AMX, slower without (default fp32)")
    predict.add_argument("--save_probabilities", action="store_true", help="also write .npz probabilities")
    predict.add_argument("--colour", action="store_true",
                         help="also write each PNG mask colour-coded as <-o>/colour/<stem>.png (the results "
                              "folder's dataset.json label_colours, else black, red, blue, green, ...)")
    predict.add_argument("--fov", metavar="FOLDER",
                         help="field-of-view masks <name>.png (nonzero inside; e.g. a dataset's fovTs): "
                              "pixels outside are written as background (label 0, probability 1)")
    predict.add_argument("--overwrite", action="store_true",
                         help="replace files in -o that this run writes (other files are never touched)")
    predict.add_argument("-npp", type=_positive, default=3,
                         help="images read ahead (in threads) while the network predicts; default 3")
    predict.add_argument("-nps", type=_positive, default=3,
                         help="predictions written at once (in threads) while the next is predicted; "
                              "default 3")
    predict.set_defaults(func=_predict)

    export = subparsers.add_parser(
        "export", help="write one fold of a trained results folder as an ONNX graph (+ a JSON of its inputs)",
        description="Rebuild the network from a results folder (checked as segframe predict does) and "
                    "write it as ONNX: input 'image' (batch, C, height, width) as nnU-Net's preprocessing "
                    "gives it, output 'logits' (batch, K, height, width); padding and the backbone's "
                    "normalisation are inside the graph. Beside it, NAME.json: classes, channels, intensity "
                    "preprocessing, patch size.",
    )
    _results_folder_arguments(export)
    export.add_argument("-f", default="0", help="the fold to export (default 0)")
    export.add_argument("-o", required=True, help="the .onnx file to write (NAME.json is written beside it)")
    export.add_argument("--size", type=_positive, nargs=2, metavar=("H", "W"),
                        help="a graph for H x W images only (default: any size, where the network allows)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing .onnx / .json")
    export.set_defaults(func=_export)

    path = subparsers.add_parser(
        "trainer-path", help="print the folder for nnU-Net's nnUNet_extTrainer variable",
        description="export nnUNet_extTrainer=$(segframe trainer-path) lets nnUNetv2_train and "
                    f"nnUNetv2_predict find {TRAINER_NAME}.",
    )
    path.set_defaults(func=_trainer_path)


def train_vit_main(argv: list[str] | None = None) -> int:
    """`nnUNetv2_train_vit DATASET CONFIGURATION FOLD --config FILE`: the older fork's `segframe train`."""
    from segframe.cli import main

    return main(["train", *(sys.argv[1:] if argv is None else argv)])
