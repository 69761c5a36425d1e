"""The YAML config: pydantic models for model / lora / train, and `load_config()`.

Decoder and backbone sections are validated in a second step against the chosen
plugin's own `params` model, so a third-party decoder gets the same checking.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from segframe.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PluginChoice(BaseModel):
    """`name` of a plugin plus its parameters; YAML may give just the name as a string."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(description="registered plugin name")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DetailConfig(_Strict):
    """`model.detail`: the full-resolution detail path (segframe/detail.py, docs/detail.md)."""

    enabled: bool = Field(
        False, description="add a light conv path on the image (strides 1, 2, 4, 8) that joins the head's "
        "logits U-Net style on the way back to full resolution (replaces model.upsampler)",
    )
    channels: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [32, 32, 64, 64], min_length=4, max_length=4,
        description="widths at strides 1, 2, 4, 8 (encoder and decoder)",
    )
    units: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [2, 2, 2, 2], min_length=4, max_length=4,
        description="conv3x3-norm-LeakyReLU units per stage at strides 1, 2, 4, 8 (encoder and decoder; "
        "nnU-Net's stages have 2)",
    )
    norm: Literal["instance", "group", "batch"] = Field(
        "instance", description="normalisation in the path: instance (as nnU-Net), group or batch"
    )


class ModelConfig(_Strict):
    backbone: PluginChoice = Field(
        default=PluginChoice(name="dinov2"),
        description="backbone family (`segframe plugins`), or {name: ..., <backbone options>}",
    )
    backbone_size: str = Field("small", description="size within the family, e.g. small, base, large")
    checkpoint_path: str = Field(
        "", description="weight file (.pth/.safetensors: official, timm or Hugging Face layout) or Hugging "
                        "Face model folder; empty = random init (refused by training when model.pretrained "
                        "names weights)")
    pretrained: str = Field(
        "none", pattern=r"^(none|timm:[A-Za-z0-9_]+\.[A-Za-z0-9_]+)$",
        description="the weights the backbone is meant to start from, as timm names them "
                    "(`timm:vit_large_patch16_dinov3.lvd1689m`): `segframe train` refuses to start until "
                    "checkpoint_path gives them; none = no claim (an empty checkpoint_path is random init)")
    trust_checkpoint: bool = Field(
        False, description="allow checkpoints that need full unpickling (only for files you trust)"
    )
    decoder: PluginChoice = Field(
        default=PluginChoice(name="upernet"),
        description="decoder plugin name, or {name: ..., <decoder options>}",
    )
    freeze_backbone: bool = Field(False, description="train only neck, head and upsampler (and LoRA)")
    layers: list[int] | None = Field(
        None, description="backbone blocks to take features from; null = family default"
    )
    intermediate_norm: bool | None = Field(
        None, description="apply the final norm to intermediate features; null = family default"
    )
    neck: Literal["identity", "pyramid"] = Field(
        "identity", description="identity: all levels at the patch stride; pyramid: strides p/4, p/2, p, 2p"
    )
    upsampler: Literal["progressive", "bilinear", "fork_progressive"] | None = Field(
        None,
        description="how logits return to full resolution; null = progressive, or bilinear for a head "
        "that owns its training loss (its eval logits are never trained through learned stages); "
        "fork_progressive: the older nnU-Net fork's (two learned 2x stages of width "
        "model.upsampler_width, bilinear to the size, a 1x1 conv; no bilinear shortcut)",
    )
    upsampler_width: int = Field(
        256, ge=1, description="width of fork_progressive's first stage (the second has half, at least 32); "
                               "the fork used the UperNet hidden_size // 2")
    normalize: Literal["backbone", "none"] = Field(
        "backbone",
        description="backbone: apply the backbone's pretraining mean/std; none: input is used as is",
    )
    grad_checkpointing: bool = Field(
        False, description="recompute backbone blocks in backward to save memory"
    )
    detail: DetailConfig = Field(
        default_factory=DetailConfig, description="full-resolution detail path for thin structures"
    )


