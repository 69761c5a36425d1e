"""Parity with the older nnU-Net fork: every one of its 24 ViT configs, migrated by `segframe config
migrate`, builds the fork's network and trains it the fork's way.

For each config the fork's own model code (tests/fork_reference.py, pretrained=False) and the
migrated segframe model are built with the same tiny backbone (12 blocks of width 64: the fork's
heads know only 12 or 24 blocks), the fork's weights are copied across, and the test checks equal
trainable and total parameter counts per part, equal outputs on an odd-size input, and the
optimizer's per-parameter settings and learning rates over the first epochs against the fork
trainer's. Where segframe deliberately differs, the migrate report's DIFFERENCE line is checked.
"""

from __future__ import annotations

import inspect
import re
from types import SimpleNamespace

import pytest
import torch
import yaml
from fork_reference import (
    FORK_CONFIGS,
    FORK_TRAIN_DEFAULTS,
    TINY_ARCH,
    build_fork_model,
    fork_configure_optimizers_source,
    fork_optimizer,
    require_fork,
)

from segframe.backbones import dinov2, dinov3, retfound, visionfm
from segframe.config import validate_config
from segframe.migrate import migrate_config
from segframe.model import ViTSegModel

# segframe keeps DINOv3's q/v attention biases (zero for timm's weights, frozen with the backbone); the
# fork's timm model has none: the same function, these parameters more in segframe's total
ZERO_BIASES = re.compile(r"\.attn\.[qv]_bias$")
# modules of the fork's heads that its forward never runs (segframe does not build them; the migrate
# report has a note line): transformers' DPT builds residual_layer1 of the first fusion layer, unused
NEVER_RUN = re.compile(r"^neck\.fusion_stage\.layers\.0\.residual_layer1\.")


def shifted_by_the_fork(data: dict) -> bool:
    """The fork's UNETR and Primus scale the token grid by 16: on DINOv2's 14-pixel patch their
    logits were shifted against the image, which segframe deliberately does not copy."""
    return data["model"]["backbone"] == "dinov2" and data["model"]["model_path"].endswith(("unetr", "primus"))


def deliberate_differences(data: dict) -> list[str]:
    """The report keys of segframe's deliberate differences for a fork config, weights given."""
    patch14 = data["model"]["backbone"] == "dinov2"
    return ["model.model_path"] * shifted_by_the_fork(data) + ["train.patch_size"] * patch14


@pytest.fixture
def tiny_backbones(monkeypatch):
    """segframe's sizes the fork's configs name, shrunk to TINY_ARCH (the same timm architectures)."""
    for sizes, size in ((dinov3.SIZES, "large"), (dinov2.SIZES, "large"), (retfound.SIZES["mae"], "large"),
                        (visionfm.SIZES, "base")):
        monkeypatch.setitem(sizes, size, (sizes[size][0], TINY_ARCH))


def _fork_key(key: str) -> str:
    """A fork state-dict key in segframe's backbone naming (peft's wrapper removed)."""
    key = key.replace("backbone.base_model.model.", "backbone.", 1)
    return "backbone.vit." + key.removeprefix("backbone.") if key.startswith("backbone.") else key


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """A weight's shape with a 1x1 kernel dropped: a Linear and a 1x1 Conv2d hold the same weights."""
    shape = tuple(tensor.shape)
    return shape[:2] if len(shape) == 4 and shape[2:] == (1, 1) else shape


def _copy_weights(fork: torch.nn.Module, ours: ViTSegModel) -> dict[str, str]:
    """Copy the fork's weights into `ours`; returns fork parameter name -> segframe parameter name.
    Backbone keys map by name; head keys pair in order with equal shapes."""
    fork_sd, our_sd = fork.state_dict(), ours.state_dict()
    fork_head = [k for k in fork_sd if not k.startswith("backbone.") and not NEVER_RUN.search(k)]
    our_head = [k for k in our_sd if not k.startswith("backbone.")]
    shapes = ([_shape(fork_sd[k]) for k in fork_head], [_shape(our_sd[k]) for k in our_head])
    assert shapes[0] == shapes[1], "the heads' weights differ in order or shape"
    names = {k: _fork_key(k) for k in fork_sd if k.startswith("backbone.")}
    names |= dict(zip(fork_head, our_head, strict=True))
    missing = set(our_sd) - set(names.values())
    assert all(ZERO_BIASES.search(k) or k.endswith("rope.periods") for k in missing), sorted(missing)
    with torch.no_grad():
        for key in missing:
            if ZERO_BIASES.search(key):
                our_sd[key].zero_()
        for src, dst in names.items():
            our_sd[dst].copy_(fork_sd[src].reshape(our_sd[dst].shape))
    return names


def _counts(model: torch.nn.Module, skip: re.Pattern | None = None,
            never_run: re.Pattern | None = None) -> dict[str, tuple[int, int]]:
    parts: dict[str, list[int]] = {"backbone": [0, 0], "head": [0, 0]}
    for name, p in model.named_parameters():
        if skip is not None and skip.search(name):
            assert not p.requires_grad and not p.any(), name
            continue
        if never_run is not None and never_run.search(name):
            continue
        part = parts["backbone" if name.startswith("backbone.") else "head"]
        part[0] += p.numel() * p.requires_grad
        part[1] += p.numel()
    return {k: tuple(v) for k, v in parts.items()}


