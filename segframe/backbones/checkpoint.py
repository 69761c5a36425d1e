"""Reading backbone weight files safely and describing their key layout.

`read_checkpoint` opens .pth/.pt/.bin (torch.load with weights_only=True) and .safetensors
files; `read_weights` also takes a Hugging Face model folder (see `hf.py`); `state_dict_from`
picks the tensors out of a training checkpoint (`teacher`/`student`/`model`/...) and strips
DDP/DINO prefixes. Each family describes its official layout with a `CheckpointFormat`;
`Backbone.convert_state_dict` uses it. `describe_layout` names the layout a file looks like.
"""

from __future__ import annotations

import argparse
import pickle
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from segframe.backbones.hf import ARCHITECTURES, BACKBONE_HINT, hf_model_type, hf_weight_files
from segframe.errors import CheckpointError

TRUST_HINT = "set `model.trust_checkpoint: true` in the YAML only if you trust where the file comes from"
PREFIXES = ("module.", "backbone.", "_orig_mod.")  # DDP, DINO/iBOT multi-crop wrapper, torch.compile


@dataclass
class LoadReport:
    """What a load did: the layout read, timm keys loaded, file keys dropped, model keys left missing."""

    path: str
    source: str  # where in the file: "state dict", "'teacher'", "model.safetensors + config.json", ...
    loaded: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # conversions done, e.g. a resized position embedding
    format: str = ""  # the layout read: "official dinov3", "timm dinov3", "Hugging Face DINOv3ViTModel", ...
    pruned: list[str] = field(default_factory=list)  # file keys (official names) of modules not built

    def summary(self) -> str:
        """One line: layout, counts, and the dropped/missing keys grouped by pattern."""
        where = f"{self.format}, {self.source}" if self.format else self.source
        line = (f"checkpoint {self.path} ({where}): loaded {len(self.loaded)}, "
                f"dropped {len(self.dropped) + len(self.pruned)}, missing {len(self.missing)}")
        if self.notes:
            line += "; " + "; ".join(self.notes)
        if self.pruned:
            line += (f"; dropped {len(self.pruned)} keys of modules the model does not run "
                     f"({unbuilt_modules(self.pruned)})")
        if self.dropped:
            line += f"; dropped {group_keys(self.dropped)}"
        if self.missing:
            line += f"; missing (left at init) {group_keys(self.missing)}"
        return line


@dataclass(frozen=True)
class CheckpointFormat:
    """How one family's official files are laid out and turned into timm keys.

    `filter_fn` is timm's own converter for the model's module (`checkpoint_filter_fn`).
    `drop` are regexes (matched from the start of a key, after prefix stripping) of
    pretraining-only keys; `converter_needs` are dropped keys that timm's converter still
    uses to recognise the layout (it removes them itself). `extra(sd, vit)` returns (timm-named
    tensors that timm's converter skips on purpose, e.g. DINOv3's RoPE periods, notes for the
    report). `official_keys`: keys only the official files have (a file without any is reported as
    timm's layout). `hf_model_types`: the transformers layouts the family reads (see hf.py).
    """

    family: str
    filter_fn: Callable[[dict, torch.nn.Module], dict]
    containers: tuple[str, ...] = ("teacher", "student", "model", "state_dict", "module")
    drop: tuple[str, ...] = ()
    converter_needs: frozenset[str] = frozenset()
    extra: Callable[[dict[str, torch.Tensor], torch.nn.Module],
                    tuple[dict[str, torch.Tensor], list[str]]] | None = None
    files: str = ""  # official file names, for error messages
    official_keys: tuple[str, ...] = ()
    hf_model_types: tuple[str, ...] = ()

    def layout(self, sd: Mapping[str, Any]) -> str:
        """'official <family>' or, for a file without the official-only keys, 'timm <family>'."""
        timm = self.official_keys and not any(k in sd for k in self.official_keys)
        return f"{'timm' if timm else 'official'} {self.family}"


