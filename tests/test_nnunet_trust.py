"""A run you can trust, end to end on CPU: weights-only checkpoint loading (crafted pickles refused, nothing
runs), atomic checkpoint writes under SIGKILL, `--c` falling back to a readable checkpoint and keeping the
best EMA Dice, the NaN guard, refusals that change no file, and workers that die with `segframe train`.

Every run is tiny (dinov2 tiny, 2 epochs x 2 iterations, 48x48 patches, batch 2, one export process).
"""

import copy
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from nnunet_discs import DATASET, NAME, results, segframe, write_yaml

from segframe.files import partial_files
from segframe.nnunet import lifeline
from segframe.nnunet.checkpoints import ALLOWED_GLOBALS, atomic_save, load_checkpoint_file

TINY = {
    "model": {"backbone": "dinov2", "backbone_size": "tiny",
              "decoder": {"name": "upernet", "hidden_size": 16}},
    "train": {"num_epochs": 2, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1,
              "batch_size": 2, "patch_size": [48, 48], "save_every": 1, "warmup_epochs": 0},
}
MARKER = "PWNED"


@pytest.fixture(scope="module")
def env(disc_world):
    return disc_world


def tree(pid: int) -> dict[int, str]:
    """Live processes below `pid` with their start times (to tell a reused pid apart)."""
    out = {}
    for child in lifeline.descendants(pid):
        try:
            out[child] = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[19]
        except (OSError, IndexError):
            pass
    return out


def alive(pid: int, start: str) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z" and fields[19] == start