class LoraConfig(_Strict):
    enabled: bool = Field(False, description="wrap backbone modules with LoRA adapters (peft)")
    r: int = Field(8, ge=1, description="LoRA rank")
    lora_alpha: float = Field(16, gt=0, description="LoRA scaling numerator")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA path")
    target_modules: list[str] = Field(
        default_factory=lambda: ["qkv"],
        description="backbone attention modules to adapt (names inside each block, e.g. qkv, proj)",
    )


class LossConfig(_Strict):
    """`train.loss`: thin-structure terms added to nnU-Net's Dice + CE (segframe/losses.py)."""

    skeleton_recall: float = Field(
        0.0, ge=0, description="weight of the Skeleton Recall term (Kirchhoff et al., ECCV 2024): soft "
        "recall of the dilated skeleton of the target, added to Dice + CE; 0 = off (its authors use 1)",
    )


class TrainConfig(_Strict):
    optimizer: Literal["adamw", "sgd"] = Field(
        "adamw", description="adamw: AdamW, no weight decay on norms, biases, tokens; sgd: nnU-Net's SGD "
                             "(momentum 0.99, nesterov), weight decay on every parameter")
    initial_lr: float = Field(1e-4, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.05, ge=0, description="weight decay (AdamW: not on norms, biases, tokens)")
    gradient_clip: float = Field(12.0, gt=0, description="max gradient norm")
    num_epochs: int = Field(1000, ge=1, description="training epochs")
    num_iterations_per_epoch: int = Field(250, ge=1, description="training iterations per epoch")
    num_val_iterations_per_epoch: int = Field(50, ge=1, description="validation iterations per epoch")
    warmup_epochs: int = Field(
        10, ge=0, description="linear learning-rate warmup epochs, then poly decay (0: nnU-Net's PolyLR)")
    layer_decay: float | None = Field(
        None, gt=0, le=1, description="layer-wise LR decay for backbone blocks; null = off"
    )
    backbone_lr_scale: float = Field(1.0, gt=0, description="multiplies the LR of backbone parameters")
    patch_size: list[int] | None = Field(
        None, description="override nnU-Net's 2D patch size [H, W]; rounded to a multiple of the ViT patch"
    )
    batch_size: int | None = Field(None, ge=1, description="override nnU-Net's batch size")
    save_every: int = Field(
        50, ge=1, description="write checkpoint_latest.pth every this many epochs (for --c)"
    )
    precision: Literal["auto", "fp32", "bf16", "fp16", "nnunet"] = Field(
        "auto", description="training arithmetic: auto = bf16 on CUDA that supports it, else fp16 with a "
                            "grad scaler on CUDA, fp32 on CPU/MPS; nnunet = nnU-Net's own: fp16 with a grad "
                            "scaler on any CUDA, fp32 elsewhere"
    )
    validation_precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="the network's arithmetic in nnU-Net's final validation (after training and with "
                            "--val): bf16 runs its forward under CPU bfloat16 autocast, as `segframe predict "
                            "--precision bf16`; CPU only; the training and its checkpoints are unchanged"
    )
    max_nonfinite_steps: int = Field(
        20, ge=1, description="stop the training after this many consecutive NaN/inf steps (each is skipped)"
    )
    seed: int | None = Field(
        None, ge=0, le=2**32 - 1,
        description="seed torch, numpy and python random in the training process and, derived from it, each "
                    "augmentation worker (docs/data.md says what it makes reproducible); null = unseeded",
    )
    loss: LossConfig = Field(
        default_factory=LossConfig,
        description="extra loss terms for thin structures on heads trained on dense logits (docs/detail.md)",
    )


