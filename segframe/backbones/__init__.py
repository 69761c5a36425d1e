"""Built-in backbone families; registered through the `segframe_backbones` hook like any plugin."""

from segframe.backbones.base import Backbone, default_layers
from segframe.backbones.checkpoint import LoadReport, read_checkpoint
from segframe.plugins import hookimpl

__all__ = ["Backbone", "LoadReport", "default_layers", "read_checkpoint"]


@hookimpl
def segframe_backbones():
    from segframe.backbones import dinov2, dinov3, retfound, visionfm

    return [dinov3.SPEC, dinov2.SPEC, retfound.SPEC, visionfm.SPEC]
