"""segframe: fine-tune ViT foundation models for 2D segmentation with plugin decoders.

`ViTSegModel`, `create_segmentation_model`, `load_config` and `Predictor` are imported on first use
(module `__getattr__`), so `import segframe` stays light: no torch, timm or nnU-Net until needed.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from segframe.errors import CheckpointError, ConfigError, PluginError, SegframeError
from segframe.plugins import BackboneSpec, DecoderInputs, DecoderSpec, HeadContext, hookimpl

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "ViTSegModel": "segframe.model",
    "create_segmentation_model": "segframe.model",
    "load_config": "segframe.config",
    "Predictor": "segframe.nnunet.predict",
}

if TYPE_CHECKING:
    from segframe.config import load_config
    from segframe.model import ViTSegModel, create_segmentation_model
    from segframe.nnunet.predict import Predictor

__all__ = [
    "BackboneSpec",
    "CheckpointError",
    "ConfigError",
    "DecoderInputs",
    "DecoderSpec",
    "HeadContext",
    "PluginError",
    "Predictor",
    "SegframeError",
    "ViTSegModel",
    "create_segmentation_model",
    "hookimpl",
    "load_config",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'segframe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
