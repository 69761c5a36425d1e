"""The Backbone interface every family implements: a timm ViT plus what the model needs to know.

Also holds what the families share: loading official checkpoints through timm's own
converters (`Backbone.convert_state_dict` / `load_checkpoint`; timm state dicts and Hugging Face
DINOv2/DINOv3 folders are renamed to the official layout first, see hf.py) and resizing learned
position embeddings the way each family's own code does (`set_pos_embed_resize`).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from timm.models import adapt_input_conv
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from segframe.backbones.bicubic import bicubic_resize
from segframe.backbones.checkpoint import (
    CheckpointFormat,
    LoadReport,
    describe_layout,
    read_weights,
    state_dict_from,
    unbuilt_keys,
    unbuilt_modules,
)
from segframe.backbones.hf import ARCHITECTURES, check_hf_config, hf_model_type, hf_to_official
from segframe.errors import CheckpointError, ConfigError, SegframeError
from segframe.files import read_json

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

log = logging.getLogger(__name__)


def default_layers(depth: int) -> list[int]:
    """Four evenly spaced blocks ending at the last: 12 -> [2,5,8,11], 24 -> [5,11,17,23]."""
    step = depth // 4
    return [step * (i + 1) - 1 for i in range(4)] if step else list(range(depth))


# ---------------------------------------------------------------- position embedding resizing

def resample_pos_embed(
    pos: torch.Tensor, new_hw: tuple[int, int], old_hw: tuple[int, int], num_prefix: int, mode: str
) -> torch.Tensor:
    """Resize a learned (1, prefix + h*w, D) position embedding to `new_hw` (`pos` itself if equal).

    mode "antialias": timm's default (bicubic, antialias, exact output size).
    mode "plain": bicubic, no antialias, exact size (MAE/RETFound and VisionFM fine-tuning code).
    mode "offset": the DINO/DINOv2 code: bicubic, no antialias, scale factor (n + 0.1) / N.
    All three are `F.interpolate`'s numbers, computed by segframe.backbones.bicubic so that the new
    grid may be symbolic under torch.export; the no-op is taken only where the sizes are known equal.
    """
    if all(statically_known_true(a == b) for a, b in zip(new_hw, old_hw, strict=True)):
        return pos
    prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
    grid = grid[0].float().T.reshape(pos.shape[-1], *old_hw)  # (D, h, w)
    offset = 0.1 if mode == "offset" else 0.0
    grid = bicubic_resize(grid, new_hw, offset=offset, antialias=mode == "antialias")
    return torch.cat([prefix, grid.flatten(1).T[None].to(pos.dtype)], dim=1)


class PosEmbedResizeViT(VisionTransformer):
    """timm's VisionTransformer whose dynamic position-embedding resize follows `pos_embed_mode`.

    timm offers no hook for the resize, so family builders switch the class of a freshly
    built timm ViT to this one (`set_pos_embed_resize`); parameters and keys are unchanged.
    """

    pos_embed_mode: str = "antialias"

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is None or not self.dynamic_img_size:
            return super()._pos_embed(x)
        b, h, w, c = x.shape
        pos_embed = resample_pos_embed(
            self.pos_embed, (h, w), tuple(self.patch_embed.grid_size),
            0 if self.no_embed_class else self.num_prefix_tokens, self.pos_embed_mode,
        )
        x = x.view(b, -1, c)
        to_cat = [t.expand(b, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.no_embed_class:
            x = torch.cat(to_cat + [x + pos_embed], dim=1)
        else:
            x = torch.cat(to_cat + [x], dim=1) + pos_embed
        return self.pos_drop(x)


def set_pos_embed_resize(vit: nn.Module, mode: str) -> nn.Module:
    """Make a timm VisionTransformer resize its position embedding with `mode` (see resample_pos_embed)."""
    if mode not in ("antialias", "plain", "offset"):
        raise ValueError(f"unknown position-embedding resize mode {mode!r}")
    if type(vit) is not VisionTransformer and not isinstance(vit, PosEmbedResizeViT):
        raise TypeError(f"expected a timm VisionTransformer, got {type(vit).__name__}")
    vit.__class__ = PosEmbedResizeViT
    vit.pos_embed_mode = mode
    return vit


# ---------------------------------------------------------------- the backbone

class Backbone(nn.Module):
    """A ViT that returns NCHW features of chosen blocks.

    Attributes the model relies on: `embed_dim`, `patch_size`, `num_layers`, `mean`, `std`
    (pretraining input statistics for 3 channels in [0, 1]), `default_layers`,
    `intermediate_norm` (family default for applying the final norm to intermediate
    features), `in_chans`, `vit` (the timm module, for peft and gradient checkpointing), and
    `num_prefix_tokens` / `has_cls_token` / `num_register_tokens` (the tokens before the patches).
    `checkpoint_format` describes the family's official files (see `load_checkpoint`).
    `num_layers` stays the family's depth after `prune`; `vit.blocks` then holds only the blocks built.
    """

    def __init__(
        self,
        vit: nn.Module,
        *,
        family: str,
        size: str,
        patch_size: int,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        intermediate_norm: bool = True,
        layers: list[int] | None = None,
        checkpoint_format: CheckpointFormat | None = None,
        pos_embed_load_resize: str | None = None,
    ):
        super().__init__()
        self.vit = vit
        self.family = family
        self.size = size
        self.patch_size = patch_size
        self.embed_dim = int(vit.embed_dim)
        self.num_layers = len(vit.blocks)
        self.in_chans = int(vit.patch_embed.proj.weight.shape[1])
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.intermediate_norm = intermediate_norm
        self.default_layers = layers or default_layers(self.num_layers)
        self.checkpoint_format = checkpoint_format
        # files whose learned position embedding is on another square grid are resized with this mode
        # (see resample_pos_embed) when the family's own loader does so; None = such files are refused
        self.pos_embed_load_resize = pos_embed_load_resize
        # timm puts the prefix tokens first: the CLS token (if any), then registers / storage tokens
        self.num_prefix_tokens = int(getattr(vit, "num_prefix_tokens", 0))
        self.has_cls_token = getattr(vit, "cls_token", None) is not None
        self.num_register_tokens = self.num_prefix_tokens - int(self.has_cls_token)
        self.pruned = self.norm_pruned = False  # see `prune`

    def check_layers(self, layers: list[int]) -> list[int]:
        bad = [i for i in layers if not 0 <= i < self.num_layers]
        if bad or not layers:
            raise SegframeError(
                f"model.layers {layers} invalid for {self.family} {self.size} with {self.num_layers} blocks: "
                f"use indices 0..{self.num_layers - 1} (default {self.default_layers})"
            )
        if max(layers) >= len(self.vit.blocks):
            raise SegframeError(
                f"model.layers {layers}: this {self.family} {self.size} was pruned after block "
                f"{len(self.vit.blocks) - 1} (blocks after the last chosen layer are not built); rebuild it "
                "with the layers you need"
            )
        if list(layers) != sorted(set(layers)):
            # heads read levels shallow to deep (the last is the deepest), and blocks after the
            # deepest one are not built: an unsorted list would drop blocks a level needs
            raise SegframeError(
                f"model.layers {layers} must be strictly increasing block indices, shallow to deep, "
                f"e.g. {sorted(set(layers))}"
            )
        return list(layers)

    def features(
        self, x: torch.Tensor, layers: list[int] | None = None, norm: bool | None = None,
        prefix_tokens: bool = False,
    ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Outputs of blocks `layers` as (B, embed_dim, H/p, W/p); H and W must be multiples of p.

        With `prefix_tokens`, returns (features, prefix) where prefix[i] is (B, num_prefix_tokens, D):
        the CLS token first (when `has_cls_token`), then the register / storage tokens, normed like
        the patch tokens.
        """
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise SegframeError(
                f"input {h}x{w} is not a multiple of the patch size {p}: pad it first "
                "(ViTSegModel pads automatically)"
            )
        layers = self.check_layers(self.default_layers if layers is None else layers)
        norm = self.intermediate_norm if norm is None else norm
        if norm and self.norm_pruned:
            raise SegframeError(f"the final norm of this {self.family} {self.size} was pruned: rebuild it "
                                "with model.intermediate_norm: true to read normed features")
        if prefix_tokens and not self.num_prefix_tokens:
            raise SegframeError(f"backbone {self.family} {self.size} has no prefix tokens (no CLS token)")
        # stop_early: the blocks after the last of `layers` are not run (timm runs every block otherwise)
        out = self.vit.forward_intermediates(
            x, indices=layers, norm=norm, output_fmt="NCHW", intermediates_only=True,
            return_prefix_tokens=prefix_tokens, stop_early=True,
        )
        if not prefix_tokens:
            return out
        return [f for f, _ in out], [t for _, t in out]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vit.set_grad_checkpointing(enable)

    def prune(self, layers: list[int], norm: bool) -> list[str]:
        """Remove what features of `layers` never run, with timm's `prune_intermediate_layers`: the blocks
        after the last of `layers`, and the final norm unless `norm` (the features are normed).

        Parameters, optimizers, checkpoints and exports then hold only the modules run. Loading drops
        the removed modules' keys: `prepare_state_dict` reports them, and `load_state_dict` of any model
        holding this backbone skips them (state dicts saved before pruning). Returns their timm keys.
        """
        layers = self.check_layers(layers)
        before = self.vit.state_dict()
        self.vit.prune_intermediate_layers(layers, prune_norm=not norm, prune_head=False)
        self.norm_pruned = self.norm_pruned or not norm
        pruned = unbuilt_keys(before, self.vit.state_dict())
        if pruned and not self.pruned:
            self.register_load_state_dict_pre_hook(_drop_unbuilt)
        self.pruned = self.pruned or bool(pruned)
        return pruned

    # ------------------------------------------------------------ checkpoints

    def _format(self) -> CheckpointFormat:
        if self.checkpoint_format is None:
            raise CheckpointError(f"backbone {self.family} does not support loading checkpoint files")
        return self.checkpoint_format

    def _file_grid(self, pos: torch.Tensor) -> tuple[int, int] | None:
        """The square grid of a file's position embedding that `pos_embed_load_resize` accepts, or None."""
        model_pos = self.vit.pos_embed
        grid = tuple(self.vit.patch_embed.grid_size)
        prefix = model_pos.shape[1] - grid[0] * grid[1]
        if self.pos_embed_load_resize is None or pos.ndim != 3 or pos.shape[-1] != model_pos.shape[-1]:
            return None
        side = round((pos.shape[1] - prefix) ** 0.5)
        return (side, side) if side > 0 and side * side == pos.shape[1] - prefix else None

    def _check_geometry(self, sd: dict[str, torch.Tensor]) -> None:
        """Refuse files whose patch size or position grid differ (timm would silently resample them);
        a square grid is accepted for families whose own loader resizes it (`pos_embed_load_resize`)."""
        w = sd.get("patch_embed.proj.weight")
        want = self.vit.patch_embed.proj.weight
        if w is not None and w.ndim == 4 and tuple(w.shape[-2:]) != tuple(want.shape[-2:]):
            raise CheckpointError(
                f"the file has patch size {w.shape[-1]}, {self.family} {self.size} uses {want.shape[-1]}: "
                f"it looks like {describe_layout(sd)}; choose the matching model.backbone"
            )
        regs = next((sd[k] for k in ("register_tokens", "storage_tokens", "reg_token") if k in sd), None)
        n_file = regs.shape[1] if regs is not None and regs.ndim == 3 else 0
        model_reg = getattr(self.vit, "reg_token", None)
        n_model = model_reg.shape[1] if model_reg is not None else 0
        if n_file != n_model:
            raise CheckpointError(
                f"the file has {n_file} register tokens, {self.family} {self.size} has {n_model}: "
                f"it looks like {describe_layout(sd)}; check model.backbone and its options"
                + (f" (`registers: {str(n_file > 0).lower()}`)" if self.family == "dinov2" else "")
            )
        pos, model_pos = sd.get("pos_embed"), getattr(self.vit, "pos_embed", None)
        if pos is not None and model_pos is not None:
            n = model_pos.shape[1]
            allowed = {n, n + 1} if getattr(self.vit, "no_embed_class", False) else {n}
            if (pos.ndim != 3 or pos.shape[1] not in allowed) and self._file_grid(pos) is None:
                grid = self.vit.patch_embed.grid_size
                got = pos.shape[1] if pos.ndim == 3 else tuple(pos.shape)
                raise CheckpointError(
                    f"the file's position embedding has {got} entries; {self.family} {self.size} expects "
                    f"{n} ({grid[0]}x{grid[1]} grid): it looks like {describe_layout(sd)}; choose the "
                    "matching model.backbone / backbone_size"
                )

    def convert_state_dict(
        self, raw: dict, config: dict | None = None
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Checkpoint contents -> (timm-named state dict for `self.vit`, dropped file keys).

        `raw` is what `read_checkpoint` returns (a state dict or a training checkpoint dict), in
        the official, timm or (with its config.json contents as `config`, if any) Hugging Face
        layout. Pretraining-only keys (heads, decoders, mask tokens, ...) are dropped; the rest go
        through timm's own converter for the model's module. Nothing is loaded here, so the
        model can map these keys onto a peft-wrapped backbone itself.
        """
        sd, _ = state_dict_from(raw, self._format().containers)
        out, dropped, _, _, _ = self._convert_any(sd, config, "config")
        return out, dropped

    def _resize_pos_embed(self, sd: dict[str, torch.Tensor]) -> list[str]:
        """Resize a file's position embedding on another square grid as the family's loader does."""
        pos, model_pos = sd.get("pos_embed"), getattr(self.vit, "pos_embed", None)
        if pos is None or model_pos is None or pos.shape[1] in (model_pos.shape[1], model_pos.shape[1] + 1):
            return []
        old = self._file_grid(pos)
        grid = tuple(self.vit.patch_embed.grid_size)
        prefix = model_pos.shape[1] - grid[0] * grid[1]
        sd["pos_embed"] = resample_pos_embed(pos, grid, old, prefix, self.pos_embed_load_resize)
        how = {"plain": "bicubic, no antialias", "offset": "bicubic, +0.1 offset",
               "antialias": "antialiased bicubic"}[self.pos_embed_load_resize]
        return [f"position embedding resized from the file's {old[0]}x{old[1]} grid to {grid[0]}x{grid[1]} "
                f"({how}, as {self.family}'s own loader does)"]

    def _convert_noted(
        self, sd: dict[str, torch.Tensor], fmt: CheckpointFormat
    ) -> tuple[dict, list[str], list[str], list[str]]:
        # keys of modules a pruned backbone lacks leave before timm's converter, which would print an
        # error for each of DINOv3's q/v biases there (official, timm and converted Hugging Face files
        # all name them `blocks.<i>.` and `norm.`)
        pruned = unbuilt_keys(sd, self.vit.state_dict()) if self.pruned else []
        gone = set(pruned)
        sd = {k: v for k, v in sd.items() if k not in gone}
        drop = re.compile("|".join(f"(?:{p})" for p in fmt.drop)) if fmt.drop else None
        dropped = sorted(k for k in sd if drop and drop.match(k))
        self._check_geometry(sd)
        sd = dict(sd)
        notes = self._resize_pos_embed(sd)
        kept = {k: v for k, v in sd.items() if k not in dropped or k in fmt.converter_needs}
        try:
            out = dict(fmt.filter_fn(dict(kept), self.vit))
        except Exception as exc:  # timm's converters assume their own layout
            raise CheckpointError(
                f"timm's {fmt.family} converter cannot read this file ({type(exc).__name__}: {exc}); "
                f"it looks like {describe_layout(sd)}"
            ) from None
        if fmt.extra is not None:
            tensors, extra_notes = fmt.extra(sd, self.vit)
            out.update(tensors)
            notes = notes + extra_notes
        w = out.get("patch_embed.proj.weight")
        if w is not None and w.ndim == 4 and w.shape[1] != self.in_chans:
            try:
                out["patch_embed.proj.weight"] = adapt_input_conv(self.in_chans, w)
            except NotImplementedError:
                raise CheckpointError(
                    f"cannot adapt the file's {w.shape[1]}-channel patch embedding to "
                    f"in_chans={self.in_chans}"
                ) from None
        return out, dropped, notes, pruned

    def _target_keys(self) -> dict[str, str]:
        """timm key -> key in `self.vit.state_dict()`; peft wraps `qkv` as `qkv.base_layer` + adapters."""
        keys = {}
        for k in self.vit.state_dict():
            if ".lora_" in k or ".lora_magnitude_vector" in k:
                continue  # adapter weights: never in a pretrained file
            keys[k.replace(".base_layer.", ".")] = k
        return keys

    def _convert_any(
        self, sd: dict[str, torch.Tensor], config: dict | None, config_name: str
    ) -> tuple[dict, list[str], list[str], str, list[str]]:
        """Any layout the family reads -> (timm state dict, dropped file keys, notes, layout read, keys of
        modules a pruned backbone does not build, in the official layout).

        Hugging Face weights are checked against the backbone (config fields, else tensor shapes)
        and renamed to the official layout; from there every layout takes the same path.
        """
        fmt = self._format()
        model_type = hf_model_type(sd)
        if model_type is None:
            out, dropped, notes, pruned = self._convert_noted(sd, fmt)
            return out, dropped, notes, fmt.layout(sd), pruned
        if model_type not in fmt.hf_model_types:
            raise CheckpointError(
                f"{self.family} does not read this file: it holds {describe_layout(sd)}"
            )
        check_hf_config(self, sd, model_type, config, config_name)
        official, origin = hf_to_official(sd, model_type)
        out, dropped, notes, pruned = self._convert_noted(official, fmt)
        return out, sorted(origin[k] for k in dropped if k in origin), notes, \
            f"Hugging Face {ARCHITECTURES[model_type]}", pruned

    def prepare_checkpoint(
        self, path: str | Path, trust: bool = False, strict: bool = True
    ) -> tuple[dict[str, torch.Tensor], LoadReport]:
        """Read, convert and check a weight file or Hugging Face model folder without loading it.

        Returns (state dict keyed like `self.vit.state_dict()`, so peft-wrapped names included,
        report). Raises CheckpointError for unknown keys, shape mismatches, a Hugging Face config
        that does not match and (with `strict`) backbone keys the file lacks.
        """
        try:
            sd, source, config_path = read_weights(path, self._format().containers, trust=trust)
            config = None
            if config_path is not None and hf_model_type(sd):
                config, source = read_json(config_path, "", CheckpointError), f"{source} + config.json"
            elif hf_model_type(sd):
                source += ", no config.json: architecture read from the tensor shapes"
        except CheckpointError as exc:  # name the file once (reading errors already do)
            msg = str(exc)
            raise CheckpointError(msg if str(Path(path)) in msg else f"{path}: {msg}") from None
        return self.prepare_state_dict(sd, config=config, name=str(path), source=source, strict=strict)

    def prepare_state_dict(
        self, sd: dict[str, torch.Tensor], *, config: dict | None = None, name: str = "state dict",
        source: str = "state dict", strict: bool = True,
    ) -> tuple[dict[str, torch.Tensor], LoadReport]:
        """`prepare_checkpoint` for tensors already read (`sd`: a flat state dict in any layout the
        family reads; `config`: the contents of a Hugging Face config.json, if any)."""
        fmt = self._format()
        try:
            out, dropped, notes, layout, pruned = self._convert_any(sd, config, "config.json")
        except CheckpointError as exc:
            raise CheckpointError(f"{name}: {exc}") from None
        keys = self._target_keys()
        target = self.vit.state_dict()
        missing = sorted(k for k in keys if k not in out)
        unexpected = sorted(k for k in out if k not in keys)
        shapes = sorted(
            f"{k} {tuple(out[k].shape)} vs {tuple(target[keys[k]].shape)}"
            for k in out if k in keys and out[k].shape != target[keys[k]].shape
        )
        if unexpected or shapes or (missing and strict):
            problems = []
            if missing:
                problems.append(f"missing backbone keys ({len(missing)}): {', '.join(missing[:12])}"
                                + (" ..." if len(missing) > 12 else ""))
            if unexpected:
                problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:12])}"
                                + (" ..." if len(unexpected) > 12 else ""))
            if shapes:
                problems.append(f"shape mismatches: {'; '.join(shapes[:6])}")
            raise CheckpointError(
                f"{name} does not fit {self.family} {self.size}: " + "; ".join(problems)
                + f" (timm key names, read as {layout}). The file looks like {describe_layout(sd)}"
                + (f"; official {self.family} files: {fmt.files}" if fmt.files else "")
                + ". Check model.backbone, model.backbone_size and the backbone options."
            )
        report = LoadReport(name, source, loaded=sorted(out), dropped=dropped, missing=missing,
                            notes=notes, format=layout, pruned=pruned)
        return {keys[k]: v for k, v in out.items()}, report

    def load_checkpoint(self, path: str | Path, trust: bool = False, strict: bool = True) -> LoadReport:
        """Load an official weight file into `self.vit` exactly, or raise CheckpointError and change nothing.

        Accepts plain state dicts, {'model': ...}, {'teacher'|'student': ...} with `module.`
        / `backbone.` prefixes, .pth and .safetensors. Unknown keys are always an error;
        with `strict` (default) any backbone key the file lacks is an error listing them.
        Works before and after peft has wrapped modules of the backbone (adapters untouched).
        """
        state, report = self.prepare_checkpoint(path, trust=trust, strict=strict)
        self.vit.load_state_dict(state, strict=False)
        log.info(report.summary())
        return report


def _drop_unbuilt(module: Backbone, state_dict: dict, prefix: str, *_) -> None:
    """load_state_dict pre-hook of a pruned backbone: a state dict saved before pruning loads, its keys
    of the modules not built are skipped (they were never run, so nothing trained is lost)."""
    vit = f"{prefix}vit."
    dropped = unbuilt_keys([k for k in state_dict if k.startswith(vit)],
                           [vit + k for k in module.vit.state_dict()], vit)
    for k in dropped:
        del state_dict[k]
    if dropped:
        log.info("state dict: skipped %d keys of modules the pruned backbone does not run (%s)",
                 len(dropped), unbuilt_modules(dropped))


def check_size(sizes: dict, size: str, family: str) -> None:
    """Unknown sizes are a config error naming the known ones."""
    if size not in sizes:
        raise ConfigError(
            f"model.backbone_size {size!r} is not a size of {family}; choose one of {', '.join(sizes)}"
        )
