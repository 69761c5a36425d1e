"""timm's checkpoint converters behind plain functions, so a family module imports timm only when used.

Importing timm takes seconds and prints torch's `torch.jit.interface` FutureWarning; listing
plugins and checking configs need neither.
"""

from __future__ import annotations

from typing import Any


def vit_filter(state_dict: dict, model: Any) -> dict:
    """timm's `vision_transformer.checkpoint_filter_fn`."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    return checkpoint_filter_fn(state_dict, model)


def eva_filter(state_dict: dict, model: Any) -> dict:
    """timm's `eva.checkpoint_filter_fn` (DINOv3)."""
    from timm.models.eva import checkpoint_filter_fn

    return checkpoint_filter_fn(state_dict, model)
