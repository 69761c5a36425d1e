"""The plugin registry: decoders and backbones arrive through pluggy hooks (the contract is segframe.spec,
re-exported here); plugins are found through the `segframe` entry-point group, loaded once and lazily.
Nothing here imports a plugin until the registry is first used.
"""

from __future__ import annotations

import importlib.metadata as metadata
from dataclasses import dataclass
from typing import Any

import pluggy

from segframe.errors import PluginError
from segframe.spec import (
    CONTRACT_VERSION,
    GROUP,
    BackboneSpec,
    DecoderInput,
    DecoderInputs,
    DecoderSpec,
    HeadContext,
    Hookspecs,
    Spec,
    hookimpl,
    hookspec,
)

__all__ = ["GROUP", "CONTRACT_VERSION", "BackboneSpec", "DecoderInput", "DecoderInputs", "DecoderSpec",
           "HeadContext", "Hookspecs", "Registered", "Registry", "get_registry", "hookimpl", "hookspec",
           "reset_registry"]


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

    def _collect(self, hook: str, spec_cls: type[Spec]) -> dict[str, Registered]:
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