class SegframeConfig(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="before")
    @classmethod
    def _legacy_keys(cls, v: Any) -> Any:
        model = v.get("model") if isinstance(v, dict) else None
        if isinstance(model, dict) and "model_path" in model:
            raise ValueError(
                "model.model_path is no longer supported: name the head with `decoder:` "
                "(e.g. `decoder: upernet`; see `segframe plugins`), or convert the whole file from the "
                "older nnU-Net fork with `segframe config migrate OLD.yaml -o NEW.yaml`"
            )
        return v

    def decoder_params(self) -> BaseModel:
        """The decoder's validated params object."""
        from segframe.plugins import get_registry

        return get_registry().decoder(self.model.decoder.name).spec.params.model_validate(
            self.model.decoder.params
        )

    def backbone_params(self) -> BaseModel:
        """The backbone's validated params object."""
        from segframe.plugins import get_registry

        return get_registry().backbone(self.model.backbone.name).spec.params.model_validate(
            self.model.backbone.params
        )


def _loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if p != "__root__") or "(top level)"


def _lines(errors: list[dict], prefix: tuple = ()) -> list[str]:
    """One `  key.path: what is wrong` line per pydantic error."""
    lines = []
    for e in errors:
        where = _loc(prefix + tuple(e["loc"]))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `segframe config schema` lists valid keys)"
        lines.append(f"  {where}: {msg}" + (f" (got {e['input']!r})" if e["type"] not in (
            "extra_forbidden", "missing", "value_error") and not isinstance(e.get("input"), dict) else ""))
    return lines


def _raw_model(data: dict, key: str, default: Any) -> Any:
    """`model.<key>` of an unvalidated config, or `default`."""
    model = data.get("model")
    value = model.get(key) if isinstance(model, dict) else None
    return default if value is None else value


def validate_config(data: Any, source: str = "<dict>") -> SegframeConfig:
    """Validate a config dict (including plugin sections) and fill every default; every error of the
    config is reported at once, the plugin sections' with the others."""
    from segframe.errors import PluginError
    from segframe.plugins import get_registry

    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: top level must be a mapping, got {type(data).__name__}")
    errors: list[str] = []
    try:
        cfg = SegframeConfig.model_validate(data)
    except ValidationError as exc:
        cfg = None
        errors += _lines(exc.errors())
    registry = get_registry()
    resolved = {}
    for kind in ("backbone", "decoder"):
        try:  # from the raw section when the rest of the config is invalid
            choice = getattr(cfg.model, kind) if cfg else PluginChoice.model_validate(
                _raw_model(data, kind, ModelConfig.model_fields[kind].default))
        except ValidationError:
            continue  # its error is among the config's own
        try:
            spec = registry.get(kind, choice.name).spec
        except PluginError as exc:
            # a misspelt name is the config's fault; an installed plugin that fails to load is not
            if choice.name in registry.broken:
                raise PluginError(f"invalid config {source}:\n  model.{kind}: {exc}") from None
            errors.append(f"  model.{kind}: {exc}")
            continue
        try:
            params = spec.params.model_validate(choice.params)
            resolved[kind] = PluginChoice(name=choice.name, **params.model_dump(mode="json"))
        except ValidationError as exc:
            errors += _lines(exc.errors(), ("model", kind))
        size = cfg.model.backbone_size if cfg else _raw_model(data, "backbone_size", "small")
        if kind == "backbone" and isinstance(size, str) and size not in spec.sizes:
            errors.append(f"  model.backbone_size: {size!r} is not a size of {choice.name}; choose one of "
                          f"{', '.join(spec.sizes)}")
    if errors:
        raise ConfigError("\n".join([f"invalid config {source}:", *errors]))
    return cfg.model_copy(update={"model": cfg.model.model_copy(update=resolved)})


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that gives a key twice (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges; its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in lines:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice in the same mapping (lines {lines[key]} and "
                    f"{line}): keep one", key_node.start_mark)
            lines[key] = line
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path) -> Any:
    """The YAML of a config file: refused when it is not UTF-8 YAML, repeats a key, or is empty."""
    if path.is_dir():
        raise ConfigError(f"config path {path} is a directory, not a YAML file; pass the .yaml file itself")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (undecodable byte at offset {exc.start}); save it as "
            "UTF-8 YAML") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: builds no Python objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if data is None:
        raise ConfigError(
            f"config file {path} is empty: it would train every default (dinov2 small + UperNet from random "
            "weights, 1000 epochs); write `{}` in it to mean all defaults, or start from a file in configs/")
    return data