def group_keys(keys: list[str], limit: int = 6) -> str:
    """Keys grouped by pattern with block numbers folded: 'blocks.*.attn.qkv.bias_mask (12), mask_token'."""
    counts: dict[str, int] = {}
    for k in keys:
        pattern = re.sub(r"\.\d+(?=\.|$)", ".*", k)
        pattern = re.sub(r"^(decoder_\w+|dino_head|ibot_head|head)\..*", r"\1.*", pattern)
        counts[pattern] = counts.get(pattern, 0) + 1
    parts = [f"{p} ({n})" if n > 1 else p for p, n in counts.items()]
    more = f", ... ({len(parts) - limit} more patterns)" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more


def unbuilt_keys(keys: Iterable[str], built: Collection[str], prefix: str = "") -> list[str]:
    """The keys of `keys` for ViT modules a pruned backbone does not build (see `Backbone.prune`).

    `built` are the model's state-dict keys and `prefix` is where its ViT's keys start (`""` for
    timm's keys, `backbone.vit.` in a ViTSegModel): keys of blocks after the last block in `built`,
    and of the final norm when `built` has none. Nothing is returned for a model without blocks.
    """
    key, built = re.compile(re.escape(prefix) + r"(?:blocks\.(\d+)|(norm))\."), set(built)
    built_blocks = [int(m[1]) for k in built if (m := key.match(k)) and m[1] is not None]
    if not built_blocks:
        return []
    depth, has_norm = max(built_blocks) + 1, any(k.startswith(f"{prefix}norm.") for k in built)
    return [k for k in keys if k not in built and (m := key.match(k))
            and (int(m[1]) >= depth if m[1] is not None else not has_norm)]


def unbuilt_modules(keys: Collection[str]) -> str:
    """'blocks 6..11, final norm' for the keys `unbuilt_keys` returned."""
    blocks = sorted({int(m[1]) for k in keys if (m := re.search(r"(?:^|\.)blocks\.(\d+)\.", k))})
    parts = []
    if blocks:
        parts.append(f"blocks {blocks[0]}..{blocks[-1]}" if len(blocks) > 1 else f"block {blocks[0]}")
    if any(re.search(r"(?:^|vit\.)norm\.", k) for k in keys):
        parts.append("final norm")
    return ", ".join(parts)


def _weights_only_reason(exc: Exception) -> str:
    for line in str(exc).splitlines():
        if "unsupported" in line.lower():
            return line.strip().removeprefix("WeightsUnpickler error:").strip()
    return str(exc).splitlines()[0][:200]


def read_checkpoint(path: str | Path, trust: bool = False) -> Mapping[str, Any]:
    """The top-level mapping stored in `path` (.safetensors, or a torch.save file).

    torch files are read with weights_only=True (argparse.Namespace, which DINO-style
    training checkpoints store as `args`, is allowed: it holds plain values). A file that
    needs arbitrary unpickling is refused unless `trust` is true.
    """
    p = Path(path)
    if not str(path):
        raise CheckpointError("no checkpoint path given: set model.checkpoint_path")
    if not p.is_file():
        raise CheckpointError(f"checkpoint file {p} does not exist: check model.checkpoint_path")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {p} as safetensors (truncated or corrupt?): {exc}") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise CheckpointError(f"cannot read {p}: truncated or not a PyTorch checkpoint ({exc})") from None
        if not trust:
            raise CheckpointError(
                f"{p} stores Python objects that need full unpickling ({_weights_only_reason(exc)}), "
                f"which can run arbitrary code; {TRUST_HINT}, or re-save its state dict with torch.save()"
            ) from None
        try:
            obj = torch.load(p, map_location="cpu", weights_only=False)
        except Exception as exc2:  # trusted but unreadable
            raise CheckpointError(f"cannot read {p}: {type(exc2).__name__}: {exc2}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"cannot read {p}: truncated or not a PyTorch checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else 'empty file'})"
        ) from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{p} holds a {type(obj).__name__}, not a state dict or checkpoint dict")
    return obj


