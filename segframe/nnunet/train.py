"""`segframe train`: check everything a run needs (arguments, dataset, plans, config, checkpoints) before
writing anything, store the config in a segframe plans variant, and run nnU-Net's training with
nnUNetTrainerSegframe, in a child process whose workers die with it (segframe.nnunet.lifeline);
`--val_best` validates checkpoint_best.pth into its own folder.

torch, nnU-Net's training and the trainer are imported only in the training process, so `segframe train`
answers a typo at once.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from segframe.config import load_config, missing_weights
from segframe.errors import SegframeError
from segframe.files import read_json
from segframe.nnunet import TRAINER_NAME, lifeline, use_ext_trainer
from segframe.nnunet.plans import (
    NnUNetSetupError,
    check_configuration,
    config_from_configuration,
    config_tag,
    dataset_folder,
    find_segframe_plans,
    nnunet_folder,
    plans_name,
    prepare_plans,
    resolved_configuration,
    results_folder,
    store_plans,
)


def _check_fold(dataset_dir: Path, fold: str) -> int | str:
    if fold == "all":
        return fold
    splits = dataset_dir / "splits_final.json"
    count = len(json.loads(splits.read_text())) if splits.is_file() else 5
    if not fold.isdigit() or int(fold) >= count:
        where = f"{splits} has {count} folds" if splits.is_file() else "nnU-Net makes 5 folds"
        raise SegframeError(f"fold {fold!r} does not exist: {where}; use 0..{count - 1} or 'all'")
    return int(fold)


def _segframe_plans(args: argparse.Namespace, dataset_dir: Path) -> tuple[str, dict | None, list[str]]:
    """The plans from --config (checked, not yet written: (name, plans, notes)), or the name of the
    existing ones for --c / --val (name, None, [])."""
    if args.config:
        cfg = load_config(args.config)
        tag = config_tag(args.name or Path(args.config).stem)
        return prepare_plans(dataset_dir, args.p, args.configuration, cfg, tag)
    if args.name:
        name = plans_name(args.p, config_tag(args.name))
        if not (dataset_dir / f"{name}.json").is_file():
            raise SegframeError(
                f"no segframe plans {name!r} in {dataset_dir}; start that training with --config")
        return name, None, []
    found = find_segframe_plans(dataset_dir, args.p)
    if len(found) != 1:
        listing = ", ".join(found) or "none"
        raise SegframeError(
            f"cannot tell which training to continue: segframe plans in {dataset_dir}: {listing}; "
            "pass --config FILE (or --name NAME) of the run"
        )
    return found[0], None, []


def _check_resume(args: argparse.Namespace, fold_dir: Path, plans: dict, dataset_json: dict) -> None:
    """The checkpoint --c / --val will use is readable, ours and fits the plans' model (checked before
    anything is written; --c falls back to the newest readable one and says so)."""
    from segframe.nnunet.checkpoints import (
        NAMES,
        check_trainer,
        check_weights_fit,
        expected_weights,
        readable_checkpoint,
    )

    if args.val:  # --val --val_best validates (and so loads) only checkpoint_best.pth
        first = NAMES[2] if args.val_best else NAMES[0]
    else:
        first = next((n for n in NAMES if (fold_dir / n).is_file()), None)
    if first is None:
        return  # --c without checkpoints: nnU-Net starts a new training and says so
    path, checkpoint, note = readable_checkpoint(fold_dir, first, args.trust_checkpoint, fallback=args.c,
                                                 mmap=True)
    if note:
        print(f"segframe: {note}", flush=True)
    check_trainer(checkpoint, path)
    expected = expected_weights(plans, args.configuration, dataset_json)
    check_weights_fit(checkpoint["network_weights"], expected, path)


def _train_argv(args: argparse.Namespace) -> list[str]:
    """The `train` command line of `args`, for the training child process."""
    argv = ["train", args.dataset, args.configuration, args.fold, "-p", args.p, "-device", args.device,
            "--num-gpus", str(args.num_gpus)]
    for option in ("config", "name"):
        if getattr(args, option):
            argv += [f"--{option}", str(getattr(args, option))]
    for flag, dest in (("--c", "c"), ("--val", "val"), ("--val_best", "val_best"), ("--npz", "npz"),
                       ("--overwrite", "overwrite"), ("--trust-checkpoint", "trust_checkpoint")):
        if getattr(args, dest):
            argv.append(flag)
    return argv


def train_command(args: argparse.Namespace) -> int:
    """`segframe train`: on Linux the training runs in a child that dies, with every worker it started,
    when this process dies (see segframe.nnunet.lifeline)."""
    if lifeline.supported() and not lifeline.is_child():
        _check_arguments(args)  # a typo is answered before the training process starts and imports torch
        return lifeline.run_child(_train_argv(args))
    if lifeline.is_child():
        lifeline.hold()
    try:
        return _run_train(args)
    finally:
        if lifeline.supported():  # `segframe train` kills the trackers once this process is gone
            lifeline.kill_descendants(spare_trackers=True)


def _check_arguments(args: argparse.Namespace) -> tuple[Path, int | str]:
    """The first checks of `train`, which need neither torch nor the model: options that exclude each
    other, the dataset, its base plans and configuration, the fold, and a config to start from. Returns
    the dataset's preprocessed folder and the fold."""
    if args.c and args.val:
        raise SegframeError("--c and --val exclude each other: --c continues training, --val only validates")
    if args.num_gpus > 1 and args.device != "cuda":
        raise SegframeError("--num-gpus > 1 trains with nnU-Net's DDP, which needs -device cuda")
    if args.val_best and (args.num_gpus > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        raise SegframeError(
            "--val_best validates in one process: train with several GPUs first, then run the same command "
            "with --val --val_best and one GPU")
    dataset_dir = dataset_folder(args.dataset)
    base = read_json(dataset_dir / f"{args.p}.json", f"nnU-Net plans {args.p!r} (-p)", NnUNetSetupError)
    check_configuration(base, args.configuration)
    fold = _check_fold(dataset_dir, args.fold)
    if not (args.config or args.c or args.val):
        raise SegframeError(
            "--config FILE.yaml is needed to start a training (--c and --val reuse the stored one)")
    return dataset_dir, fold


def _run_train(args: argparse.Namespace) -> int:
    """Check everything (arguments, data, plans, checkpoints) before writing anything, then train."""
    from segframe.nnunet.checkpoints import TRUST_ENV
    from segframe.nnunet.runtime import resolve_precision, torch_device

    dataset_dir, fold = _check_arguments(args)
    name, plans, notes = _segframe_plans(args, dataset_dir)
    stored = plans or read_json(dataset_dir / f"{name}.json", "segframe plans", NnUNetSetupError)
    device = torch_device(args.device)
    cfg = config_from_configuration(resolved_configuration(stored, args.configuration), f"plans {name!r}")
    resolve_precision(cfg.train.precision, device)
    if not (args.c or args.val) and (why := missing_weights(cfg)):  # --c / --val load nnU-Net's checkpoints
        raise SegframeError(f"{args.config or name}: {why}")
    output = results_folder(nnunet_folder("nnUNet_results"), dataset_dir.name, name, args.configuration)
    fold_dir = output / f"fold_{fold}"
    existing = sorted(p.name for p in fold_dir.glob("checkpoint_*.pth"))
    if args.val and not (fold_dir / "checkpoint_final.pth").is_file():
        raise SegframeError(
            f"--val needs a finished training: {fold_dir / 'checkpoint_final.pth'} does not exist")
    if args.val and args.val_best and not (fold_dir / "checkpoint_best.pth").is_file():
        raise SegframeError(f"--val_best validates {fold_dir / 'checkpoint_best.pth'}, which does not exist")
    if existing and not (args.c or args.val or args.overwrite):
        raise SegframeError(
            f"{fold_dir} already holds {', '.join(existing)}: pass --c to continue, --val to validate, or "
            "--overwrite to train again from scratch (its checkpoints are then replaced)"
        )
    if args.c or args.val:
        _check_resume(args, fold_dir, stored, read_json(dataset_dir / "dataset.json", "dataset.json",
                                                           NnUNetSetupError))
    if plans is not None:  # every check passed: only now is anything written
        target = store_plans(dataset_dir, plans)
        for note in notes:
            print(f"segframe: {note}", flush=True)
        print(f"segframe: config {args.config} stored in plans {name!r} ({target})", flush=True)
    if args.trust_checkpoint:
        os.environ[TRUST_ENV] = "1"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_ext_trainer()
    print(f"segframe: training {TRAINER_NAME}, results in {output}", flush=True)

    import torch.distributed as dist
    from nnunetv2.run.run_training import run_training

    if world > 1:  # launched by torchrun: one process per GPU, nnU-Net's trainer sees the process group
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        import torch

        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
    try:
        with _trainer_by_name():
            if args.val_best:
                _train_then_validate_best(args, fold, name, device)
            else:
                run_training(args.dataset, args.configuration, fold, TRAINER_NAME, name,
                             num_gpus=1 if world > 1 else args.num_gpus,
                             export_validation_probabilities=args.npz, continue_training=args.c,
                             only_run_validation=args.val, device=device)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _trainer_by_name():
    """nnU-Net's trainer lookup answered with our trainer class: nnU-Net searches its own package first and
    prints that the trainer is not there before it finds it on nnUNet_extTrainer (stock nnUNetv2_train)."""
    from unittest import mock

    import nnunetv2.run.run_training as nnunet_run

    from segframe.nnunet.trainer import nnUNetTrainerSegframe

    return mock.patch.object(nnunet_run, "recursive_find_trainer_class_by_name",
                             lambda name: nnUNetTrainerSegframe)


VALIDATION_BEST = "validation_best"


def _train_then_validate_best(args: argparse.Namespace, fold: int | str, plans_name: str, device) -> None:
    """`nnUNetv2_train --val_best` in one process: train (continue with --c; nothing with --val), then
    load checkpoint_best.pth and run nnU-Net's validation with it into fold_X/validation_best.

    nnU-Net 2.8.1's run_training does the same steps but validates into fold_X/validation, over the
    final weights' results, with no trace of which weights made them; here `validation` stays the final
    weights' and `validation_best` the best's. The final-weights validation is not run, as in nnU-Net.
    """
    import shutil

    import torch
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    from segframe.nnunet.checkpoints import NAMES

    trainer = get_trainer_from_args(args.dataset, args.configuration, fold, TRAINER_NAME, plans_name,
                                    args.c, device=device)
    if torch.cuda.is_available():  # as nnU-Net's run_training
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
    if not args.val:
        maybe_load_checkpoint(trainer, args.c, False)
        trainer.run_training()
    fold_dir = Path(trainer.output_folder)
    best = fold_dir / NAMES[2]
    if not best.is_file():
        raise SegframeError(f"no {best} to validate: no epoch had a finite EMA pseudo Dice (see the training "
                            "log); validate the final weights with --val instead")
    trainer.continue_training = False  # never fall back to another checkpoint: validate best or fail
    trainer.load_checkpoint(str(best))
    trainer.print_to_log_file(f"validating {NAMES[2]} (epoch {trainer.current_epoch}) into {VALIDATION_BEST}",
                              also_print_to_console=True)
    # perform_actual_validation writes into <output_folder>/validation; a staging output_folder puts it
    # beside the fold, and the rename below replaces an older validation_best only once it is complete
    staging = fold_dir / f".{VALIDATION_BEST}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    trainer.output_folder = str(staging)
    try:
        trainer.perform_actual_validation(args.npz)
    finally:
        trainer.output_folder = str(fold_dir)
    target = fold_dir / VALIDATION_BEST
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging / "validation", target)
    shutil.rmtree(staging, ignore_errors=True)
