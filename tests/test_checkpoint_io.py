"""Unit-level trust pieces, no nnU-Net run: weights-only loading and its messages, atomic_save, the
weights-vs-plans message, `train.precision`, the trainer step under CPU bf16 autocast (against torch's
own autocast recipe) and the NaN/inf guard.
"""

from __future__ import annotations

import copy
import os
from types import SimpleNamespace

import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from segframe.config import TrainConfig, validate_config
from segframe.errors import CheckpointError, ConfigError
from segframe.model import ViTSegModel
from segframe.nnunet.checkpoints import (
    UnreadableCheckpoint,
    atomic_save,
    check_weights_fit,
    load_checkpoint_file,
    readable_checkpoint,
)
from segframe.nnunet.runtime import check_validation_precision, resolve_precision
from segframe.nnunet.safety import NonFiniteTraining, better
from segframe.nnunet.trainer import nnUNetTrainerSegframe
from segframe.nnunet.window import ValidationPredictor


def fake_checkpoint(**extra) -> dict:
    """The shape of an nnU-Net checkpoint, with the numpy scalars its logger writes."""
    return {"network_weights": {"w": torch.ones(3)}, "optimizer_state": {}, "grad_scaler_state": None,
            "logging": {"ema_fg_dice": [np.float32(0.5)], "lrs": [1e-4]}, "_best_ema": np.float32(0.5),
            "current_epoch": 1, "init_args": {"fold": 0, "device": torch.device("cpu")},
            "trainer_name": "nnUNetTrainerSegframe", "inference_allowed_mirroring_axes": (0, 1), **extra}


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_weights_only_loading_refuses_code_and_names_it(tmp_path):
    atomic_save(fake_checkpoint(), tmp_path / "ok.pth")
    assert load_checkpoint_file(tmp_path / "ok.pth")["_best_ema"] == np.float32(0.5)
    marker = tmp_path / "ran"
    torch.save(fake_checkpoint(x=Payload(marker)), tmp_path / "evil.pth")
    before = (tmp_path / "evil.pth").read_bytes()
    with pytest.raises(CheckpointError, match=r"evil.pth: it holds posix.system.*--trust-checkpoint"):
        load_checkpoint_file(tmp_path / "evil.pth")
    assert not marker.exists() and (tmp_path / "evil.pth").read_bytes() == before
    load_checkpoint_file(tmp_path / "evil.pth", trust=True)  # trusted: it is unpickled (and runs)
    assert marker.exists()


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 cut short", b"hello", None])
def test_unreadable_files_are_one_clear_error(tmp_path, content):
    path = tmp_path / "c.pth"
    if content is None:  # a valid pickle that is not an nnU-Net checkpoint
        torch.save({"state_dict": {}}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(UnreadableCheckpoint, match=r"c.pth is (unreadable|not an nnU-Net)") as info:
        load_checkpoint_file(path)
    assert "\n" not in str(info.value)


def test_atomic_save_keeps_the_previous_file_when_the_save_fails(tmp_path):
    atomic_save(fake_checkpoint(), tmp_path / "latest.pth")
    before = (tmp_path / "latest.pth").read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - a lambda cannot be pickled: the write fails midway
        atomic_save(fake_checkpoint(bad=lambda: 0), tmp_path / "latest.pth")
    assert (tmp_path / "latest.pth").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pth"]  # no temporary file left


def test_readable_checkpoint_falls_back_to_the_newest_readable(tmp_path):
    atomic_save(fake_checkpoint(current_epoch=3), tmp_path / "checkpoint_best.pth")
    atomic_save(fake_checkpoint(current_epoch=4), tmp_path / "checkpoint_latest.pth")
    (tmp_path / "checkpoint_final.pth").write_bytes(b"cut")
    path, checkpoint, note = readable_checkpoint(tmp_path, "checkpoint_final.pth")
    assert path.name == "checkpoint_latest.pth" and checkpoint["current_epoch"] == 4
    assert "checkpoint_final.pth is unreadable" in note and "continuing from checkpoint_latest.pth" in note
    with pytest.raises(UnreadableCheckpoint):  # --val and predict never fall back
        readable_checkpoint(tmp_path, "checkpoint_final.pth", fallback=False)
    (tmp_path / "checkpoint_latest.pth").write_bytes(b"cut")
    (tmp_path / "checkpoint_best.pth").write_bytes(b"cut")
    with pytest.raises(CheckpointError, match="no readable checkpoint left"):
        readable_checkpoint(tmp_path, "checkpoint_final.pth")


def test_weights_that_do_not_fit_name_keys_and_shapes(tmp_path):
    expected = {"a": torch.zeros(2, 3), "b": torch.zeros(4), "c": torch.zeros(1)}
    check_weights_fit({"module.a": torch.ones(2, 3), "b": torch.ones(4), "c": torch.ones(1)}, expected,
                      tmp_path)
    with pytest.raises(CheckpointError, match=r"missing: c; unexpected: d; shape \(file vs plans\): "
                                              r"a \(3, 2\) vs \(2, 3\)"):
        check_weights_fit({"a": torch.ones(3, 2), "b": torch.ones(4), "d": torch.ones(1)}, expected, tmp_path)


def test_precision_resolution(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", cuda) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", cuda) == "fp16"
    with pytest.raises(ConfigError, match="train.precision: fp16 is not supported on mps"):
        resolve_precision("fp16", torch.device("mps"))
    with pytest.raises(ConfigError, match="train.precision"):
        validate_config({**tiny_config(), "train": {"precision": "fp8"}})
    # the training log's warning where the CPU only emulates bfloat16 (no AVX512_BF16 or AMX)
    from segframe.nnunet import runtime

    monkeypatch.setattr(runtime, "native_bf16", lambda: False)
    note = runtime.emulated_bf16_note("train.precision: bf16")
    assert "train.precision: bf16 is emulated and slower than fp32" in note
    monkeypatch.setattr(runtime, "native_bf16", lambda: True)
    assert runtime.emulated_bf16_note("train.precision: bf16") is None


def test_best_ema_comparison():
    assert better(0.4, None) and better(0.5, 0.4) and not better(0.4, 0.5)
    assert not better(float("nan"), None) and not better(float("nan"), 0.1) and better(0.1, float("nan"))


def stepper(precision: str, limit: int = 3):
    """The trainer's train_step on a tiny real model, without nnU-Net's folders (no __init__)."""
    torch.manual_seed(0)
    cfg = validate_config({**tiny_config(), "train": {"precision": precision, "max_nonfinite_steps": limit}})
    trainer = object.__new__(nnUNetTrainerSegframe)
    model = ViTSegModel(cfg, in_channels=3, num_classes=2).train()
    logs: list[str] = []
    trainer.__dict__.update(
        network=model, device=torch.device("cpu"), precision=precision, grad_scaler=None, is_ddp=False,
        segframe_config=cfg, iteration=0, nonfinite_in_a_row=0, current_epoch=0, initial_lr=1e-3,
        skeleton_recall=None, loss_parts={},
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), log_file="training_log.txt",
        loss=lambda out, target: F.cross_entropy(out.float(), target[:, 0].long()),
        label_manager=SimpleNamespace(ignore_label=None),
        print_to_log_file=lambda *args, **kwargs: logs.append(" ".join(map(str, args))),
    )
    return trainer, logs


def batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"data": torch.rand(2, 3, 28, 28, generator=g),
            "target": torch.randint(0, 2, (2, 1, 28, 28), generator=g)}


def test_cpu_bf16_step_matches_torch_autocast_recipe():
    trainer, _ = stepper("bf16")
    model = trainer.network
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    dtypes = []
    linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    out = trainer.train_step(batch())
    assert dtypes == [torch.bfloat16]  # the forward really ran under bf16 autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(reference(batch()["data"]).float(), batch()["target"][:, 0].long())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 12.0)
    ref_opt.step()
    assert float(out["loss"]) == pytest.approx(loss.item(), rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    untouched = stepper("bf16")[0].network.parameters()
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), untouched, strict=True))


def test_final_validation_predicts_with_segframes_window_and_bf16_then_restores_both(monkeypatch):
    trainer, _ = stepper("fp32")
    train = trainer.segframe_config.train.model_copy(update={"validation_precision": "bf16"})
    trainer.segframe_config = trainer.segframe_config.model_copy(update={"train": train})
    model = trainer.network.eval()
    x = batch()["data"]
    with torch.no_grad():
        reference = model(x)
    dtypes, seen, predictors = [], [], []
    next(m for m in model.modules() if isinstance(m, torch.nn.Linear)).register_forward_hook(
        lambda m, i, o: dtypes.append(o.dtype))

    def nnunet_validation(self, save_probabilities=False):  # what nnU-Net's validation does with the network
        predictors.append(nnunet_trainer_module.nnUNetPredictor)
        with torch.no_grad():
            seen.append(self.network(x))

    monkeypatch.setattr(nnUNetTrainer, "perform_actual_validation", nnunet_validation)
    trainer.perform_actual_validation()
    assert dtypes == [torch.bfloat16] and seen[0].dtype == torch.float32  # float32 to nnU-Net
    torch.testing.assert_close(seen[0], reference, rtol=0, atol=0.1)
    assert not torch.equal(seen[0], reference)
    assert "forward" not in vars(model)  # the class's forward again after the validation
    with torch.no_grad():
        model(x)
    assert dtypes[-1] == torch.float32
    trainer.segframe_config = trainer.segframe_config.model_copy(update={"train": TrainConfig()})
    trainer.perform_actual_validation()
    assert dtypes[-1] == torch.float32  # fp32 (the default): nnU-Net's validation as it is
    assert predictors == [ValidationPredictor] * 2  # segframe's window for both, then nnU-Net's
    assert nnunet_trainer_module.nnUNetPredictor is nnUNetPredictor
    check_validation_precision("bf16", torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"train.validation_precision: bf16 is for the CPU \(on cuda"):
        check_validation_precision("bf16", torch.device("cuda"))


def test_fp32_step_has_no_autocast():
    trainer, _ = stepper("fp32")
    dtypes = []
    next(m for m in trainer.network.modules() if isinstance(m, torch.nn.Linear)).register_forward_hook(
        lambda m, i, o: dtypes.append(o.dtype))
    trainer.train_step(batch())
    assert dtypes == [torch.float32]


def test_nonfinite_loss_never_reaches_the_weights():
    trainer, logs = stepper("fp32", limit=3)
    before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    finite_loss = trainer.loss
    trainer.loss = lambda out, target: finite_loss(out, target.clamp(0, 1)) * (
        float("nan") if target.max() > 1 else 1.0)
    bad = batch()
    bad["target"][0, 0, 0, 0] = 2  # this batch's loss is NaN
    for _ in range(2):
        out = trainer.train_step(bad)
        assert np.isnan(out["loss"])
    assert all(torch.equal(before[k], v) for k, v in trainer.network.state_dict().items())
    assert "epoch 0 iteration 2: the loss is nan; step skipped" in logs[-1] and "2 in a row" in logs[-1]
    trainer.train_step(batch())  # a finite step resets the count
    assert trainer.nonfinite_in_a_row == 0
    for _ in range(2):
        trainer.train_step(bad)
    with pytest.raises(NonFiniteTraining, match=r"3 steps in a row.*train.initial_lr.*train.precision.*"
                                                r"train.gradient_clip"):
        trainer.train_step(bad)
