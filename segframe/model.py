"""ViTSegModel: normalise, pad, extract ViT features, neck, plugin head, upsample, crop.

The one model for every backbone and decoder; plugins own only the head. Also the
seed-compatible factory `create_segmentation_model`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from segframe.backbones.checkpoint import LoadReport
from segframe.config import SegframeConfig, missing_weights, validate_config
from segframe.detail import DetailPath
from segframe.errors import CheckpointError, ConfigError, PluginError, SegframeError
from segframe.lora import add_lora, format_counts, has_lora, merge_lora, parameter_counts
from segframe.plugins import get_registry
from segframe.spec import DecoderInputs, HeadContext
from segframe.upsample import build_neck, build_upsampler, crop, resize

log = logging.getLogger(__name__)

# Backbone parameters that get no weight decay besides biases and norms (all 1-D).
_NO_DECAY = re.compile(r"(^|\.)(cls_token|reg_token|pos_embed|mask_token|register_tokens|storage_tokens)$")
_BLOCK = re.compile(r"^backbone\.vit\.blocks\.(\d+)\.")


class ViTSegModel(nn.Module):
    """Segmentation model built from a validated `SegframeConfig`.

    forward(x: (B, in_channels, H, W)) -> logits (B, num_classes, H, W), any H, W >= 1.

    Submodules (and state-dict prefixes): `backbone` (a `segframe.backbones.Backbone`; its
    timm ViT is `backbone.vit`, blocks `backbone.vit.blocks.{i}.`), `neck`, `decoder` (the
    plugin's head), and `upsampler`, or `detail` (a `segframe.detail.DetailPath`) when
    `model.detail.enabled` (then `upsampler` is None). Pretrained backbone weights are not loaded
    by the constructor (nnU-Net rebuilds the network for inference): call `load_pretrained()` when
    training starts.

    Input channels: 1 -> repeated to 3, then the backbone's normalisation; 3 -> as is; any
    other C -> the backbone is built with C input channels (a pretrained 3-channel patch
    embedding is adapted on loading) and every channel uses the mean of the backbone's three
    means and stds.
    """

    def __init__(self, config: SegframeConfig | dict, in_channels: int = 3, num_classes: int = 2):
        super().__init__()
        if not isinstance(config, SegframeConfig):
            config = validate_config(config)
        if in_channels < 1:
            raise ConfigError(f"in_channels must be >= 1, got {in_channels}")
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        self.config = config
        self.in_channels = in_channels
        self.num_classes = num_classes
        registry = get_registry()
        m = config.model

        backbone_chans = 3 if in_channels in (1, 3) else in_channels
        bb_spec = registry.backbone(m.backbone.name).spec
        self.backbone = bb_spec.build(m.backbone_size, config.backbone_params(), in_chans=backbone_chans)
        self.layers = self.backbone.check_layers(m.layers or self.backbone.default_layers)
        self.intermediate_norm = (
            self.backbone.intermediate_norm if m.intermediate_norm is None else m.intermediate_norm
        )
        # blocks after the last chosen layer (and the final norm the features do not use) are not
        # kept: they would be saved, exported and left without gradient (an error under DDP)
        self.backbone.prune(self.layers, norm=self.intermediate_norm)
        self.patch_size = self.backbone.patch_size
        mean, std = torch.tensor(self.backbone.mean), torch.tensor(self.backbone.std)
        if backbone_chans != 3:
            mean, std = mean.mean().repeat(backbone_chans), std.mean().repeat(backbone_chans)
        self.register_buffer("mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, -1, 1, 1), persistent=False)

        self.neck = build_neck(m.neck, self.backbone.embed_dim, self.patch_size, len(self.layers))
        dec = registry.decoder(m.decoder.name)
        self.decoder_contract = dec.spec.contract
        build_args = [config.decoder_params(), list(self.neck.out_channels), list(self.neck.out_strides),
                      num_classes]
        if self.decoder_contract == 2:
            build_args.append(HeadContext(
                backbone=m.backbone.name, patch_size=self.patch_size, embed_dim=self.backbone.embed_dim,
                num_levels=len(self.layers), has_cls_token=self.backbone.has_cls_token,
                num_register_tokens=self.backbone.num_register_tokens, image_channels=backbone_chans,
                neck=m.neck,
            ))
        self.decoder = dec.spec.build(*build_args)
        where = f"decoder {m.decoder.name!r} ({dec.distribution})"
        stride = getattr(self.decoder, "output_stride", None)
        if not isinstance(stride, int | float) or stride <= 0:
            raise PluginError(
                f"{where} built a head without a positive `output_stride` attribute (got {stride!r}); "
                "the plugin must set it"
            )
        self.decoder_inputs = self._decoder_inputs(dec.spec.inputs, where)
        # a head that owns its loss returns raw training outputs; ViTSegModel.training_loss scores them
        self.owns_loss = callable(getattr(self.decoder, "training_loss", None))
        if self.owns_loss and self.decoder_contract != 2:
            raise PluginError(f"{where} has a training_loss but declares contract 1; set contract=2")
        upsampler = m.upsampler or ("bilinear" if self.owns_loss else "progressive")
        if self.owns_loss and upsampler != "bilinear":
            raise ConfigError(
                f"model.upsampler: {upsampler} cannot apply to {where}: it owns its training loss, so "
                "learned upsampling stages would never train; remove model.upsampler (or set bilinear)"
            )
        self.upsampler: nn.Module | None = None
        self.detail: DetailPath | None = None
        if m.detail.enabled:
            self._check_detail(where)
            self.detail = DetailPath(backbone_chans, num_classes, m.detail.channels, m.detail.units,
                                     m.detail.norm, checkpointing=m.grad_checkpointing)
        else:
            self.upsampler = build_upsampler(upsampler, num_classes, stride, m.upsampler_width)
        # a head with an auxiliary head returns (logits, auxiliary logits) in training; a trainer adds
        # the auxiliary loss with this weight (the head's `auxiliary_loss_weight`, part of the contract)
        self.auxiliary_loss_weight = float(getattr(self.decoder, "auxiliary_loss_weight", 0.0))

        if m.freeze_backbone:
            self.backbone.requires_grad_(False)
        if config.lora.enabled:
            self.enable_lora()
        if m.grad_checkpointing:
            self.backbone.set_grad_checkpointing(True)

    def _check_detail(self, where: str) -> None:
        """The detail path replaces the upsampler; refuse combinations where it could not train."""
        if self.owns_loss:
            raise ConfigError(
                f"model.detail: enabled cannot apply to {where}: it owns its training loss, which scores "
                "its raw outputs, so the detail path on its eval logits would never train; set "
                "model.detail.enabled: false (or choose a decoder trained on dense logits)"
            )
        if self.config.model.upsampler is not None:
            raise ConfigError(
                f"model.upsampler: {self.config.model.upsampler} and model.detail.enabled both say how the "
                "logits return to full resolution (the detail path replaces the upsampler); remove "
                "model.upsampler or set model.detail.enabled: false"
            )

    def _decoder_inputs(self, declared: frozenset[str], where: str) -> frozenset[str]:
        """The extra inputs the built head needs (its `inputs` attribute narrows the spec's); refuse
        any the spec did not declare or the backbone cannot give."""
        needed = frozenset(getattr(self.decoder, "inputs", declared))
        if not needed <= declared:
            raise PluginError(
                f"{where}: its head asks for {sorted(needed - declared)}, which its DecoderSpec.inputs "
                f"{sorted(declared)} does not declare; the plugin must declare every input it reads"
            )
        if "prefix_tokens" in needed and not self.backbone.has_cls_token:
            raise PluginError(
                f"{where} needs input 'prefix_tokens' (the CLS token), but backbone "
                f"{self.config.model.backbone.name} {self.config.model.backbone_size} has no CLS token; "
                "choose another backbone or a decoder option that does not read it"
            )
        return needed

    # ------------------------------------------------------------ forward

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise SegframeError(f"expected a torch.Tensor (B, C, H, W), got {type(x).__name__}")
        if x.ndim != 4:
            hint = " (add a batch dimension: x[None])" if x.ndim == 3 else ""
            raise SegframeError(f"expected input (B, C, H, W), got shape {tuple(x.shape)}{hint}")
        if x.shape[1] != self.in_channels:
            raise SegframeError(
                f"expected {self.in_channels} input channels, got {x.shape[1]} (shape {tuple(x.shape)}); "
                "build the model with in_channels matching the data"
            )
        if min(x.shape) < 1:
            raise SegframeError(f"input has an empty dimension: shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise SegframeError(f"expected a floating-point input, got {x.dtype} (shape {tuple(x.shape)})")
        # data-dependent check: skipped while torch.compile traces (it would break the graph)
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(x).all()):
            what = "NaN" if bool(torch.isnan(x).any()) else "infinite"
            raise SegframeError(f"input of shape {tuple(x.shape)} contains {what} values")

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.config.model.normalize == "backbone":
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return x

    def padding(self, x: torch.Tensor) -> tuple[int, int]:
        """The rows and columns `pad` adds below and right of `x` (..., H, W): to a multiple of the patch."""
        return -x.shape[-2] % self.patch_size, -x.shape[-1] % self.patch_size

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Pad bottom/right to a multiple of the patch: reflect, or replicate where a side is too short."""
        h, w = x.shape[-2:]
        ph, pw = self.padding(x)
        # skipped only where the pad is known to be 0 (never a guard on a traced size: a pad of 0 is
        # the identity), so an exported graph keeps the size dynamic
        if not statically_known_true(pw == 0):
            x = F.pad(x, (0, pw, 0, 0), mode="reflect" if pw < w else "replicate")
        if not statically_known_true(ph == 0):
            x = F.pad(x, (0, 0, 0, ph), mode="reflect" if ph < h else "replicate")
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor | Any:
        """Logits (B, num_classes, H, W). In training mode a head with an auxiliary head gives (logits,
        auxiliary logits), both at the input size (weight their loss by `auxiliary_loss_weight`), and a
        head that owns its loss its raw training outputs instead (score them with `training_loss`)."""
        self._check_input(x)
        h, w = x.shape[-2:]
        x = self.pad(self._normalize(x))
        head_out = self.decoder(self._head_inputs(x))
        if self.owns_loss and self.training:
            return head_out
        head_out, aux = head_out if isinstance(head_out, tuple) else (head_out, None)
        if self.detail is not None:
            logits = self.detail(x, head_out)
        else:
            logits = self.upsampler(head_out, x.shape[-2:])
        if aux is None:
            return crop(logits, h, w)
        return crop(logits, h, w), crop(resize(aux, x.shape[-2:]), h, w)

    def _head_inputs(self, x: torch.Tensor) -> list[torch.Tensor] | DecoderInputs:
        """What the head reads: the neck's maps (contract 1), or a DecoderInputs with exactly the
        inputs the head asked for (contract 2)."""
        prefix = "prefix_tokens" in self.decoder_inputs
        out = self.backbone.features(x, self.layers, self.intermediate_norm, prefix_tokens=prefix)
        features, tokens = out if prefix else (out, None)
        features = self.neck(features)
        if self.decoder_contract == 1:
            return features
        return DecoderInputs(
            features=features,
            cls_tokens=None if tokens is None else [t[:, 0] for t in tokens],
            register_tokens=None if tokens is None else [t[:, 1:] for t in tokens],
            image=x if "image" in self.decoder_inputs else None,
        )

    def training_loss(
        self, outputs: Any, target: torch.Tensor, ignore_label: int | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of a head that owns it, on a training-mode forward's `outputs`.

        `target` is nnU-Net's dense target (B, 1, H, W) of class indices at the input size, with
        `ignore_label` (nnU-Net's, or None) on pixels to ignore. Labels outside 0..num_classes-1
        are an error. The target is padded like the image; padding and ignored pixels reach the
        head as `ignore_index` (the ignore label, else num_classes). Returns (loss, named parts).
        """
        if not self.owns_loss:
            raise SegframeError("this model's decoder has no training_loss: use nnU-Net's loss on the logits")
        k = self.num_classes
        valid = (target >= 0) & (target < k)
        if ignore_label is not None:
            valid |= target == ignore_label
        if not bool(valid.all()):
            bad = sorted({int(v) for v in torch.unique(target[~valid]).tolist()})[:10]
            raise SegframeError(
                f"the target holds label(s) {bad} outside 0..{k - 1} (num_classes {k})"
                + ("" if ignore_label is None else f" and the ignore label {ignore_label}")
                + ": check the dataset's labels in dataset.json"
            )
        ignore_index = k if ignore_label is None else int(ignore_label)
        target = target.long()
        ph, pw = self.padding(target)
        if ph or pw:
            target = F.pad(target, (0, pw, 0, ph), value=ignore_index)
        result = self.decoder.training_loss(outputs, target, ignore_index)
        loss, parts = result if isinstance(result, tuple) else (result, {})
        return loss, dict(parts)

    # ------------------------------------------------------------ weights

    def load_pretrained(
        self, path: str | Path | None = None, trust: bool | None = None, strict: bool = True
    ) -> LoadReport | None:
        """Load the backbone weights: an official, timm or Hugging Face file, or a Hugging Face model folder
        (default: config model.checkpoint_path / trust_checkpoint).

        Works with and without LoRA adapters (peft's `qkv.base_layer.weight` names are mapped;
        adapters are left alone). Returns the backbone's `LoadReport`, or None when no path is
        configured (random init). Raises CheckpointError and changes nothing when the file does
        not fit, or when there is no path but `model.pretrained` names the weights to start from.
        """
        path = self.config.model.checkpoint_path if path is None else path
        trust = self.config.model.trust_checkpoint if trust is None else trust
        if not path:
            if why := missing_weights(self.config):  # never a silent random init
                raise CheckpointError(why)
            log.info("no checkpoint_path: the backbone keeps its random initialisation")
            return None
        return self.backbone.load_checkpoint(path, trust=trust, strict=strict)

    # ------------------------------------------------------------ LoRA and parameters

    @property
    def lora_active(self) -> bool:
        return has_lora(self.backbone)

    def enable_lora(self) -> None:
        """Add LoRA adapters (config `lora`) to the backbone blocks; a no-op if they are there.

        The backbone's own weights are frozen (peft), the adapters trainable. `self.config`
        is updated (`lora.enabled: true`) so a model rebuilt from it has the same state-dict keys.
        """
        if not self.lora_active:
            add_lora(self.backbone.vit, self.config.lora)
        self._set_lora_flag(True)

    def disable_lora(self) -> None:
        """Merge the adapters into the backbone weights and remove them (outputs unchanged).

        The model then has the module tree and state-dict keys of a model without LoRA, and
        `self.config` says `lora.enabled: false`. Merged backbone weights stay frozen.
        """
        if self.lora_active:
            merge_lora(self.backbone.vit)
        self._set_lora_flag(False)

    def _set_lora_flag(self, enabled: bool) -> None:
        lora = self.config.lora.model_copy(update={"enabled": enabled})
        self.config = self.config.model_copy(update={"lora": lora})

    def parameter_counts(self) -> dict[str, tuple[int, int]]:
        """Part -> (trainable, total) for backbone, lora (adapters), neck, decoder, and upsampler or
        detail (the detail path)."""
        parts = {"backbone": self.backbone, "neck": self.neck, "decoder": self.decoder}
        if self.detail is not None:
            return parameter_counts({**parts, "detail": self.detail})
        return parameter_counts({**parts, "upsampler": self.upsampler})

    def print_trainable_parameters(self, detailed: bool = False) -> dict[str, tuple[int, int]]:
        """Print trainable / all parameters (and per part with `detailed`); returns `parameter_counts()`."""
        counts = self.parameter_counts()
        print(format_counts(counts, detailed))
        return counts

    def layer_id(self, name: str) -> int:
        """Depth of a parameter for layer-wise LR decay: 0 = embeddings, i + 1 = block i,
        num_layers + 1 = the backbone's final norm and everything after the backbone."""
        n = self.backbone.num_layers
        if not name.startswith("backbone."):
            return n + 1
        match = _BLOCK.match(name)
        if match:
            return int(match.group(1)) + 1
        return n + 1 if name.startswith(("backbone.vit.norm.", "backbone.vit.fc_norm.")) else 0

    def param_groups(
        self, lr: float, weight_decay: float, layer_decay: float | None = None, backbone_lr_scale: float = 1.0
    ) -> list[dict[str, Any]]:
        """Optimizer parameter groups of the trainable parameters.

        Backbone parameters get `lr * backbone_lr_scale * layer_decay ** (num_layers + 1 - layer_id)`
        (BEiT's layer-wise decay; `layer_decay=None` = no decay); neck, head, upsampler and the
        detail path get `lr`. Biases, norm weights, LayerScale and tokens/position embeddings get no
        weight decay.
        Each group also has `lr_scale` (for schedulers that set `lr = base_lr * factor * lr_scale`)
        and `names`.
        """
        n = self.backbone.num_layers
        groups: dict[tuple[float, float], dict[str, Any]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            scale = 1.0
            if name.startswith("backbone."):
                decay = layer_decay ** (n + 1 - self.layer_id(name)) if layer_decay else 1.0
                scale = backbone_lr_scale * decay
            no_decay = p.ndim <= 1 or bool(_NO_DECAY.search(name))
            wd = 0.0 if no_decay else weight_decay
            group = groups.setdefault((scale, wd), {
                "params": [], "names": [], "lr": lr * scale, "lr_scale": scale, "weight_decay": wd,
            })
            group["params"].append(p)
            group["names"].append(name)
        return list(groups.values())


def create_segmentation_model(
    backbone_name: str = "dinov3",
    backbone_size: str = "large",
    num_classes: int = 1,
    checkpoint_path: str | None = None,
    freeze_backbone: bool = False,
    use_lora: bool = True,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.05,
    lora_target_modules: list[str] | None = None,
    decoder: str = "upernet",
    in_channels: int = 3,
    **decoder_params: Any,
) -> ViTSegModel:
    """The seed's factory: a `ViTSegModel` from keyword arguments, pretrained weights loaded.

    `decoder_params` are the decoder's YAML keys (e.g. `hidden_size=256`), validated by the
    plugin (unknown keys are a ConfigError). Everything else takes the config defaults.
    """
    lora: dict[str, Any] = {"enabled": use_lora, "r": lora_rank, "lora_alpha": lora_alpha,
                            "lora_dropout": lora_dropout}
    if lora_target_modules is not None:
        lora["target_modules"] = list(lora_target_modules)
    cfg = validate_config({
        "model": {
            "backbone": backbone_name,
            "backbone_size": backbone_size,
            "checkpoint_path": checkpoint_path or "",
            "decoder": {"name": decoder, **decoder_params},
            "freeze_backbone": freeze_backbone,
        },
        "lora": lora,
    }, source="create_segmentation_model()")
    model = ViTSegModel(cfg, in_channels=in_channels, num_classes=num_classes)
    model.load_pretrained()
    return model
