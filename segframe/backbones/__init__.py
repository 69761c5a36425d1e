"""Built-in backbone families; registered through the `segframe_backbones` hook like any plugin.

`Backbone`, `default_layers`, `LoadReport` and `read_checkpoint` are imported on first use, so
registering the families (and `segframe plugins`) does not import timm.
"""

from importlib import import_module
from typing import Any

from segframe.spec import hookimpl

__all__ = ["Backbone", "LoadReport", "default_layers", "read_checkpoint"]
_LAZY = {"Backbone": "base", "default_layers": "base",
         "LoadReport": "checkpoint", "read_checkpoint": "checkpoint"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"segframe.backbones.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'segframe.backbones' has no attribute {name!r}")


@hookimpl
def segframe_backbones():
    from segframe.backbones import dinov2, dinov3, retfound, visionfm

    return [dinov3.SPEC, dinov2.SPEC, retfound.SPEC, visionfm.SPEC]
