"""`segframe plugins` and `segframe config`: list plugins, show their parameter schemas, check and migrate
configs."""

from __future__ import annotations

import argparse
import json
import types
import typing
from typing import Any

from pydantic import BaseModel

from segframe.errors import PluginError


def type_name(annotation: Any) -> str:
    """A readable Python type for a params field: `int`, `list[int]`, `float | None`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def describe_params(params: type[BaseModel]) -> list[dict[str, Any]]:
    """One entry per parameter: name, type, default, description."""
    out = []
    for name, field in params.model_fields.items():
        default = field.get_default(call_default_factory=True)
        out.append({
            "name": name,
            "type": type_name(field.annotation),
            "default": default.model_dump(mode="json") if isinstance(default, BaseModel) else default,
            "description": field.description or "",
        })
    return out


def plugin_listing() -> dict[str, Any]:
    """Every registered decoder and backbone, and every plugin that failed to load."""
    from segframe.plugins import get_registry

    registry = get_registry()
    listing: dict[str, Any] = {}
    for kind, found in (("decoders", registry.decoders()), ("backbones", registry.backbones())):
        listing[kind] = []
        for name, reg in found.items():
            entry = {
                "name": name,
                "distribution": reg.distribution,
                "version": reg.version,
                "plugin": reg.plugin,
                "description": reg.spec.description,
            }
            if kind == "backbones":
                entry["sizes"] = list(reg.spec.sizes)
            else:
                entry["contract"] = reg.spec.contract
                entry["inputs"] = sorted(reg.spec.inputs)
            entry["params"] = describe_params(reg.spec.params)
            listing[kind].append(entry)
    listing["broken"] = [{"plugin": name, "error": error} for name, error in registry.broken.items()]
    return listing


def format_listing(listing: dict[str, Any]) -> str:
    lines: list[str] = []
    for kind in ("decoders", "backbones"):
        lines.append(f"{kind}:")
        if not listing[kind]:
            lines.append("  (none)")
        for e in listing[kind]:
            lines.append(f"  {e['name']}  ({e['distribution']} {e['version']})  {e['description']}")
            if "sizes" in e:
                lines.append(f"      sizes: {', '.join(e['sizes'])}")
            if e.get("contract", 1) > 1:
                extra = ", ".join(e["inputs"]) or "features only"
                lines.append(f"      contract {e['contract']}; inputs: {extra}")
            for p in e["params"]:
                default = json.dumps(p["default"])
                lines.append(f"      {p['name']}: {p['type']} = {default}  {p['description']}")
        lines.append("")
    if listing["broken"]:
        lines.append("plugins that failed to load:")
        for b in listing["broken"]:
            lines.append(f"  {b['plugin']}: {b['error']}")
    return "\n".join(lines).rstrip() + "\n"


def params_schema(name: str, kind: str | None = None) -> dict[str, Any]:
    """JSON Schema of a decoder's or backbone's parameters."""
    from segframe.plugins import get_registry

    registry = get_registry()
    kinds = [kind] if kind else ["decoder", "backbone"]
    found = {k: getattr(registry, f"{k}s")()[name] for k in kinds if name in getattr(registry, f"{k}s")()}
    if len(found) > 1:
        raise PluginError(f"{name!r} is both a decoder and a backbone; add --kind decoder or --kind backbone")
    if not found:
        if kind:
            registry.get(kind, name)  # raises, listing the known names
        raise PluginError(
            f"no decoder or backbone named {name!r}; decoders: {', '.join(registry.decoders()) or '(none)'}; "
            f"backbones: {', '.join(registry.backbones()) or '(none)'}"
        )
    (k, reg), = found.items()
    schema = reg.spec.params.model_json_schema()
    schema["title"] = f"{name} {k} parameters"
    schema["description"] = reg.spec.description
    return schema


def _plugins(args: argparse.Namespace) -> int:
    if args.action == "show":
        print(json.dumps(params_schema(args.name, args.kind), indent=2))
        return 0
    listing = plugin_listing()
    if args.json:
        print(json.dumps(listing, indent=2))
    else:
        print(format_listing(listing), end="")
    return 0


def _config(args: argparse.Namespace) -> int:
    import sys

    from segframe.config import check_config, config_schema, dump_config

    if args.action == "check":
        cfg, notes = check_config(args.file)
        for note in notes:
            print(f"segframe config: {note}", file=sys.stderr)
        print(dump_config(cfg), end="")
    elif args.action == "migrate":
        from segframe.migrate import migrate_file

        result = migrate_file(args.file, args.output, overwrite=args.overwrite, checkpoint=args.checkpoint)
        print(result.report(args.file, args.output))
    else:
        print(json.dumps(config_schema(), indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `plugins` and `config` subcommands."""
    plugins = subparsers.add_parser(
        "plugins", help="list decoders and backbones, or show one's parameter schema",
        description="List every registered decoder and backbone with its distribution and parameters.",
    )
    plugins.add_argument("--json", action="store_true", help="print the listing as JSON")
    plugins.set_defaults(func=_plugins, action="list")
    psub = plugins.add_subparsers(dest="action", metavar="ACTION")
    show = psub.add_parser("show", help="print the JSON Schema of a decoder's or backbone's parameters")
    show.add_argument("name", help="decoder or backbone name (see `segframe plugins`)")
    show.add_argument("--kind", choices=["decoder", "backbone"], help="needed only if the name is both")

    config = subparsers.add_parser("config", help="check or migrate a YAML config, or print its schema")
    config.set_defaults(func=_config)
    csub = config.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = csub.add_parser("check", help="validate FILE (all that can be checked without data) and print "
                                          "it with every default filled in")
    check.add_argument("file", help="YAML config file")
    csub.add_parser("schema", help="print the JSON Schema of the config file (for editor completion)")
    migrate = csub.add_parser(
        "migrate", help="convert a config of the older nnU-Net fork (ViT or Mask2Former) to segframe's",
        description="Write the segframe config that trains what FILE, a config of the older nnU-Net fork, "
                    "trained, say for every key what became of it (kept, written, or a DIFFERENCE) and end "
                    "with the verdict. The result is checked as `segframe config check` does before it is "
                    "written; see docs/migrate.md.")
    migrate.add_argument("file", help="the fork's YAML config")
    migrate.add_argument("-o", "--output", required=True, help="segframe YAML file to write")
    migrate.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    migrate.add_argument("--checkpoint", metavar="FILE",
                         help="the file of the pretrained weights the fork loaded from timm (the report "
                              "names them), written as model.checkpoint_path")
