"""Plugin system: pluggy hookspecs, the `hookimpl` marker, decoder/backbone specs and the registry.

Decoders and backbones both arrive through hooks; plugins are found through the
`segframe` entry-point group, loaded once and lazily. Nothing here imports a plugin.
The decoder contract is versioned (`CONTRACT_VERSION`): version 1 heads take the feature
maps; version 2 heads may also ask for prefix tokens and the image (`DecoderInputs`) and
may own their training loss. docs/plugins.md documents both.
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import pluggy
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from segframe.errors import PluginError

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


class _Spec(BaseModel):
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


class DecoderSpec(_Spec):
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


class BackboneSpec(_Spec):
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


@dataclass(frozen=True)
class Registered:
    spec: Any
    plugin: str
    distribution: str
    version: str


def _dist_of(plugin: Any) -> tuple[str, str]:
    module = getattr(plugin, "__name__", type(plugin).__module__) or ""
    top = module.split(".")[0]
    for dist in metadata.packages_distributions().get(top, []):
        try:
            return dist, metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "(not installed)", "-"


class Registry:
    """The plugin manager plus what it found: specs by name, and plugins that failed to load."""

    def __init__(self, load_entrypoints: bool = True):
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(Hookspecs)
        self.broken: dict[str, str] = {}  # "plugin (distribution version)" -> error
        self._dists: dict[str, tuple[str, str]] = {}
        self._cache: dict[str, dict[str, Registered]] | None = None
        import segframe.backbones as builtin

        self.register(builtin, "builtin_backbones")
        if load_entrypoints:
            self._load_entrypoints()

    def _load_entrypoints(self) -> None:
        seen = set()
        for ep in metadata.entry_points(group=GROUP):
            dist = (ep.dist.name, ep.dist.version) if ep.dist else ("(unknown)", "-")
            if (dist[0], ep.name, ep.value) in seen:  # the same distribution found twice on sys.path
                continue
            seen.add((dist[0], ep.name, ep.value))
            # two distributions may use the same entry-point name: keep both, so a clash of
            # decoder names is reported with both distributions instead of one being dropped
            name = ep.name if self.pm.get_plugin(ep.name) is None else f"{dist[0]}:{ep.name}"
            try:
                self.register(ep.load(), name, dist)
            except Exception as exc:  # a broken plugin must not break the others
                self.broken[name] = f"{dist[0]} {dist[1]}: {type(exc).__name__}: {exc}"
                continue
            if not self.pm.get_hookcallers(self.pm.get_plugin(name)):
                self.unregister(name)
                self.broken[name] = (
                    f"{dist[0]} {dist[1]}: entry point {ep.value!r} has no @hookimpl functions "
                    "(segframe_decoders / segframe_backbones); reinstall the plugin if it has them"
                )

    def register(self, plugin: Any, name: str, dist: tuple[str, str] | None = None) -> None:
        """Register a plugin object or module (tests use this with no install step)."""
        try:
            self.pm.register(plugin, name=name)
        except ValueError as exc:  # name taken, or the same object already registered
            raise PluginError(f"cannot register plugin {name!r}: {exc}") from exc
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(name=name)
            raise PluginError(f"plugin {name!r} implements an unknown hook: {exc}") from exc
        self._dists[name] = dist or _dist_of(plugin)
        self._cache = None

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self.broken.pop(name, None)
        self._dists.pop(name, None)
        self._cache = None

    def _collect(self, hook: str, spec_cls: type[_Spec]) -> dict[str, Registered]:
        found: dict[str, Registered] = {}
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            dist, version = self._dists.get(impl.plugin_name, ("(unknown)", "-"))
            try:
                specs = [spec_cls.model_validate(s) if not isinstance(s, spec_cls) else s
                         for s in impl.function() or []]
            except Exception as exc:
                self.broken[impl.plugin_name] = f"{dist} {version}: {hook}() failed: {exc}"
                continue
            for spec in specs:
                if spec.name in found:
                    other = found[spec.name]
                    raise PluginError(
                        f"{spec_cls.__name__[:-4].lower()} {spec.name!r} is registered twice: by "
                        f"{other.distribution} (plugin {other.plugin!r}) and by {dist} "
                        f"(plugin {impl.plugin_name!r}); uninstall one of them"
                    )
                found[spec.name] = Registered(spec, impl.plugin_name, dist, version)
        return dict(sorted(found.items()))

    def _all(self) -> dict[str, dict[str, Registered]]:
        if self._cache is None:
            self._cache = {
                "decoder": self._collect("segframe_decoders", DecoderSpec),
                "backbone": self._collect("segframe_backbones", BackboneSpec),
            }
        return self._cache

    def decoders(self) -> dict[str, Registered]:
        return self._all()["decoder"]

    def backbones(self) -> dict[str, Registered]:
        return self._all()["backbone"]

    def get(self, kind: str, name: str) -> Registered:
        """Look up a decoder or backbone by name; unknown names list the known ones."""
        known = self._all()[kind]
        if name in known:
            return known[name]
        msg = f"unknown {kind} {name!r}; known {kind}s: {', '.join(known) or '(none)'}"
        if name in self.broken:
            msg = (f"{kind} plugin {name!r} is installed but failed to load ({self.broken[name]}); "
                   "fix or reinstall it")
        elif self.broken:
            msg += "; plugins that failed to load: " + "; ".join(f"{k} ({v})" for k, v in self.broken.items())
        raise PluginError(msg)

    def decoder(self, name: str) -> Registered:
        return self.get("decoder", name)

    def backbone(self, name: str) -> Registered:
        return self.get("backbone", name)


_registry: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, created (and entry points loaded) on first use."""
    global _registry
    if _registry is None:
        _registry = Registry()
    return _registry


def reset_registry() -> None:
    """Forget the registry so the next `get_registry()` reloads entry points."""
    global _registry
    _registry = None
