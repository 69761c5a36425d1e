"""`segframe config migrate`: turn a config of the older nnU-Net fork (`model.model_path` naming one
model file per head) into the equivalent segframe config, saying for every key what became of it.

The fork's keys are mapped onto what segframe has: the model file becomes `decoder: <name>`, its
`decoder:` options are kept where the chosen plugin's `params` has them (read from the plugin
registry), and `model` / `lora` / `train` keys are kept where segframe's config has them. Anything
else is reported and left out. The result is checked as `segframe config check` checks a file
before anything is written.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from segframe.config import LoraConfig, ModelConfig, SegframeConfig, TrainConfig, _read_yaml, check_config
from segframe.errors import ConfigError, PluginError

# the fork's model-file stems that are not the segframe decoder's name (the others are:
# model_upernet -> upernet, model_segformer_1 -> segformer, primus -> primus, ...)
FORK_HEADS = {"m2f": "mask2former"}
# decoder options the fork spelled differently, per head: fork key -> segframe key
FORK_DECODER_KEYS = {"dpt": {"fusion_hidden_size": "hidden_size", "readout_type": "readout"}}
# what the fork used for a key its file did not set (its config dataclasses)
FORK_DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {"model_path": "nnunetv2.model.model_segformer_1", "backbone": "dinov3",
              "backbone_size": "large"},
    "lora": {"enabled": True, "r": 8, "lora_alpha": 16, "target_modules": ["qkv"], "lora_dropout": 0.05},
}
# the fork's train keys were optional; unset, nnU-Net's own trainer values applied
NNUNET_TRAIN_DEFAULTS = {"initial_lr": 1e-2, "weight_decay": 3e-5, "gradient_clip": 12.0, "num_epochs": 1000,
                         "num_iterations_per_epoch": 250, "num_val_iterations_per_epoch": 50}
SECTIONS: dict[str, type[BaseModel]] = {"model": ModelConfig, "lora": LoraConfig, "train": TrainConfig}


@dataclass
class Migration:
    """The segframe config (only the keys that were set or differ from segframe's defaults) and the
    report: one line per key of the old file, plus notes."""

    config: dict[str, Any]
    lines: list[str] = field(default_factory=list)
    left_out: int = 0

    def note(self, key: str, what: str, left_out: bool = False) -> None:
        self.lines.append(f"  {key}: {what}")
        self.left_out += left_out


def _show(value: Any) -> str:
    try:
        return json.dumps(value)
    except TypeError:  # a YAML date or the like
        return repr(value)


class _Dumper(yaml.SafeDumper):
    """Block mappings, lists on one line (`pool_scales: [1, 2, 3, 6]`), as in configs/."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


@functools.cache
def _defaults() -> dict[str, Any]:
    return SegframeConfig().model_dump(mode="json")


def _segframe_default(section: str, key: str) -> Any:
    value = _defaults()[section][key]
    return value["name"] if isinstance(value, dict) and set(value) == {"name"} else value


def head_of(module: str) -> str | None:
    """The segframe decoder name of a fork model module (`nnunetv2.model.model_upernet`,
    `model_segformer_1`, `nnunetv2/model/primus.py`, ...), or None if it names no installed decoder."""
    from segframe.plugins import get_registry

    decoders = get_registry().decoders()
    parts = [p for p in re.split(r"[./\\]", str(module).strip().removesuffix(".py")) if p]
    for part in reversed(parts):
        stem = re.sub(r"_?\d+$", "", part.lower().replace("-", "_").removeprefix("model_"))
        name = FORK_HEADS.get(stem, stem)
        if name in decoders:
            return name
    return None


def _mapping(value: Any, key: str, source: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"cannot migrate {source}: {key} must be a mapping of keys, got {value!r}")
    return value


def _choose_head(model: dict, decoder: dict, out: Migration, source: str) -> str:
    from segframe.plugins import get_registry

    key = next((k for k in ("model_path", "type") if k in model), None)
    if key is None and "name" in decoder:
        return str(decoder["name"])  # already segframe's `decoder: {name: ...}`: validated later
    module = model[key] if key else FORK_DEFAULTS["model"]["model_path"]
    head = head_of(module)
    if head is None:
        raise ConfigError(
            f"cannot migrate {source}: model.{key or 'model_path'} {_show(module)} names no installed "
            f"decoder (installed: {', '.join(get_registry().decoders()) or 'none'}); set `decoder: NAME` "
            "in the file by hand, or install the head's plugin")
    if "name" in decoder and decoder["name"] != head:
        raise ConfigError(f"cannot migrate {source}: model.{key} {_show(module)} is the {head} head but "
                          f"model.decoder.name says {_show(decoder['name'])}; keep one of them")
    if key:
        out.note(f"model.{key}", f"{_show(module)} -> model.decoder.name: {head}")
    else:
        out.note("model.model_path", f"not set; the fork's default {_show(module)} -> "
                                     f"model.decoder.name: {head}")
    return head


def _migrate_decoder(head: str, decoder: dict, out: Migration, source: str) -> str | dict:
    from segframe.plugins import get_registry

    try:
        fields = get_registry().decoder(head).spec.params.model_fields
    except PluginError as exc:
        raise ConfigError(f"cannot migrate {source}: model.decoder: {exc}") from None
    renames = FORK_DECODER_KEYS.get(head, {})
    params: dict[str, Any] = {}
    for key, value in decoder.items():
        where, target = f"model.decoder.{key}", renames.get(key, key)
        if key == "name":
            out.note(where, "kept")
        elif target not in fields:
            out.note(where, f"not a parameter of the {head} decoder (its parameters: {', '.join(fields)}; "
                            f"`segframe plugins show {head}`); left out", left_out=True)
        elif target in params:
            out.note(where, f"model.decoder.{target} is already set from another key; left out",
                     left_out=True)
        else:
            params[target] = value
            out.note(where, "kept" if target == key else f"renamed to model.decoder.{target}")
    return {"name": head, **params} if params else head


def migrate_config(data: Any, source: str = "<dict>") -> Migration:
    """Map a parsed fork config onto segframe's layout; every key of `data` gets a report line."""
    if data is None:
        raise ConfigError(f"cannot migrate {source}: the file is empty, there is nothing to migrate")
    if not isinstance(data, dict):
        raise ConfigError(f"cannot migrate {source}: expected a mapping with model, lora and train sections, "
                          f"got {type(data).__name__}")
    out = Migration(config={})
    for section in data:
        if section not in SECTIONS:
            out.note(str(section), "not a section of a segframe config (model, lora, train); left out",
                     left_out=True)
    for section in SECTIONS:
        given = _mapping(data.get(section), section, source)
        if section in data and not given:
            out.note(section, "empty; segframe's defaults apply")
        result = _migrate_section(section, given, out, source)
        if result:
            out.config[section] = result
    return out


def _migrate_section(section: str, given: dict, out: Migration, source: str) -> dict[str, Any]:
    fields = SECTIONS[section].model_fields
    result: dict[str, Any] = {}
    if section == "model":
        decoder = given.get("decoder")
        decoder = _mapping({"name": decoder} if isinstance(decoder, str) else decoder, "model.decoder",
                           source)
        new_decoder = _migrate_decoder(_choose_head(given, decoder, out, source), decoder, out, source)
    for key, value in given.items():
        where = f"{section}.{key}"
        if section == "model" and key in ("model_path", "type", "decoder"):
            result.setdefault("decoder", new_decoder)  # where the old file named its head
            if key == "decoder" and not decoder:
                out.note(where, f"empty; the {new_decoder} decoder's defaults apply")
        elif key not in fields:
            out.note(where, f"not a segframe {section} key (`segframe config schema` lists them); left out",
                     left_out=True)
        elif value is None and _segframe_default(section, key) is not None:
            out.note(where, f"null; left out, {_unset(section, key)}", left_out=True)
        else:
            result[key] = value
            out.note(where, "kept")
    if section == "model":
        result.setdefault("decoder", new_decoder)
    for key, fork_default in FORK_DEFAULTS.get(section, {}).items():
        ours = _segframe_default(section, key) if key in fields else None
        if key in fields and key not in given and fork_default != ours:
            result[key] = fork_default
            out.note(f"{section}.{key}", f"not set; written as the fork's default {_show(fork_default)} "
                                         f"(segframe's default is {_show(ours)})")
    for key, nnunet in NNUNET_TRAIN_DEFAULTS.items():
        if section == "train" and key not in given and nnunet != _segframe_default(section, key):
            out.note(f"train.{key}", f"not set; {_unset(section, key)}")
    return result


def _unset(section: str, key: str) -> str:
    ours = _show(_segframe_default(section, key))
    if section == "train" and key in NNUNET_TRAIN_DEFAULTS:
        return (f"the fork used nnU-Net's {_show(NNUNET_TRAIN_DEFAULTS[key])}, segframe's default {ours} "
                "applies (segframe trains with AdamW); set it to keep the old value")
    return f"segframe's default {ours} applies"


def comments(text: str) -> list[tuple[int, str]]:
    """(line number, text) of every YAML comment; `#` inside a scalar is not one."""
    scalars = [(t.start_mark.index, t.end_mark.index)
               for t in yaml.scan(text) if isinstance(t, yaml.ScalarToken)]
    found, offset = [], 0
    for number, line in enumerate(text.splitlines(keepends=True), start=1):
        for match in re.finditer(r"(?:^|(?<=\s))#", line):
            at = offset + match.start()
            if not any(start <= at < end for start, end in scalars):
                found.append((number, line[match.start():].rstrip()))
                break
        offset += len(line)
    return found


def migrate_file(source: str | Path, output: str | Path, overwrite: bool = False) -> Migration:
    """Migrate the fork config `source` to `output` (checked first; nothing is written if it is not
    valid, and an existing `output` is replaced only with `overwrite`)."""
    source, output = Path(source), Path(output)
    if output.exists() and not overwrite:
        raise ConfigError(f"{output} already exists; pass --overwrite to replace it, or choose another -o")
    if not output.parent.is_dir():
        raise ConfigError(f"cannot write {output}: directory {output.parent} does not exist")
    result = migrate_config(_read_yaml(source), str(source))
    for number, text in comments(source.read_text(encoding="utf-8")):
        result.lines.append(f"  line {number}: comment not carried over (copy it by hand if needed): {text}")
    text = (f"# Migrated from {source.name} by `segframe config migrate`.\n"
            + yaml.dump(result.config, Dumper=_Dumper, sort_keys=False))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".yaml", dir=output.parent)
    except OSError as exc:
        raise ConfigError(f"cannot write {output}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        try:
            check_config(tmp)
        except ConfigError as exc:
            why = str(exc).replace(tmp, f"{output} (as migrated from {source})")
            raise ConfigError(f"the migrated config is not valid, so {output} was not written:\n"
                              + "\n".join(result.lines) + "\n" + why) from None
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return result
