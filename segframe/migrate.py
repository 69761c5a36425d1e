"""`segframe config migrate`: turn a config of the older nnU-Net fork into the segframe config that
trains the same network the same way, and say, key by key, where it does not.

Two fork layouts are read: its ViT configs (`model.model_path` names one model file per head) and
its Mask2Former configs (`model.hidden_dim`, `m2f_train`, top-level `gradient_clip`). A file that
is already a valid segframe config is copied unchanged; anything else is refused. Each fork key
gets one report line: `kept` only where segframe does the same with it; every change of meaning is
a `DIFFERENCE` line, and the report ends with the verdict (same network and training, or N
differences). What the fork did without a key (frozen backbone, timm's pretrained weights, SGD
with nnU-Net's poly schedule, no mean/std, normed intermediate features, its upsampler) is
written as segframe options. The result is checked as `segframe config check` checks a file
before anything is written. docs/migrate.md has the full table.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from segframe.config import _read_yaml, check_config, validate_config
from segframe.errors import ConfigError, PluginError
from segframe.files import write_atomically

# the fork's ViT config (vit_config.py): section -> keys; `model.decoder` is free-form
FORK_VIT_KEYS = {
    "model": ("model_path", "backbone", "backbone_size", "checkpoint_path", "decoder"),
    "lora": ("enabled", "r", "lora_alpha", "target_modules", "lora_dropout"),
    "train": ("initial_lr", "weight_decay", "gradient_clip", "num_epochs", "num_iterations_per_epoch",
              "num_val_iterations_per_epoch"),
}
# the fork's Mask2Former config (m2f_config.py); `gradient_clip` is a top-level value
FORK_M2F_KEYS = {
    "model": ("backbone", "backbone_size", "hidden_dim", "backbone_out_layers", "autocast_dtype"),
    "lora": ("enabled", "r", "lora_alpha", "target_modules", "lora_dropout", "bias", "use_rslora"),
    "m2f_train": ("num_points", "oversample_ratio", "importance_sample_ratio", "mask_coefficient",
                  "dice_coefficient", "class_coefficient", "no_object_coefficient"),
    "gradient_clip": (),
}
M2F_MARKS = {"m2f_train", "hidden_dim", "backbone_out_layers", "autocast_dtype"}

# what the fork used for a LoRA key its file did not set (its config dataclasses)
FORK_LORA = {"enabled": True, "r": 8, "lora_alpha": 16, "target_modules": ["qkv"], "lora_dropout": 0.05}
M2F_LORA = {**FORK_LORA, "target_modules": ["qkv", "proj"], "lora_dropout": 0.1}
# the fork trainers' values for unset train keys (nnUNetTrainer.py, nnUNetTrainer_m2f.py); the fork
# clipped gradients at 12 whatever train.gradient_clip said
FORK_TRAIN = {"initial_lr": 1e-2, "weight_decay": 3e-5, "num_epochs": 1000, "num_iterations_per_epoch": 100,
              "num_val_iterations_per_epoch": 50}
M2F_TRAIN = {"initial_lr": 1e-3, "weight_decay": 3e-5, "num_epochs": 200, "num_iterations_per_epoch": 100,
             "num_val_iterations_per_epoch": 50}
FORK_CLIP = 12.0
# how both fork trainers optimised (nnU-Net's configure_optimizers and train_step)
FORK_TRAINING = {"optimizer": "sgd", "warmup_epochs": 0, "precision": "nnunet"}

# backbone -> (timm model of its pretrained weights, or None: the fork built it without weights;
# the size the fork built, or None: the file's; its patch size)
FORK_BACKBONES = {
    "dinov3": ("vit_{size}_patch16_dinov3.lvd1689m", None, 16),
    "dinov2": ("vit_{size}_patch14_dinov2.lvd142m", None, 14),
    "retfound": (None, "large", 16),
    "visionfm": (None, "base", 16),
}


@dataclass(frozen=True)
class ForkHead:
    """One of the fork's model files: the segframe decoder that builds it, the fork's decoder keys
    (fork key -> segframe key, with the fork's default), decoder params written to build the fork's
    head, and how its logits reached full resolution."""

    decoder: str
    keys: dict[str, tuple[str, Any]]
    written: dict[str, Any] = field(default_factory=dict)
    upsampler: str = "bilinear"
    # the head upsamples the token grid by 16 whatever the patch: on a 14-pixel patch the fork cropped
    # the top-left of a grid scaled by 16/14, logits shifted against the image; segframe's head does not
    scales_by_16: bool = False
    # a report line on modules the fork's head built but never ran (segframe builds only what runs)
    unused: str = ""


EMBED_X4 = "<backbone width, 4 levels>"  # written as [D, D, D, D] for the backbone's width D
FORK_HEADS = {
    "model_upernet": ForkHead("upernet", {"hidden_size": ("hidden_size", 512),
                                          "pool_scales": ("pool_scales", [1, 2, 3, 6])},
                              upsampler="fork_progressive"),
    "model_segformer_0": ForkHead("segformer", {"hidden_size": ("hidden_size", 256)},
                                  {"variant": "standard", "dropout_type": "element"}),
    "model_segformer_1": ForkHead("segformer", {"hidden_size": ("hidden_size", 256)},
                                  {"variant": "progressive", "dropout_type": "element"}),
    "model_segformer_2": ForkHead("segformer", {"hidden_size": ("hidden_size", 256)},
                                  {"variant": "full_resolution", "dropout_type": "element"}),
    "model_dpt": ForkHead("dpt", {"fusion_hidden_size": ("hidden_size", 256),
                                  "readout_type": ("readout", "project")},
                          {"neck_hidden_sizes": EMBED_X4, "reassemble_factors": [4, 2, 1, 0.5],
                           "dropout": 0.1, "use_batch_norm_in_fusion_residual": True},
                          unused="the fork's model_dpt also held its first fusion layer's residual_layer1 "
                                 "(two convolutions and batch norms, 1.18M parameters at ViT-L), which its "
                                 "forward never runs and so never trains: segframe does not build it; the "
                                 "network that runs and trains is the same"),
    "model_unetr": ForkHead("unetr", {"decoder_channels": ("decoder_channels", [512, 256, 128, 64, 32]),
                                      "negative_slope": ("negative_slope", 0.01),
                                      "upsample_mode": ("upsample_mode", "deconv")},
                            scales_by_16=True),
    "primus": ForkHead("primus", {"embed_dim": ("embed_dim", None),
                                  "patch_embed_size": ("patch_embed_size", None),
                                  "multiscale": ("multiscale", False),
                                  "interaction_indices": ("interaction_indices", None)}, scales_by_16=True),
}
M2F_LOSS_KEYS = {"num_points": "num_points", "mask_coefficient": "mask_weight",
                 "dice_coefficient": "dice_weight", "class_coefficient": "class_weight",
                 "no_object_coefficient": "no_object_weight"}
M2F_FIXED = {"oversample_ratio": 3.0, "importance_sample_ratio": 0.75}  # transformers' Mask2Former loss
M2F_PRECISION = {"float32": "nnunet", "bfloat16": "bf16", "float16": "fp16"}


class Migration:
    """The segframe config being written and the report: one line per key, `DIFFERENCE` lines counted."""

    def __init__(self) -> None:
        self.config: dict[str, dict[str, Any]] = {"model": {}, "lora": {}, "train": {}}
        self.lines: list[str] = []
        self.differences = 0
        self.copied = False

    def line(self, key: str, what: str) -> None:
        self.lines.append(f"  {key}: {what}")

    def differ(self, key: str, what: str) -> None:
        self.lines.append(f"  {key}: DIFFERENCE: {what}")
        self.differences += 1

    def set(self, section: str, key: str, value: Any) -> None:
        self.config[section][key] = value

    def verdict(self) -> str:
        if not self.differences:
            return "same network and training"
        return f"{self.differences} difference{'s' * (self.differences != 1)} (the DIFFERENCE lines above)"

    def report(self, source: str | Path, output: str | Path) -> str:
        """What `segframe config migrate` prints once `output` is written: the lines, then the verdict."""
        return "\n".join([f"{source} -> {output}:", *self.lines,
                          f"wrote {output}; it passes `segframe config check`", f"verdict: {self.verdict()}"])


def _show(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


class _Dumper(yaml.SafeDumper):
    """Block mappings, lists on one line (`pool_scales: [1, 2, 3, 6]`), as in configs/."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def _keys(data: Any, schema: dict[str, tuple[str, ...]]) -> list[str]:
    """The keys of `data` that `schema` does not have (`model.foo`, `extra`)."""
    unknown = []
    for section, value in data.items():
        if section not in schema:
            unknown.append(str(section))
        elif schema[section] and isinstance(value, dict):
            unknown += [f"{section}.{k}" for k in value if k not in schema[section]]
        elif schema[section] and value is not None:
            unknown.append(f"{section} (a mapping expected, got {_show(value)})")
    return unknown


def kind_of(data: Any) -> str:
    """`vit` (the fork's ViT layout), `m2f` (its Mask2Former layout) or `segframe`; raises otherwise."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"expected a mapping with model, lora and train sections, got {type(data).__name__}")
    model = data.get("model")
    if isinstance(model, dict) and "model_path" in model:
        return "vit"
    if M2F_MARKS & set(data) or (isinstance(model, dict) and M2F_MARKS & set(model)):
        return "m2f"
    try:
        validate_config(data)
    except ConfigError as exc:
        first = next((x.strip() for x in str(exc).splitlines()[1:] if x.strip()), str(exc))
        raise ConfigError(
            "this is neither a config of the older nnU-Net fork (no model.model_path, not its Mask2Former "
            f"layout with m2f_train / model.hidden_dim) nor a valid segframe config ({first})") from None
    return "segframe"


def _backbone_shape(name: str, size: str, params: dict[str, Any]) -> tuple[int, int]:
    """(width, depth) of a segframe backbone, built on the meta device (no memory, no weights)."""
    import torch

    from segframe.plugins import get_registry

    spec = get_registry().backbone(name).spec
    with torch.device("meta"):
        backbone = spec.build(size, spec.params.model_validate(params), 3)
    return backbone.embed_dim, backbone.num_layers


def _backbone(model: dict, out: Migration, checkpoint: str | None,
              origin: str = "timm's pretrained {weights}") -> tuple[str, str, dict]:
    """model.backbone, backbone_size and checkpoint_path of a fork file (both layouts); `origin` says
    where the fork took the pretrained weights from."""
    name = model.get("backbone", "dinov3")
    size = model.get("backbone_size", "large")
    if name not in FORK_BACKBONES:
        raise ConfigError(f"model.backbone {_show(name)} is not one the fork built (it knew "
                          f"{', '.join(FORK_BACKBONES)}); the fork could not have trained this file")
    timm_name, fixed_size, _ = FORK_BACKBONES[name]
    params: dict[str, Any] = {"name": name}
    if name != "dinov3":  # learned position embeddings: the fork let timm resize them
        params["pos_embed_resize"] = "timm"
    out.line("model.backbone", "kept" if "backbone" in model else
             f"not set; the fork's default {name} written")
    if len(params) > 1:
        out.line("model.backbone.pos_embed_resize", "timm written (the fork resized position embeddings "
                                                    "with timm's default)")
    if fixed_size and size != fixed_size:
        out.line("model.backbone_size", f"{_show(size)} written as {fixed_size}: the fork built "
                                        f"{name}'s ViT-{fixed_size[0].upper()} whatever this key said")
        size = fixed_size
    else:
        out.line("model.backbone_size", "kept" if "backbone_size" in model else
                 f"not set; the fork's default {size} written")
    path = model.get("checkpoint_path") or ""
    out.set("model", "backbone", params if len(params) > 1 else name)
    out.set("model", "backbone_size", size)
    if timm_name is None:
        out.set("model", "checkpoint_path", path)
        out.line("model.checkpoint_path", "kept" + ("" if path else " (empty: the fork built this "
                                                                    "backbone without weights, random init)"))
        return name, size, params
    weights = timm_name.format(size=size)
    source = origin.format(weights=weights, letter=size[0])
    out.set("model", "pretrained", f"timm:{weights}")
    if path:
        out.set("model", "checkpoint_path", path)
        out.differ("model.checkpoint_path", f"the fork loaded timm's pretrained {weights}, then this file's "
                   "'model' entry over it with strict=False (keys that did not fit were skipped); segframe "
                   "loads the file alone and refuses keys that do not fit")
    elif checkpoint:
        out.set("model", "checkpoint_path", checkpoint)
        out.line("model.checkpoint_path", f"empty: the fork started from {source}; "
                                          f"written as model.pretrained: timm:{weights}, with the file "
                                          "from --checkpoint (read when training starts, which refuses a "
                                          "file that does not fit)")
    else:
        out.set("model", "checkpoint_path", "")
        out.differ("model.checkpoint_path", f"empty: the fork started from {source}; "
                   f"written as model.pretrained: timm:{weights}; `segframe train` refuses to start until "
                   "model.checkpoint_path gives that file (or migrate with --checkpoint FILE)")
    return name, size, params


def _lora(lora: dict, defaults: dict, out: Migration, freeze: str) -> bool:
    for key, default in defaults.items():
        if key in lora:
            out.set("lora", key, lora[key])
            out.line(f"lora.{key}", "kept")
        else:
            out.set("lora", key, default)
            out.line(f"lora.{key}", f"not set; the fork's default {_show(default)} written")
    enabled = bool(out.config["lora"]["enabled"])
    out.set("model", "freeze_backbone", not enabled)
    out.line("model.freeze_backbone", f"{_show(not enabled)} written: {freeze}")
    return enabled


def _train(train: dict, defaults: dict, out: Migration) -> None:
    for key, default in defaults.items():
        if key in train and train[key] is not None:
            out.set("train", key, train[key])
            out.line(f"train.{key}", "kept")
        else:
            out.set("train", key, default)
            out.line(f"train.{key}", f"not set; the fork trainer's {_show(default)} written")
    for key, value in FORK_TRAINING.items():
        out.set("train", key, value)
    out.line("train.optimizer", "sgd, train.warmup_epochs: 0 written: the fork trained with nnU-Net's SGD "
                                "(momentum 0.99, nesterov, weight decay on every parameter) and its poly "
                                "schedule without warmup")
    out.line("train.precision", "nnunet written: the fork trained as nnU-Net does (fp16 with a grad scaler "
                                "on CUDA, fp32 elsewhere)")


def _plugin_params(decoder: str, source: str) -> dict[str, Any]:
    from segframe.plugins import get_registry

    try:
        return get_registry().decoder(decoder).spec.params.model_fields
    except PluginError as exc:
        raise ConfigError(f"cannot migrate {source}: model.decoder: {exc}") from None


def _head(module: str, decoder: dict, out: Migration, width: int, patch: int) -> None:
    stem = re.split(r"[./\\]", str(module).strip().removesuffix(".py"))[-1]
    head = FORK_HEADS.get(stem)
    if head is None:
        raise ConfigError(f"model.model_path {_show(module)} is not one of the fork's model files "
                          f"({', '.join(f'nnunetv2.model.{m}' for m in FORK_HEADS)})")
    fields = _plugin_params(head.decoder, str(module))
    params: dict[str, Any] = {"name": head.decoder}
    missing = []
    out.line("model.model_path", f"{_show(module)} -> model.decoder.name: {head.decoder}")
    for key, value in head.written.items():
        value = [width] * 4 if value == EMBED_X4 else value
        if key in fields:
            params[key] = value
            out.line(f"model.decoder.{key}", f"{_show(value)} written: the fork's {stem} built it so")
        else:
            missing.append(key)
    for key, value in decoder.items():
        where = f"model.decoder.{key}"
        if key not in head.keys:
            out.line(where, f"left out: the fork's {stem} ignored it (it printed a warning)")
            continue
        target = head.keys[key][0]
        if key == "interaction_indices" and value is not None:
            out.set("model", "layers", value)
            out.line(where, "written as model.layers (the same blocks)")
        elif target in fields:
            params[target] = value
            out.line(where, "kept" if target == key else f"kept as model.decoder.{target}")
        elif value is not None:
            missing.append(key)
        else:
            out.line(where, "null, the fork's default: left out")
    for key, (target, default) in head.keys.items():
        if key not in decoder and default is not None and target in fields:
            params.setdefault(target, default)
    if missing:
        out.differ("model.decoder", f"the installed {head.decoder} plugin has no parameter "
                   f"{', '.join(missing)}, which the fork's {stem} head needs: segframe builds another head")
    if head.unused:
        out.line("model.decoder", f"note: {head.unused}")
    if head.scales_by_16 and patch != 16:
        out.differ("model.model_path", f"the fork's {stem} scaled the {patch}-pixel token grid by 16 and "
                   "kept the top-left corner (its logits were shifted against the image); segframe's "
                   f"{head.decoder} keeps them on the image")
    out.set("model", "decoder", params if len(params) > 1 else head.decoder)
    out.set("model", "upsampler", head.upsampler)
    if head.upsampler == "fork_progressive":
        hidden = params.get("hidden_size", 512)
        out.set("model", "upsampler_width", hidden // 2)
        out.line("model.upsampler", f"fork_progressive, upsampler_width: {hidden // 2} written: the fork's "
                                    "upsampler (hidden_size // 2 wide)")
    else:
        out.line("model.upsampler", "bilinear written: the fork's head resized its logits bilinearly")


def _normalisation(name: str, out: Migration) -> None:
    out.set("model", "normalize", "none")
    out.line("model.normalize", "none written: the fork fed nnU-Net's normalised images without the "
                                "backbone's mean/std")
    out.set("model", "intermediate_norm", True)
    out.line("model.intermediate_norm", "true written: the fork applied the backbone's final norm to every "
                                        "feature it took")
    if FORK_BACKBONES[name][2] == 14:
        out.differ("train.patch_size", "segframe rounds nnU-Net's planned patch to a multiple of 14 for this "
                   "backbone (the fork padded each patch inside the network): the training patch differs "
                   "unless the plans' patch is a multiple of 14")


def _section(data: dict, key: str) -> dict:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def migrate_vit(data: dict, checkpoint: str | None = None) -> Migration:
    """A fork ViT config (model.model_path) -> Migration."""
    out = Migration()
    model = _section(data, "model")
    decoder = model.get("decoder") or {}
    if not isinstance(decoder, dict):
        raise ConfigError(f"model.decoder must be a mapping of the head's options, got {_show(decoder)}")
    name, size, params = _backbone(model, out, checkpoint)
    width, _ = _backbone_shape(name, size, {k: v for k, v in params.items() if k != "name"})
    _head(model["model_path"], decoder, out, width, FORK_BACKBONES[name][2])
    _normalisation(name, out)
    _lora(_section(data, "lora"), FORK_LORA, out, "the fork froze the backbone unless LoRA was on (then peft "
                                                  "freezes it)")
    train = _section(data, "train")
    _train(train, FORK_TRAIN, out)
    clip = train.get("gradient_clip")
    if clip is not None and float(clip) != FORK_CLIP:
        out.line("train.gradient_clip", f"{_show(clip)} written as {FORK_CLIP}: the fork's trainer "
                                        f"clipped at {FORK_CLIP} whatever this key said")
    elif clip is not None:
        out.line("train.gradient_clip", "kept")
    out.set("train", "gradient_clip", FORK_CLIP)
    return out


def migrate_m2f(data: dict, checkpoint: str | None = None) -> Migration:
    """A fork Mask2Former config (m2f_config.py's layout) -> Migration."""
    out = Migration()
    model = _section(data, "model")
    size = model.get("backbone_size", "large")
    if model.get("backbone", "dinov3") != "dinov3" or size not in ("small", "base", "large"):
        raise ConfigError(f"the fork's Mask2Former built DINOv3 ViT-S/B/L from torch hub (dinov3_vit"
                          f"{{s,b,l}}16), not {_show(model.get('backbone', 'dinov3'))} {_show(size)}")
    _backbone({**model, "backbone": "dinov3", "backbone_size": size}, out, checkpoint,
              "DINOv3's torch-hub weights (dinov3_vit{letter}16, lvd1689m), which timm names {weights}")
    fields = _plugin_params("mask2former", "model.hidden_dim")
    params: dict[str, Any] = {"name": "mask2former"}
    out.line("model.hidden_dim", "kept as model.decoder.hidden_size" if "hidden_dim" in model else
             "not set; the fork's default 2048 written as model.decoder.hidden_size")
    params["hidden_size"] = model.get("hidden_dim", 2048)
    out.differ("model.decoder", "the fork ran DINOv3's own Mask2Former code (not in the fork's files; "
               "its adapter, head, freezing and input handling are that code's); segframe's mask2former "
               "plugin is transformers' Mask2Former head on the same features: no parity is claimed")
    layers = model.get("backbone_out_layers", "FOUR_EVEN_INTERVALS")
    if layers == "FOUR_EVEN_INTERVALS":
        out.line("model.backbone_out_layers", "segframe's default model.layers (four evenly spaced blocks "
                                              "ending at the last)")
    else:
        raise ConfigError(f"model.backbone_out_layers {_show(layers)}: only FOUR_EVEN_INTERVALS (the fork's "
                          "default) is migrated; set model.layers by hand in a segframe config")
    dtype = model.get("autocast_dtype", "float32")
    if dtype not in M2F_PRECISION:
        raise ConfigError(f"model.autocast_dtype {_show(dtype)} is not one the fork knew "
                          f"({', '.join(M2F_PRECISION)})")
    loss = _section(data, "m2f_train")
    for key, target in M2F_LOSS_KEYS.items():
        if key in loss:
            params[target] = loss[key]
            out.line(f"m2f_train.{key}", f"kept as model.decoder.{target}")
    for key, value in M2F_FIXED.items():
        if key in loss and float(loss[key]) != value:
            out.differ(f"m2f_train.{key}", f"segframe's mask2former uses transformers' fixed {value}")
        elif key in loss:
            out.line(f"m2f_train.{key}", f"{value}: the same as segframe's mask2former (transformers' value)")
    if missing := [k for k in params if k != "name" and k not in fields]:
        raise ConfigError(f"the installed mask2former plugin has no parameter {', '.join(missing)}")
    out.set("model", "decoder", params)
    out.set("model", "normalize", "none")
    out.line("model.normalize", "none written: the fork's network got nnU-Net's normalised images")
    lora = _section(data, "lora")
    for key in ("bias", "use_rslora"):
        same = {"bias": "none", "use_rslora": False}[key]
        if key in lora and lora[key] != same:
            out.differ(f"lora.{key}", f"segframe's LoRA has {key} {_show(same)} only")
        elif key in lora:
            out.line(f"lora.{key}", f"{_show(same)}: as segframe's LoRA")
    _lora({k: v for k, v in lora.items() if k in M2F_LORA}, M2F_LORA, out,
          "segframe freezes the backbone unless LoRA is on (what DINOv3's code did is part of the "
          "model.decoder difference)")
    _train({}, M2F_TRAIN, out)
    clip = data.get("gradient_clip", 10.0)
    out.set("train", "gradient_clip", clip)
    out.line("gradient_clip", "kept as train.gradient_clip" if "gradient_clip" in data else
             "not set; the fork's default 10.0 written as train.gradient_clip")
    if dtype != "float32":
        out.set("train", "precision", M2F_PRECISION[dtype])
        out.line("model.autocast_dtype", f"written as train.precision: {M2F_PRECISION[dtype]}")
    else:
        out.line("model.autocast_dtype", "float32: DINOv3's decoder in float32 (part of the model.decoder "
                                         "difference); the trainer's autocast is train.precision: nnunet")
    return out


def migrate_config(data: Any, source: str = "<dict>", checkpoint: str | None = None) -> Migration:
    """Map a parsed fork config onto segframe's layout; every key of `data` gets a report line."""
    if data is None:
        raise ConfigError(f"cannot migrate {source}: the file is empty, there is nothing to migrate")
    try:
        kind = kind_of(data)
        if kind == "segframe":
            out = Migration()
            out.copied = True
            out.lines.append("  already a valid segframe config: copied unchanged")
            return out
        unknown = _keys(data, FORK_VIT_KEYS if kind == "vit" else FORK_M2F_KEYS)
        if unknown:
            raise ConfigError(f"keys the fork's {'ViT' if kind == 'vit' else 'Mask2Former'} config does not "
                              f"have: {', '.join(unknown)}; remove them (the fork refused them too)")
        return migrate_vit(data, checkpoint) if kind == "vit" else migrate_m2f(data, checkpoint)
    except ConfigError as exc:
        raise ConfigError(f"cannot migrate {source}: {exc}; nothing written") from None


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


def migrate_file(source: str | Path, output: str | Path, overwrite: bool = False,
                 checkpoint: str | None = None) -> Migration:
    """Migrate the fork config `source` to `output` (checked first; nothing is written if it is not
    valid, and an existing `output` is replaced only with `overwrite`). `checkpoint`: the file of the
    pretrained weights the fork loaded from timm, written as model.checkpoint_path."""
    source, output = Path(source), Path(output)
    if output.exists() and not overwrite:
        raise ConfigError(f"{output} already exists; pass --overwrite to replace it, or choose another -o")
    if not output.parent.is_dir():
        raise ConfigError(f"cannot write {output}: directory {output.parent} does not exist")
    if checkpoint is not None and not Path(checkpoint).exists():
        raise ConfigError(f"--checkpoint {checkpoint} does not exist; give the file of the weights the "
                          "report names")
    result = migrate_config(_read_yaml(source), str(source), checkpoint)
    if not result.copied:
        for number, text in comments(source.read_text(encoding="utf-8")):
            result.lines.append(f"  line {number}: comment not carried over: {text}")
    config = {k: v for k, v in result.config.items() if v}
    text = (f"# Migrated from {source.name} by `segframe config migrate`.\n"
            + yaml.dump(config, Dumper=_Dumper, sort_keys=False))
    def write_and_check(temporary: Path) -> None:  # renamed to `output` only when it is a valid config
        if result.copied:
            shutil.copyfile(source, temporary)
        else:
            temporary.write_text(text, encoding="utf-8")
        try:
            check_config(temporary)
        except ConfigError as exc:
            why = str(exc).replace(str(temporary), f"{output} (as migrated from {source})").replace("\n", " ")
            raise ConfigError(
                f"the migrated config is not valid, so {output} was not written: {why}") from None

    write_atomically(output, write_and_check, error=ConfigError)
    return result