@pytest.fixture(scope="module")
def killed(env):
    """`segframe train` with 2 augmentation workers, SIGKILLed after epoch 0's checkpoints were written.
    Returns the fold folder, the processes it had, and the seconds until the last of them was gone."""
    config = write_yaml(Path(env["root"]) / "trust.yaml", TINY)
    cmd = [sys.executable, "-m", "segframe.cli", "train", str(DATASET), "2d", "0", "--config", str(config),
           "-device", "cpu"]
    proc = subprocess.Popen(cmd, env=dict(env, nnUNet_n_proc_DA="2"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.rstrip().endswith("Epoch 1"):  # printed after epoch 0's checkpoint_latest was written
            break
    processes = tree(proc.pid)
    proc.kill()
    proc.wait()
    start = time.perf_counter()
    while any(alive(p, s) for p, s in processes.items()) and time.perf_counter() - start < 10:
        time.sleep(0.05)
    gone = time.perf_counter() - start
    survivors = [p for p, s in processes.items() if alive(p, s)]
    for pid in survivors:  # never leave them on the machine, even when the test fails
        os.kill(pid, signal.SIGKILL)
    proc.stdout.close()
    return results(env, "trust") / "fold_0", processes, gone, survivors, "".join(seen)


def sha(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def error(env: dict, *args) -> str:
    """The one error line of a refused command (exit 1, no traceback)."""
    done = segframe(env, *args, check=False)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("segframe ")]
    assert len(lines) == 1 and ": error: " in lines[0], done.stderr
    return lines[0]


def test_workers_die_with_a_killed_train(killed):
    fold, processes, gone, survivors, log = killed
    assert len(processes) >= 4, (processes, log[-2000:])  # training child + 2 train + 1 val workers
    assert not survivors, f"still alive 10 s after the SIGKILL: {survivors}"
    print(f"\norphan test: {len(processes)} processes below segframe train, gone {gone:.2f} s after SIGKILL")


def test_kill_during_save_keeps_the_previous_checkpoint(killed):
    """SIGKILL a process that writes checkpoint_latest.pth with atomic_save at 25 moments of the write: the
    file always loads with the weights of the run; `resumed` below then continues (--c) from it."""
    target = killed[0] / "checkpoint_latest.pth"
    previous = load_checkpoint_file(target)
    weights = previous["network_weights"]

    padding = torch.rand(16 * 2**20)  # a realistic size to cut: ~64 MB more than the tiny model

    def save_in_child(i: int) -> int:
        pid = os.fork()
        if pid == 0:  # only serialisation here: no torch op that could wait on the parent's thread pool
            try:
                atomic_save(dict(previous, padding=padding, marker=i), target)
            finally:
                os._exit(0)
        return pid

    start = time.perf_counter()
    os.waitpid(save_in_child(-1), 0)
    duration = time.perf_counter() - start
    mid_write = 0
    for k in range(25):
        pid = save_in_child(k)
        time.sleep(duration * k / 24)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        mid_write += bool(partial_files(target))
        loaded = load_checkpoint_file(target)
        assert loaded["network_weights"].keys() == weights.keys()
        assert all(torch.equal(loaded["network_weights"][key], weights[key]) for key in list(weights)[:5])
        assert loaded["marker"] in range(-1, k + 1)
    print(f"\nkill-during-save: a save takes {duration:.2f} s; {mid_write} of 25 kills landed mid-write")
    assert mid_write >= 5  # the kills really cut writes (10-15 of 25 on a loaded 2-core machine)


@pytest.fixture(scope="module")
def resumed(env, killed):
    """The killed run's EMA bookkeeping, then `--c` to the end after checkpoint_best got a better EMA
    (0.999) than the resumed run can reach."""
    fold = killed[0]
    latest = load_checkpoint_file(fold / "checkpoint_latest.pth")
    best = load_checkpoint_file(fold / "checkpoint_best.pth")
    emas = latest["_best_ema"], best["_best_ema"]
    best["_best_ema"] = np.float32(0.999)
    atomic_save(best, fold / "checkpoint_best.pth")
    before = (fold / "checkpoint_best.pth").read_bytes()
    out = segframe(env, "train", DATASET, "2d", "0", "--c", "--name", "trust", "-device", "cpu")
    return fold, emas, before, out


def test_continue_keeps_the_best_ema_and_checkpoint_best_only_improves(resumed):
    fold, (latest_ema, best_ema), before, out = resumed
    # nnU-Net writes latest before it updates _best_ema (None after epoch 0); ours carries the best
    assert latest_ema is not None and latest_ema == best_ema
    assert "continuing at epoch 1" in out.stdout
    assert "best EMA pseudo Dice 0.9990 from checkpoint_best.pth" in out.stdout
    assert "New best" not in out.stdout.split("continuing at epoch 1")[1]
    assert (fold / "checkpoint_best.pth").read_bytes() == before
    final = load_checkpoint_file(fold / "checkpoint_final.pth")
    assert final["current_epoch"] == 2 and abs(float(final["_best_ema"]) - 0.999) < 1e-6


def test_allowlist_is_the_smallest_that_loads_our_checkpoints(resumed):
    """Measured on the checkpoints the training above wrote: each entry is needed, nothing else is."""
    fold = resumed[0]
    for name in ("checkpoint_final.pth", "checkpoint_best.pth"):
        found = set(torch.serialization.get_unsafe_globals_in_checkpoint(fold / name))
        assert found == {"numpy._core.multiarray.scalar", "numpy.dtype"}, found
        load_checkpoint_file(fold / name)
    needed = [g for g in ALLOWED_GLOBALS if not isinstance(g, tuple)]  # the tuple is numpy 1's name of scalar
    for dropped in needed:
        with torch.serialization.safe_globals([g for g in needed if g is not dropped]):
            with pytest.raises(Exception, match="Weights only load failed"):
                torch.load(fold / "checkpoint_final.pth", weights_only=True)


def crafted(real: Path, target: Path, marker: Path) -> None:
    """A real checkpoint with a payload that would create `marker` when unpickled."""
    class Payload:
        def __reduce__(self):
            return (os.system, (f"echo {MARKER} > {marker}",))

    checkpoint = torch.load(real, weights_only=False)
    checkpoint["logging"]["extra"] = Payload()
    torch.save(checkpoint, target)


def test_crafted_pickles_are_refused_and_run_nothing(env, resumed, tmp_path):
    fold = resumed[0]
    marker = tmp_path / "ran"
    # --c on a fold whose checkpoint_latest carries a payload
    evil_fold = fold.parent / "fold_2"
    evil_fold.mkdir()
    crafted(fold / "checkpoint_final.pth", evil_fold / "checkpoint_latest.pth", marker)
    hashes = sha(Path(env["root"]))
    message = error(env, "train", DATASET, "2d", "2", "--c", "--name", "trust", "-device", "cpu")
    assert "refusing to load" in message and "fold_2/checkpoint_latest.pth" in message
    assert "posix.system" in message and "--trust-checkpoint" in message
    assert not marker.exists() and sha(Path(env["root"])) == hashes

    # segframe predict on a results folder whose checkpoint_final carries it
    moved = tmp_path / fold.parent.name
    shutil.copytree(fold.parent, moved, ignore=shutil.ignore_patterns("fold_2"))
    crafted(fold / "checkpoint_final.pth", moved / "fold_0" / "checkpoint_final.pth", marker)
    images = Path(env["nnUNet_raw"], NAME, "imagesTs")
    message = error(env, "predict", "-i", images, "-o", tmp_path / "out", "-m", moved, "-device", "cpu")
    assert "refusing to load" in message and "posix.system" in message
    assert not marker.exists() and not (tmp_path / "out").exists()
    shutil.rmtree(evil_fold)


def test_real_results_folder_predicts_without_trust(env, resumed, tmp_path):
    images = Path(env["nnUNet_raw"], NAME, "imagesTs")
    segframe(env, "predict", "-i", images, "-o", tmp_path / "out", "-m", resumed[0].parent, "-device", "cpu",
             "--disable_tta")
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [f"ts_{i:03d}.png" for i in range(4)]


def test_continue_falls_back_to_the_newest_readable_checkpoint(env, resumed):
    fold = resumed[0]
    other = fold.parent / "fold_1"
    other.mkdir()
    shutil.copy(fold / "checkpoint_best.pth", other / "checkpoint_latest.pth")  # epoch 0's
    broken = (fold / "checkpoint_final.pth").read_bytes()[:5000]
    (other / "checkpoint_final.pth").write_bytes(broken)
    out = segframe(env, "train", DATASET, "2d", "1", "--c", "--name", "trust", "-device", "cpu")
    notes = [line for line in out.stdout.splitlines() if line.startswith("segframe: ") and "unreadab" in line]
    assert len(notes) == 1 and "fold_1/checkpoint_final.pth is unreadable" in notes[0], out.stdout[-3000:]
    assert "continuing from checkpoint_latest.pth" in notes[0]
    assert "continuing at epoch 1" in out.stdout
    assert load_checkpoint_file(other / "checkpoint_final.pth")["current_epoch"] == 2


def test_diverging_run_stops_without_writing_nan_weights(env, tmp_path):
    cfg = copy.deepcopy(TINY)
    # a step so large that the next forward overflows: NaN losses, skipped, then the stop (a milder lr
    # diverges without NaN and is stopped at the epoch's validation: tests/test_faults.py)
    cfg["train"].update(initial_lr=1e30, max_nonfinite_steps=2, num_iterations_per_epoch=4)
    config = write_yaml(tmp_path / "nan.yaml", cfg)
    message = error(env, "train", DATASET, "2d", "0", "--config", config, "-device", "cpu")
    for fix in ("train.initial_lr", "train.precision", "train.gradient_clip"):
        assert fix in message
    fold = results(env, "nan") / "fold_0"
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert re.search(r"epoch \d iteration \d: the (loss|gradient norm) is (nan|inf); step skipped", log), log
    assert not (fold / "checkpoint_final.pth").exists()
    for path in fold.glob("checkpoint_*.pth"):
        weights = load_checkpoint_file(path)["network_weights"]
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_refusals_change_no_file(env, resumed, tmp_path):
    root, fold = Path(env["root"]), resumed[0]

    def refused(expect: str, *args) -> str:
        before = sha(root)
        message = error(env, "train", DATASET, "2d", *args, "-device", "cpu")
        assert expect in message
        assert sha(root) == before
        return message

    # the case: a changed train: section over a fold with checkpoints, without --c
    cfg = copy.deepcopy(TINY)
    cfg["train"]["num_epochs"] = 50
    refused("--c to continue", "0", "--config", write_yaml(tmp_path / "trust.yaml", cfg))
    final = (fold / "checkpoint_final.pth").read_bytes()
    cut = fold.parent / "fold_3"
    cut.mkdir()
    (cut / "checkpoint_final.pth").write_bytes(final[: len(final) // 3])
    message = refused("is unreadable", "3", "--val", "--name", "trust")
    assert "fold_3/checkpoint_final.pth" in message
    (cut / "checkpoint_latest.pth").write_bytes(b"not a checkpoint at all")
    refused("no readable checkpoint left", "3", "--c", "--name", "trust")
    checkpoint = load_checkpoint_file(fold / "checkpoint_final.pth")
    weights = checkpoint["network_weights"]
    dropped = next(k for k in weights if k.startswith("decoder."))
    weights.pop(dropped)
    reshaped = next(k for k in weights if k.endswith("weight") and weights[k].ndim == 4)
    weights[reshaped] = torch.zeros(1, *weights[reshaped].shape[1:])
    other = fold.parent / "fold_4"
    other.mkdir()
    atomic_save(checkpoint, other / "checkpoint_latest.pth")
    message = refused("do not fit", "4", "--c", "--name", "trust")
    assert f"missing: {dropped}" in message and reshaped in message


def test_predictor_initialisation_refuses_bad_results_folders(resumed, tmp_path, monkeypatch):
    """ResultsFolder.initialize (what `segframe predict` and Predictor.from_results use) on a real folder and
    on broken copies of it; nnU-Net's own unpickling initialisation is the reference for the good one."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from segframe.errors import CheckpointError, SegframeError
    from segframe.nnunet import EXT_TRAINER_DIR
    from segframe.nnunet.results import ResultsFolder

    def cpu_predictor():
        return nnUNetPredictor(device=torch.device("cpu"))

    folder = resumed[0].parent
    ours, reference = (nnUNetPredictor(device=torch.device("cpu")) for _ in range(2))
    ResultsFolder(folder).initialize(ours, [0], "checkpoint_final.pth")
    monkeypatch.setenv("nnUNet_extTrainer", str(EXT_TRAINER_DIR))  # nnU-Net finds our trainer by name
    reference.initialize_from_trained_model_folder(str(folder), [0], "checkpoint_final.pth")
    assert ours.allowed_mirroring_axes == reference.allowed_mirroring_axes
    assert ours.configuration_manager.configuration == reference.configuration_manager.configuration
    for (key, a), b in zip(ours.network.state_dict().items(), reference.network.state_dict().values(),
                           strict=True):
        assert torch.equal(a, b), key

    moved = tmp_path / folder.name
    shutil.copytree(folder, moved, ignore=shutil.ignore_patterns("fold_[1-9]", "validation"))
    final = moved / "fold_0" / "checkpoint_final.pth"
    (moved / "fold_0" / "checkpoint_cut.pth").write_bytes(final.read_bytes()[:20000])
    with pytest.raises(CheckpointError, match="fold_0/checkpoint_cut.pth is unreadable"):
        ResultsFolder(moved).initialize(cpu_predictor(), [0], "checkpoint_cut.pth")
    checkpoint = load_checkpoint_file(final)
    checkpoint["trainer_name"] = "nnUNetTrainer"
    atomic_save(checkpoint, moved / "fold_0" / "checkpoint_other.pth")
    with pytest.raises(CheckpointError, match="was trained by 'nnUNetTrainer'"):
        ResultsFolder(moved).initialize(cpu_predictor(), [0], "checkpoint_other.pth")
    plans = json.loads((moved / "plans.json").read_text())
    plans["configurations"]["2d"]["segframe"]["config"]["model"]["decoder"]["hidden_size"] = 8
    (moved / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(CheckpointError, match=r"do not fit the model.*shape \(file vs plans\): decoder\."):
        ResultsFolder(moved).initialize(cpu_predictor(), [0], "checkpoint_final.pth")
    (moved / "plans.json").unlink()
    with pytest.raises(SegframeError, match="plans.json of the results folder .*not found"):
        ResultsFolder(moved).initialize(cpu_predictor(), [0], "checkpoint_final.pth")
