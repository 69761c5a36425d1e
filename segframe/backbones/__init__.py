"""Built-in backbone families; registered through the `segframe_backbones` hook like any plugin."""

from segframe.backbones.base import Backbone, default_layers
from segframe.plugins import hookimpl

__all__ = ["Backbone", "default_layers"]


@hookimpl
def segframe_backbones():
    from segframe.backbones import dinov2

    return [dinov2.SPEC]
