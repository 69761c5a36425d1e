"""The plugin contract: pluggy's hookspecs and the `hookimpl` marker, the decoder and backbone specs a plugin
returns, and what a head is given (`HeadContext`, `DecoderInputs`). Plugins, built-in ones included, import
only this; the registry that loads them is segframe.plugins.

The decoder contract is versioned (`CONTRACT_VERSION`): version 1 heads take the feature maps; version 2
heads may also ask for prefix tokens and the image (`DecoderInputs`) and may own their training loss.
docs/plugins.md documents both.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import pluggy
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

if TYPE_CHECKING:
    from torch import Tensor

GROUP = "segframe"
hookspec = pluggy.HookspecMarker(GROUP)
hookimpl = pluggy.HookimplMarker(GROUP)

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

CONTRACT_VERSION = 2
DecoderInput = Literal["prefix_tokens", "image"]


def _check_params_class(cls: Any) -> type[BaseModel]:
    if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
        raise ValueError("params must be a pydantic BaseModel subclass")
    if cls.model_config.get("extra") != "forbid":
        raise ValueError(f"{cls.__name__} must set model_config = ConfigDict(extra='forbid')")
    for field_name, field in cls.model_fields.items():
        if field.is_required():
            raise ValueError(f"{cls.__name__}.{field_name} needs a default")
        if not field.description:
            raise ValueError(f"{cls.__name__}.{field_name} needs a description")
    return cls


class Spec(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    name: str
    description: str
    params: type[BaseModel]

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"name {v!r} must be a lowercase identifier ([a-z][a-z0-9_]*)")
        return v

    @field_validator("params")
    @classmethod
    def _params(cls, v: Any) -> type[BaseModel]:
        return _check_params_class(v)

    @field_validator("description")
    @classmethod
    def _description(cls, v: str) -> str:
        if not v.strip() or "\n" in v.strip():
            raise ValueError("description must be one non-empty line")
        return v.strip()


class DecoderSpec(Spec):
    """A segmentation head.

    Version 1 (`inputs` empty, `contract` 1): `build(params, in_channels, in_strides, num_classes)`
    returns an nn.Module that maps a list of (B, C_i, H_i, W_i) tensors to logits
    (B, num_classes, H_0, W_0) and has an `output_stride` attribute (the stride of its logits
    w.r.t. the input image).

    Version 2 (`contract: 2`, implied by a non-empty `inputs`): `build(params, in_channels,
    in_strides, num_classes, context)` gets a `HeadContext` too, and the head's forward takes
    one `DecoderInputs` holding the feature maps plus exactly the `inputs` it asked for. The
    built head may narrow what it needs with an `inputs` attribute (a subset of the spec's), and
    may own its training loss with a `training_loss(outputs, target, ignore_index)` method.
    """

    build: Callable[..., Any]
    inputs: frozenset[DecoderInput] = frozenset()
    contract: Literal[1, 2] = 1

    @model_validator(mode="before")
    @classmethod
    def _contract_from_inputs(cls, v: Any) -> Any:
        if isinstance(v, dict) and v.get("inputs") and "contract" not in v:
            v = {**v, "contract": 2}
        return v

    @model_validator(mode="after")
    def _inputs_need_v2(self) -> DecoderSpec:
        if self.inputs and self.contract != 2:
            raise ValueError(f"inputs {sorted(self.inputs)} need contract 2 (got contract {self.contract})")
        return self


@dataclass(frozen=True)
class HeadContext:
    """What a version-2 head's `build` learns about the model besides channels and strides.

    `embed_dim` is the width of the backbone's tokens (and of `DecoderInputs.cls_tokens`);
    `image_channels` the channels of `DecoderInputs.image`; `neck` is `identity` or `pyramid`.
    """

    backbone: str
    patch_size: int
    embed_dim: int
    num_levels: int
    has_cls_token: bool
    num_register_tokens: int
    image_channels: int
    neck: str


@dataclass
class DecoderInputs:
    """What `ViTSegModel` hands a version-2 head.

    - `features`: the neck's maps (B, C_i, H_i, W_i), as a version-1 head gets them.
    - `cls_tokens`: per backbone level (chosen block, before the neck) the CLS token (B, D),
      with the same norm setting as the patch tokens; None unless the head asked for
      `prefix_tokens`.
    - `register_tokens`: per level the register / storage tokens (B, R, D), R = 0 for families
      without them (DINOv3: 4 storage tokens, DINOv2 `_reg4`: 4 registers); None unless asked.
    - `image`: the normalised input padded to a multiple of the patch (B, C, H_pad, W_pad),
      None unless the head asked for `image`.
    """

    features: list[Tensor]
    cls_tokens: list[Tensor] | None = None
    register_tokens: list[Tensor] | None = None
    image: Tensor | None = None


class BackboneSpec(Spec):
    """A backbone family. `build(size, params, in_chans)` returns a `segframe.backbones.Backbone`."""

    sizes: list[str]
    build: Callable[..., Any]


class Hookspecs:
    @hookspec
    def segframe_decoders(self) -> list[DecoderSpec]:
        """Return the decoders this plugin provides."""

    @hookspec
    def segframe_backbones(self) -> list[BackboneSpec]:
        """Return the backbone families this plugin provides."""
