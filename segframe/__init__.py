"""segframe: fine-tune ViT foundation models for 2D segmentation with plugin decoders."""

from segframe.errors import CheckpointError, ConfigError, PluginError, SegframeError
from segframe.plugins import BackboneSpec, DecoderSpec, hookimpl

__version__ = "0.1.0"

__all__ = [
    "BackboneSpec",
    "CheckpointError",
    "ConfigError",
    "DecoderSpec",
    "PluginError",
    "SegframeError",
    "hookimpl",
]
