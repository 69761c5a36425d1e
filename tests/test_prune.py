"""Blocks after the last chosen layer (and a final norm the features skip) are not built.

The output is checked against the same model built whole (as before pruning) on the same weights,
the parameter count against a hand count of a block's parameters, pretrained files against the
writers of test_checkpoints (official layout) and transformers' own DINOv3 (Hugging Face layout),
and results folders trained before pruning (whole-backbone checkpoints) through `segframe predict`'s
predictor initialisation and the trainer's `--c` loading.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_config
from nnunetv2.training.logging.nnunet_logger import LocalLogger
from test_checkpoints import make_file
from test_hf_checkpoints import CASES as HF_CASES
from test_hf_checkpoints import randomize  # random weights everywhere: timm's layer scale 1e-5 hides a block

from segframe.backbones.base import Backbone
from segframe.backbones.checkpoint import unbuilt_keys
from segframe.config import validate_config
from segframe.errors import CheckpointError, SegframeError
from segframe.model import ViTSegModel

D, DEPTH = 64, 4  # the tiny backbones
X = torch.rand(2, 3, 37, 45, generator=torch.Generator().manual_seed(0))


def whole(monkeypatch, cfg) -> ViTSegModel:
    """The model as built before pruning: every block and the final norm, unused ones frozen."""
    with monkeypatch.context() as m:
        m.setattr(Backbone, "prune", lambda self, layers, norm: [])
        model = ViTSegModel(cfg)
    vit = model.backbone.vit
    for block in list(vit.blocks)[max(model.layers) + 1:]:
        block.requires_grad_(False)
    if not model.intermediate_norm:
        vit.norm.requires_grad_(False)
    return model


def block_parameters(family: str) -> int:
    """One block by hand: qkv 3D^2 + proj D^2 + fc1 4D^2 + fc2 4D^2 weights; biases of proj (D), fc1 (4D)
    and fc2 (D); two LayerNorms (4D); qkv's bias (3D; DINOv3 keeps only q and v, 2D, k's is a buffer);
    LayerScale (2D) in DINOv2 and DINOv3."""
    qkv_bias = 2 * D if family == "dinov3" else 3 * D
    layer_scale = 2 * D if family in ("dinov2", "dinov3") else 0
    return 12 * D * D + 6 * D + 4 * D + qkv_bias + layer_scale


# (family, layers, intermediate_norm): blocks after max(layers) go; the final norm goes when not normed
PRUNES = [("dinov3", [0, 1], None), ("dinov2", [1], None), ("retfound", [0, 2], None),
          ("dinov2", [0, 1], False)]


@pytest.mark.parametrize("family,layers,norm", PRUNES)
def test_pruned_model_gives_the_same_logits_with_fewer_parameters(monkeypatch, family, layers, norm):
    cfg = validate_config(tiny_config(family, layers=layers, intermediate_norm=norm))
    reference = randomize(whole(monkeypatch, cfg))
    pruned = ViTSegModel(cfg).eval()
    assert len(pruned.backbone.vit.blocks) == max(layers) + 1
    norm_pruned = not pruned.intermediate_norm
    assert isinstance(pruned.backbone.vit.norm, torch.nn.Identity) == norm_pruned
    # the pruned model's keys are the reference's minus exactly the pruned modules' keys
    ref_sd = reference.state_dict()
    gone = set(ref_sd) - set(pruned.state_dict())
    assert gone == set(unbuilt_keys(ref_sd, pruned.state_dict(), "backbone.vit."))
    assert {int(k.split(".")[3]) for k in gone if ".blocks." in k} == set(range(max(layers) + 1, DEPTH))
    pruned.load_state_dict({k: v for k, v in ref_sd.items() if k not in gone})
    with torch.no_grad():
        torch.testing.assert_close(pruned(X), reference(X), rtol=0, atol=1e-6)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    by_hand = (DEPTH - 1 - max(layers)) * block_parameters(family) + (2 * D if norm_pruned else 0)
    assert count(reference) - count(pruned) == by_hand
    # nothing trainable was lost: the pruned modules were the frozen ones
    trainable = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert trainable(reference) == trainable(pruned)


def test_lora_and_grad_checkpointing_on_a_pruned_backbone(monkeypatch):
    """Adapters only on the built blocks, and the training step with checkpointing gives the same
    gradients as the whole model's."""
    cfg = validate_config({**tiny_config("dinov3", layers=[0, 1], grad_checkpointing=True),
                           "lora": {"enabled": True, "r": 2, "lora_dropout": 0.0}})
    reference = randomize(whole(monkeypatch, cfg))
    pruned = ViTSegModel(cfg)
    pruned.load_state_dict(reference.state_dict())  # a whole model's state dict: pruned keys skipped
    adapters = [k for k, _ in pruned.named_parameters() if ".lora_" in k]
    assert {int(k.split(".")[3]) for k in adapters} == {0, 1}
    grads = []
    for model in (reference, pruned):
        model.train()
        model(X).square().mean().backward()
        grads.append({k: p.grad for k, p in model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1])
    for k, g in grads[1].items():
        torch.testing.assert_close(g, grads[0][k], rtol=1e-5, atol=1e-7, msg=k)


