"""Import shim for the older nnU-Net fork's model files, the reference that `segframe config migrate`
and the heads are checked against (tests only; nothing of the fork is copied into segframe).

The fork's files live in FORK_DIR (read-only reference). `fork_module("model_upernet")` imports
one of them as `nnunetv2.model.<name>` (the installed nnU-Net has no `nnunetv2.model`, so nothing
of it is shadowed); `build_fork_model(yaml)` builds the model the fork's trainer built from one of
its configs, the way `nnUNetTrainer_vit.initialize` does (`freeze_backbone = not lora.enabled`, the
`decoder:` keys as keyword arguments), always with `pretrained=False` and no checkpoint file.
`arch` shrinks the timm backbone for fast tests (e.g. `TINY_ARCH`; the fork's UperNet and DPT need
12 or 24 blocks). A test that needs the fork calls `require_fork()` (a skip with the reason when the
folder is absent).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import yaml

FORK_ROOT = Path("/work/shared/reference/nnunet-fork")
FORK_DIR = FORK_ROOT / "nnunetv2" / "model"
TRAINER_DIR = FORK_ROOT / "nnunetv2" / "training" / "nnUNetTrainer"
FORK_CONFIGS = sorted((FORK_ROOT / "nnunetv2" / "configs").glob("*.yaml"))
FORK_M2F_CONFIGS = sorted((TRAINER_DIR / "configs").glob("m2f_*.yaml"))
# the smallest backbone all the fork's heads accept (UperNet and DPT know only 12 or 24 blocks)
TINY_ARCH = {"embed_dim": 64, "depth": 12, "num_heads": 2}


def require_fork() -> None:
    """Skip the calling test when the fork's reference files are not on this machine."""
    if not FORK_DIR.is_dir():
        pytest.skip(f"the fork's model files are not here ({FORK_DIR})")


def _package() -> ModuleType:
    name = "nnunetv2.model"
    if name not in sys.modules:
        importlib.import_module("nnunetv2")
        spec = importlib.util.spec_from_file_location(
            name, FORK_DIR / "__init__.py", submodule_search_locations=[str(FORK_DIR)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def fork_module(name: str) -> ModuleType:
    """The fork's model file `name` (`model_upernet`, `model_segformer_0`, `primus`, `backbone`, ...)."""
    require_fork()
    _package()
    return importlib.import_module(f"nnunetv2.model.{name}")


def fork_vit_config() -> ModuleType:
    """The fork's `vit_config.py` (its dataclasses hold the defaults of an unset key)."""
    require_fork()
    name = "fork_vit_config"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TRAINER_DIR / "vit_config.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def read_fork_config(path: str | Path) -> Any:
    """A fork ViT YAML with the fork's defaults filled in (its `ViTnnUNetConfig`)."""
    cfg = fork_vit_config()
    data = yaml.safe_load(Path(path).read_text()) or {}
    return cfg.ViTnnUNetConfig(
        model=cfg.ViTModelConfig(**(data.get("model") or {})),
        lora=cfg.ViTLoRAConfig(**(data.get("lora") or {})),
        train=cfg.ViTTrainConfig(**(data.get("train") or {})),
    )


@contextmanager
def no_pretrained(arch: dict[str, Any] | None = None):
    """While active, the fork's `create_backbone` builds its timm model with pretrained=False (and
    the `arch` overrides, e.g. TINY_ARCH)."""
    backbone = fork_module("backbone")
    real = backbone.timm

    def create_model(name: str, **kwargs: Any):
        kwargs["pretrained"] = False
        return real.create_model(name, **kwargs, **(arch or {}))

    backbone.timm = SimpleNamespace(create_model=create_model)
    try:
        yield
    finally:
        backbone.timm = real


def build_fork_model(path: str | Path, num_classes: int = 2, arch: dict[str, Any] | None = None):
    """The network `nnUNetTrainer_vit.initialize` built from the fork config `path`, without weights."""
    cfg = read_fork_config(path)
    module = fork_module(cfg.model.model_path.rsplit(".", 1)[-1])
    create = getattr(module, "create_segmentation_model", None) or module.create_segformer_model
    with no_pretrained(arch):
        return create(
            backbone_name=cfg.model.backbone,
            backbone_size=cfg.model.backbone_size,
            num_classes=num_classes,
            checkpoint_path=None,
            freeze_backbone=not cfg.lora.enabled,
            use_lora=cfg.lora.enabled,
            lora_rank=cfg.lora.r,
            lora_alpha=cfg.lora.lora_alpha,
            lora_dropout=cfg.lora.lora_dropout,
            lora_target_modules=list(cfg.lora.target_modules),
            **dict(cfg.model.decoder or {}),
        )


# the fork trainer's values for train keys a file leaves unset (its nnUNetTrainer.__init__)
FORK_TRAIN_DEFAULTS = {"initial_lr": 1e-2, "weight_decay": 3e-5, "num_epochs": 1000,
                       "num_iterations_per_epoch": 100}


def fork_optimizer(network, path: str | Path):
    """The optimizer and LR scheduler the fork's trainer made for `network` from the config `path`.

    The fork's `nnUNetTrainer.configure_optimizers` is stock nnU-Net's (SGD over all parameters,
    momentum 0.99, nesterov, PolyLR over the epochs); the fork's trainer file does not import
    against the installed nnU-Net, so the installed method is called (`fork_configure_optimizers_source`
    lets a test check that the two are the same code).
    """
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    train = read_fork_config(path).train
    values = {key: getattr(train, key) if getattr(train, key) is not None else default
              for key, default in FORK_TRAIN_DEFAULTS.items()}
    return nnUNetTrainer.configure_optimizers(SimpleNamespace(network=network, **values))


def fork_configure_optimizers_source() -> str:
    """The body of the fork trainer's `configure_optimizers`, as text."""
    text = (TRAINER_DIR / "nnUNetTrainer.py").read_text()
    start = text.index("    def configure_optimizers(self):")
    return text[start:text.index("\n    def ", start + 1)]