def _check_patch_size(cfg: SegframeConfig, source: str) -> None:
    size = cfg.train.patch_size
    if size is not None and (len(size) != 2 or any(v <= 0 for v in size)):
        raise ConfigError(
            f"invalid config {source}:\n  train.patch_size: must be two positive integers [H, W] "
            f"(a 2D patch), got {size}")


def load_config(path: str | Path) -> SegframeConfig:
    """Read and validate a YAML config file; errors name the file, the key path and the fix."""
    path = Path(path)
    cfg = validate_config(_read_yaml(path), str(path))
    _check_patch_size(cfg, str(path))
    return cfg


def missing_weights(cfg: SegframeConfig) -> str | None:
    """Why training must not start from this config (model.pretrained names weights that
    model.checkpoint_path does not give), or None."""
    m = cfg.model
    if m.pretrained == "none" or m.checkpoint_path:
        return None
    name = m.pretrained.removeprefix("timm:")
    return (f"model.pretrained says the backbone starts from {m.pretrained}, but model.checkpoint_path is "
            f"empty, which would train from random weights: save those weights (e.g. "
            f"`timm.create_model('{name}', pretrained=True).state_dict()` to a .safetensors file) and set "
            "model.checkpoint_path to the file, or set model.pretrained: none to train from random init")


def check_config(path: str | Path) -> tuple[SegframeConfig, list[str]]:
    """Everything `load_config` checks, plus what needs the backbone's architecture (`model.layers`
    against its depth; the backbone is built on the meta device, so no memory or weights). Returns
    the config and notes for the user."""
    path = Path(path)
    notes: list[str] = []
    cfg = load_config(path)
    if why := missing_weights(cfg):
        notes.append(f"`segframe train` will refuse {path}: {why}")
    if cfg.model.layers is not None:
        import torch

        from segframe.plugins import get_registry

        spec = get_registry().backbone(cfg.model.backbone.name).spec
        with torch.device("meta"):
            backbone = spec.build(cfg.model.backbone_size, cfg.backbone_params(), 3)
        depth = backbone.num_layers
        bad = [i for i in cfg.model.layers if not 0 <= i < depth]
        if bad or not cfg.model.layers:
            raise ConfigError(
                f"invalid config {path}:\n  model.layers: {cfg.model.layers} invalid for "
                f"{cfg.model.backbone.name} {cfg.model.backbone_size} with {depth} blocks: use indices "
                f"0..{depth - 1} (default {backbone.default_layers})")
    return cfg, notes


def dump_config(cfg: SegframeConfig) -> str:
    """The resolved config as YAML (every default filled in)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def config_schema() -> dict[str, Any]:
    """JSON Schema of the whole file, with each registered plugin's parameters."""
    from segframe.plugins import get_registry

    schema = SegframeConfig.model_json_schema()
    registry = get_registry()
    model_props = schema["$defs"]["ModelConfig"]["properties"]
    for kind, found in (("backbone", registry.backbones()), ("decoder", registry.decoders())):
        options: list[dict[str, Any]] = [{"type": "string", "enum": list(found)}]
        for name, reg in found.items():
            sub = reg.spec.params.model_json_schema()
            sub.setdefault("properties", {})
            sub["properties"] = {"name": {"const": name}, **sub["properties"]}
            sub["required"] = ["name"]
            sub["additionalProperties"] = False
            sub.pop("title", None)
            schema["$defs"].update(sub.pop("$defs", {}))
            options.append(sub)
        model_props[kind] = {"description": model_props[kind].get("description", ""), "anyOf": options}
    schema["$defs"].pop("PluginChoice", None)
    return schema