# ---------------------------------------------------------------- pretrained files

@pytest.mark.parametrize("case", ["dinov3", "dinov2", "retfound_mae"])
def test_full_official_file_loads_and_reports_the_pruned_blocks(case, tmp_path):
    writer, contents = make_file(case)  # the whole tiny backbone, written in the official layout
    path = tmp_path / "official.pth"
    torch.save(contents, path)
    family = case.split("_")[0]
    model = ViTSegModel(validate_config(tiny_config(family, layers=[0, 1], checkpoint_path=str(path))))
    report = model.load_pretrained()
    sd = contents.get("model", contents)
    want = {k for k in sd if k.startswith(("blocks.2.", "blocks.3."))}  # the file's own key names
    if not model.intermediate_norm:  # RETFound-MAE: features are not normed
        want |= {"norm.weight", "norm.bias"}
    assert set(report.pruned) == want and not report.missing
    assert not set(report.pruned) & set(report.loaded)
    modules = "blocks 2..3, final norm" if not model.intermediate_norm else "blocks 2..3"
    assert f"dropped {len(want)} keys of modules the model does not run ({modules})" in report.summary()
    p = writer.patch_size
    x = torch.randn(1, 3, 3 * p, 4 * p)
    with torch.no_grad():
        got = model.backbone.features(x, [0, 1], model.intermediate_norm)
        ref = writer.features(x, [0, 1], model.intermediate_norm)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # strict for everything else: a built block's key missing, or a key no module has, is an error
    for broken, match in (({k: v for k, v in sd.items() if not k.startswith("blocks.1.")}, "missing"),
                          ({**sd, "blocks.1.extra": torch.ones(1)}, "unexpected")):
        torch.save(broken, path)
        with pytest.raises(CheckpointError, match=match):
            model.load_pretrained()


def test_full_hugging_face_folder_loads_into_a_pruned_backbone(tmp_path):
    """transformers' DINOv3ViTModel is the reference: blocks 0 and 1 (its hidden_states[1:3]) and its
    final norm applied to block 1's output."""
    config, model_cls, build, _ = HF_CASES["dinov3"]
    hf = randomize(model_cls(config))
    hf.save_pretrained(tmp_path)
    b = build()
    b.prune([0, 1], norm=True)
    report = b.load_checkpoint(tmp_path)
    assert report.format == "Hugging Face DINOv3ViTModel" and not report.missing
    assert {k.split(".")[1] for k in report.pruned} == {"2", "3"}
    assert "(blocks 2..3)" in report.summary()
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        out = hf(pixel_values=x, output_hidden_states=True)
        feats, prefix = b.eval().features(x, [0, 1], norm=False, prefix_tokens=True)
        (normed,), (normed_prefix,) = b.features(x, [1], norm=True, prefix_tokens=True)
    tokens = lambda f, t: torch.cat([t, f.flatten(2).transpose(1, 2)], 1)  # noqa: E731
    for i in (0, 1):
        torch.testing.assert_close(tokens(feats[i], prefix[i]), out.hidden_states[i + 1], rtol=0, atol=1e-4)
    normed_ref = hf.norm(out.hidden_states[2])  # transformers' own final norm on block 1's output
    torch.testing.assert_close(tokens(normed, normed_prefix), normed_ref, rtol=0, atol=1e-4)


def test_a_pruned_backbone_refuses_what_it_no_longer_builds():
    b = make_file("dinov2")[0]
    b.prune([1], norm=False)
    with pytest.raises(SegframeError, match="pruned after block 1"):
        b.features(torch.rand(1, 3, 28, 28), [0, 2], norm=False)
    with pytest.raises(SegframeError, match="final norm .* was pruned"):
        b.features(torch.rand(1, 3, 28, 28), [0, 1], norm=True)


# ---------------------------------------------------------------- results folders trained before pruning