def _tensors(obj: Any) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        return {}
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def state_dict_from(
    obj: Mapping[str, Any], containers: tuple[str, ...]
) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of the first container present (e.g. 'teacher'), prefixes stripped.

    Returns (state dict, where it came from). A plain state dict is returned as is.
    """
    for name in containers:
        if isinstance(obj.get(name), Mapping) and _tensors(obj[name]):
            sd, source = _tensors(obj[name]), f"'{name}'"
            break
    else:
        sd, source = _tensors(obj), "state dict"
    if not sd:
        keys = ", ".join(list(map(str, obj))[:8])
        raise CheckpointError(
            f"no tensors found (top-level keys: {keys}); expected a state dict or one of "
            f"{', '.join(repr(c) for c in containers)}"
        )
    return {strip_prefixes(k): v for k, v in sd.items()}, source


def read_weights(
    path: str | Path, containers: tuple[str, ...], trust: bool = False
) -> tuple[dict[str, torch.Tensor], str, Path | None]:
    """(tensors, where they came from, the config.json beside them or None) of a file or HF model folder.

    A folder is read as a Hugging Face model folder (model.safetensors, its shard index, or
    pytorch_model.bin); a file as `read_checkpoint` + `state_dict_from`. The config.json is only
    located here: it is read, as JSON, when the tensors turn out to be in a transformers layout.
    """
    p = Path(path)
    if str(path) and p.is_dir():
        files = hf_weight_files(p)
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            part, _ = state_dict_from(read_checkpoint(f, trust=trust), containers)
            sd.update(part)
        source = files[0].name if len(files) == 1 else f"{len(files)} safetensors shards"
    else:
        sd, source = state_dict_from(read_checkpoint(p, trust=trust), containers)
        p = p.parent
    config = p / "config.json"
    return sd, source, config if config.is_file() else None


def strip_prefixes(key: str) -> str:
    """'module.backbone.blocks.0...' -> 'blocks.0...'; also unchunks DINOv2 'blocks.<chunk>.<i>.' keys."""
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    # DINOv2 training checkpoints with block_chunks > 0 store blocks.<chunk>.<global index>.
    return re.sub(r"^blocks\.\d+\.(\d+)\.(norm1|attn|ls1|norm2|mlp|ls2)", r"blocks.\1.\2", key)


def describe_layout(sd: Mapping[str, Any]) -> str:
    """Which layout the file looks like and, where known, what to set to read it (for error messages)."""
    keys = set(sd)
    model_type = hf_model_type(keys)
    if model_type:
        return (f"Hugging Face transformers {ARCHITECTURES[model_type]} weights; read them with "
                f"{BACKBONE_HINT[model_type]} and the backbone_size of the file")
    if "storage_tokens" in keys or "rope_embed.periods" in keys:
        return "an official DINOv3 checkpoint (storage_tokens, RoPE); read it with model.backbone: dinov3"
    registers = "; read it with model.backbone: {name: dinov2, registers: true}"
    if "reg_token" in keys and "pos_embed" not in keys and any(".gamma_1" in k for k in keys):
        return "a timm DINOv3 state dict (reg_token, blocks.*.gamma_1); read it with model.backbone: dinov3"
    if any(k.startswith("decoder_") for k in keys):
        return "an MAE checkpoint (decoder_* keys), e.g. RETFound-MAE"
    if "register_tokens" in keys:
        return "an official DINOv2 checkpoint with registers" + registers
    if "reg_token" in keys and "pos_embed" in keys:
        return "a timm DINOv2 state dict with registers" + registers
    if "pos_embed" in keys and any(".ls1.gamma" in k for k in keys):
        return "a DINOv2-style checkpoint (layer scale, learned position embedding)"
    if "masked_embed" in keys or any(k.startswith("head.last_layer") for k in keys):
        return "an iBOT-style checkpoint (VisionFM)"
    if "pos_embed" in keys:
        return "a plain ViT checkpoint without layer scale (e.g. RETFound-MAE, VisionFM)"
    return ("not a ViT checkpoint known here: segframe reads the official DINOv3, DINOv2, RETFound and "
            "VisionFM files, timm state dicts of these models, and Hugging Face DINOv2/DINOv3 model folders")