def _segframe_optimizer(model: ViTSegModel, cfg):
    from segframe.nnunet.trainer import nnUNetTrainerSegframe

    train = cfg.train
    trainer = SimpleNamespace(segframe_config=cfg, model=model, initial_lr=train.initial_lr,
                              weight_decay=train.weight_decay, num_epochs=train.num_epochs)
    return nnUNetTrainerSegframe.configure_optimizers(trainer)


def _settings(optimizer, names: dict[int, str]) -> dict[str, tuple]:
    """parameter name -> (lr, weight decay, momentum, nesterov) of every parameter with a gradient
    (of those `names` holds: the fork's never-run modules are not compared)."""
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad and id(p) in names:
                out[names[id(p)]] = (group["lr"], group["weight_decay"], group.get("momentum"),
                                     group.get("nesterov"))
    return out


def test_fork_trainer_optimizes_as_stock_nnunet():
    """fork_reference calls the installed nnU-Net's configure_optimizers: the fork's is the same code."""
    require_fork()
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    def code(text: str) -> str:
        return re.sub(r"\s+", "", text).replace(",)", ")")

    stock = inspect.getsource(nnUNetTrainer.configure_optimizers)
    assert code(fork_configure_optimizers_source()) == code(stock)


@pytest.mark.parametrize("path", FORK_CONFIGS, ids=[p.stem for p in FORK_CONFIGS])
def test_migrated_config_builds_and_trains_the_forks_network(path, tiny_backbones, request):
    require_fork()
    torch.manual_seed(0)
    data = yaml.safe_load(path.read_text())
    migration = migrate_config(data, path.name, checkpoint="weights.safetensors")
    cfg = validate_config({k: v for k, v in migration.config.items() if v})
    fork = build_fork_model(path, num_classes=2, arch=TINY_ARCH)
    ours = ViTSegModel(cfg, in_channels=3, num_classes=2)
    with torch.no_grad():  # every weight away from its initial value (LoRA's B starts at zero)
        for p in fork.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    names = _copy_weights(fork, ours)

    assert _counts(fork, never_run=NEVER_RUN) == _counts(ours, ZERO_BIASES)
    unused = {n for n, _ in fork.named_parameters() if NEVER_RUN.search(n)}
    assert bool(unused) == path.stem.startswith("dpt")
    assert ("note: the fork's model_dpt also held" in "\n".join(migration.lines)) == bool(unused)
    ran: set[str] = set()
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: ran.add(n)) for n, m in fork.named_modules()
             if NEVER_RUN.search(n + ".")]
    fork.eval(), ours.eval()
    x = torch.rand(1, 3, 45, 61)
    with torch.no_grad():
        expected, got = fork(x), ours(x)
    for hook in hooks:
        hook.remove()
    assert not ran, f"the fork ran {sorted(ran)}"
    assert got.shape == expected.shape == (1, 2, 45, 61)
    if shifted_by_the_fork(data):  # the report says so (test_report_lists_exactly_the_deliberate_differences)
        assert (got - expected).abs().max().item() > 1e-2
    else:  # 1e-4 max abs, scaled for logits beyond 1: float32 rounds relative to the value (DPT on the
        # DINOv2 test config reaches |logit| 40, where its sums of thousands of products round to 3e-4)
        assert (got - expected).abs().max().item() < 1e-4 * max(1.0, expected.abs().max().item())

    fork_opt, fork_schedule = fork_optimizer(fork, path)
    our_opt, our_schedule = _segframe_optimizer(ours, cfg)
    fork_names = {id(p): names[n] for n, p in fork.named_parameters() if not NEVER_RUN.search(n)}
    our_names = {id(p): n for n, p in ours.named_parameters()}
    for epoch in range(min(4, cfg.train.num_epochs)):  # the fork's poly has no value past its last epoch
        fork_schedule.step(epoch)
        our_schedule.step(epoch)
        assert _settings(our_opt, our_names) == _settings(fork_opt, fork_names), epoch
    train = data.get("train") or {}
    for key in ("num_epochs", "num_iterations_per_epoch", "num_val_iterations_per_epoch"):
        assert getattr(cfg.train, key) == train.get(key, FORK_TRAIN_DEFAULTS.get(key, 50)), key
    assert cfg.train.gradient_clip == 12.0  # the fork's train_step clipped at 12
    assert resolve(cfg.train.precision) == ("fp16", "fp32")  # nnU-Net's: fp16 on CUDA, fp32 elsewhere


def resolve(precision: str) -> tuple[str, str]:
    from segframe.nnunet.runtime import resolve_precision

    return tuple(resolve_precision(precision, torch.device(d)) for d in ("cuda", "cpu"))


@pytest.mark.parametrize("path", FORK_CONFIGS, ids=[p.stem for p in FORK_CONFIGS])
def test_report_lists_exactly_the_deliberate_differences(path):
    """With the weights file given, the only DIFFERENCE lines are the deliberate ones: the patch
    rounding for the patch-14 DINOv2, and its UNETR and Primus logits the fork shifted. Without it,
    the pretrained weights the fork loaded from timm are one more."""
    require_fork()
    data = yaml.safe_load(path.read_text())
    migration = migrate_config(data, path.name, checkpoint="weights.safetensors")
    differences = [line for line in migration.lines if "DIFFERENCE" in line]
    expected = deliberate_differences(data)
    assert [line.split(":")[0].strip() for line in differences] == expected, differences
    n = len(expected)
    assert migration.verdict() == ("same network and training" if not n else
                                   f"{n} difference{'s' * (n > 1)} (the DIFFERENCE lines above)")
    without = migrate_config(data, path.name)
    weights = data["model"]["backbone"] in ("dinov2", "dinov3")
    assert without.differences == migration.differences + weights