def old_results_folder(tmp_path, monkeypatch, cfg) -> tuple:
    """A results folder as segframe wrote it before pruning: plans with the config, dataset.json, and a
    fold_0 checkpoint of the whole model (with the optimizer state of one step). Returns (folder, the
    whole model, its checkpoint)."""
    from segframe.nnunet.checkpoints import atomic_save
    from segframe.nnunet.plans import make_plans

    arch = {"network_class_name": "x", "arch_kwargs": {}, "_kw_requires_import": []}
    base = {"plans_name": "nnUNetPlans", "dataset_name": "Dataset990_X", "configurations": {
        "2d": {"patch_size": [32, 32], "batch_size": 2, "data_identifier": "nnUNetPlans_2d",
               "architecture": arch}}}
    plans, _ = make_plans(base, "2d", cfg, "nnUNetPlans_segframe", 14)
    folder = tmp_path / "nnUNetTrainerSegframe__nnUNetPlans_segframe__2d"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "R", "1": "G", "2": "B"}, "labels": {"background": 0, "vessel": 1},
        "numTraining": 1, "file_ending": ".png"}))
    model = randomize(whole(monkeypatch, cfg)).train()
    optimizer = torch.optim.AdamW(model.param_groups(1e-3, 3e-5), lr=1e-3)
    model(X).square().mean().backward()
    optimizer.step()
    logger = LocalLogger()
    logger.log("ema_fg_dice", np.float32(0.5), 0)
    checkpoint = {"network_weights": model.state_dict(), "optimizer_state": optimizer.state_dict(),
                  "grad_scaler_state": None, "logging": logger.get_checkpoint(), "_best_ema": np.float32(0.5),
                  "current_epoch": 1, "init_args": {"configuration": "2d", "fold": 0},
                  "trainer_name": "nnUNetTrainerSegframe", "inference_allowed_mirroring_axes": (0, 1)}
    atomic_save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    return folder, model.eval(), checkpoint


def test_results_folder_trained_before_pruning_predicts(tmp_path, monkeypatch):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from segframe.nnunet.checkpoints import check_weights_fit
    from segframe.nnunet.results import ResultsFolder

    cfg = validate_config(tiny_config("dinov2", layers=[0, 1], intermediate_norm=False))
    folder, old, checkpoint = old_results_folder(tmp_path, monkeypatch, cfg)
    assert any(k.startswith("backbone.vit.blocks.3.") for k in checkpoint["network_weights"])
    predictor = nnUNetPredictor(device=torch.device("cpu"))
    ResultsFolder(folder).initialize(predictor, [0], "checkpoint_final.pth")
    network = predictor.network.eval()
    assert len(network.backbone.vit.blocks) == 2
    # nnU-Net's predictor loads each fold's weights again before predicting
    network.load_state_dict(predictor.list_of_parameters[0])
    with torch.no_grad():
        torch.testing.assert_close(network(X), old(X), rtol=0, atol=1e-6)
    # only the pruned modules' keys are let through: anything else still does not fit
    weights = dict(checkpoint["network_weights"])
    weights.pop("backbone.vit.blocks.1.norm1.weight")
    with pytest.raises(CheckpointError, match="missing: backbone.vit.blocks.1.norm1.weight"):
        check_weights_fit(weights, network.state_dict(), folder)


def test_training_continues_from_a_checkpoint_written_before_pruning(tmp_path, monkeypatch):
    """The trainer's load_checkpoint (`--c`): weights and optimizer state load into the pruned model."""
    from segframe.nnunet.trainer import nnUNetTrainerSegframe

    cfg = validate_config(tiny_config("dinov3", layers=[0, 2]))
    folder, old, checkpoint = old_results_folder(tmp_path, monkeypatch, cfg)
    model = ViTSegModel(cfg)
    optimizer = torch.optim.AdamW(model.param_groups(1e-3, 3e-5), lr=1e-3)
    trainer = object.__new__(nnUNetTrainerSegframe)
    trainer.__dict__.update(
        network=model, optimizer=optimizer, grad_scaler=None, was_initialized=True, continue_training=True,
        trust_checkpoint=False, logger=LocalLogger(), inference_allowed_mirroring_axes=None,
        print_to_log_file=lambda *a, **k: None)
    trainer.load_checkpoint(str(folder / "fold_0" / "checkpoint_final.pth"))
    assert trainer.current_epoch == 1
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(X), old(X), rtol=0, atol=1e-6)
    # the optimizer's moments are the old run's, parameter by parameter
    old_state = checkpoint["optimizer_state"]["state"]
    new_state = optimizer.state_dict()["state"]
    assert len(new_state) == len(old_state) > 0
    for i, state in old_state.items():
        torch.testing.assert_close(new_state[i]["exp_avg"], state["exp_avg"], rtol=0, atol=0)
