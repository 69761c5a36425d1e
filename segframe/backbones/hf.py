"""Hugging Face transformers-format DINOv2 / DINOv3 weights: Hub folders (config.json + model.safetensors).

`hf_weight_files` finds a folder's weight files, `hf_model_type` recognises the key layout of
`Dinov2Model`, `Dinov2WithRegistersModel` and `DINOv3ViTModel`, `check_hf_config` compares the
folder's config.json (read as JSON data only), or without one what the tensor shapes show, with
the backbone field by field, and `hf_to_official` renames the tensors to the official Meta key
layout (separate q, k, v concatenated into qkv). The family's timm converter then reads the result
like an official file, so the weights land in the same timm ViT. Nothing here executes code.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from segframe import files
from segframe.errors import CheckpointError

if TYPE_CHECKING:
    from segframe.backbones.base import Backbone

ARCHITECTURES = {"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel",
                 "dinov3_vit": "DINOv3ViTModel"}
# model_type -> what to set in the YAML to read it
BACKBONE_HINT = {"dinov2": "model.backbone: dinov2",
                 "dinov2_with_registers": "model.backbone: {name: dinov2, registers: true}",
                 "dinov3_vit": "model.backbone: dinov3"}
# a folder's weights, first found wins (pytorch_model.bin is read with weights_only, like any .bin)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")

_L = r"(?:encoder\.)?layer\.(\d+)\."  # DINOv2: encoder.layer.N., DINOv3: layer.N.
# HF name -> official Meta name (q/k/v are handled apart); DINOv3's MLP names depend on gating
RENAMES = {
    "dinov2": [
        (r"embeddings\.cls_token$", "cls_token"),
        (r"embeddings\.mask_token$", "mask_token"),
        (r"embeddings\.position_embeddings$", "pos_embed"),
        (r"embeddings\.register_tokens$", "register_tokens"),
        (r"embeddings\.patch_embeddings\.projection\.(weight|bias)$", r"patch_embed.proj.\1"),
        (_L + r"(norm1|norm2)\.(weight|bias)$", r"blocks.\1.\2.\3"),
        (_L + r"attention\.output\.dense\.(weight|bias)$", r"blocks.\1.attn.proj.\2"),
        (_L + r"layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
        (_L + r"mlp\.(fc1|fc2)\.(weight|bias)$", r"blocks.\1.mlp.\2.\3"),
        (_L + r"mlp\.weights_in\.(weight|bias)$", r"blocks.\1.mlp.w12.\2"),  # giant's fused SwiGLU
        (_L + r"mlp\.weights_out\.(weight|bias)$", r"blocks.\1.mlp.w3.\2"),
        (r"layernorm\.(weight|bias)$", r"norm.\1"),
    ],
    "dinov3_vit": [
        (r"embeddings\.cls_token$", "cls_token"),
        (r"embeddings\.mask_token$", "mask_token"),
        (r"embeddings\.register_tokens$", "storage_tokens"),
        (r"embeddings\.patch_embeddings\.(weight|bias)$", r"patch_embed.proj.\1"),
        (_L + r"(norm1|norm2)\.(weight|bias)$", r"blocks.\1.\2.\3"),
        (_L + r"attention\.o_proj\.(weight|bias)$", r"blocks.\1.attn.proj.\2"),
        (_L + r"layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
        # gated (S+, H+, 7B): down(act(gate(x)) * up(x)) = official w3(act(w1(x)) * w2(x))
        (_L + r"mlp\.gate_proj\.(weight|bias)$", r"blocks.\1.mlp.w1.\2"),
        (_L + r"mlp\.(up_proj|down_proj)\.(weight|bias)$", None),  # fc1/fc2, or w2/w3 when gated
        (r"norm\.(weight|bias)$", r"norm.\1"),
    ],
}
RENAMES["dinov2_with_registers"] = RENAMES["dinov2"]
MLP, MLP_GATED = {"up_proj": "fc1", "down_proj": "fc2"}, {"up_proj": "w2", "down_proj": "w3"}
QKV = {"dinov2": _L + r"attention\.attention\.(query|key|value)\.(weight|bias)$",
       "dinov3_vit": _L + r"attention\.(q|k|v)_proj\.(weight|bias)$"}
QKV["dinov2_with_registers"] = QKV["dinov2"]


def hf_model_type(keys: Any) -> str | None:
    """'dinov2', 'dinov2_with_registers' or 'dinov3_vit' when the keys are in that transformers layout."""
    keys = set(keys)
    if "embeddings.patch_embeddings.projection.weight" in keys or any(k.startswith("encoder.layer.")
                                                                       for k in keys):
        return "dinov2_with_registers" if "embeddings.register_tokens" in keys else "dinov2"
    if "embeddings.patch_embeddings.weight" in keys or any(re.match(r"layer\.\d+\.attention\.q_proj\.", k)
                                                           for k in keys):
        return "dinov3_vit"
    return None


def hf_weight_files(folder: Path) -> list[Path]:
    """The weight files of a Hugging Face model folder (one file, or the shards its index names)."""
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            return _shards(path) if name.endswith(".index.json") else [path]
    held = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing"
    raise CheckpointError(
        f"{folder} is a folder but not a Hugging Face model folder: it has no {', '.join(WEIGHT_FILES)} "
        f"(it holds: {held}); point model.checkpoint_path at a weight file, or at a folder downloaded "
        "from the Hugging Face Hub (config.json + model.safetensors)"
    )


def _shards(index: Path) -> list[Path]:
    data = files.read_json(index, "", CheckpointError)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, Mapping) or not weight_map:
        raise CheckpointError(f"{index} has no 'weight_map': not a safetensors shard index")
    shards = []
    for name in dict.fromkeys(map(str, weight_map.values())):
        path = index.parent / name
        if Path(name).name != name or not path.is_file():
            raise CheckpointError(f"{index} names shard {name!r}, which is not a file beside it")
        shards.append(path)
    return shards


# ---------------------------------------------------------------- config vs backbone

ORDER = ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size", "num_register_tokens",
         "layer_scale", "use_swiglu_ffn", "use_gated_mlp", "hidden_act", "layer_norm_eps", "rope_theta",
         "query_bias", "value_bias")  # the fields compared, in the order errors list them


def _depth(sd: Mapping[str, torch.Tensor]) -> int:
    layers = [int(m.group(1)) for k in sd if (m := re.match(_L, k))]
    return max(layers) + 1 if layers else 0


def file_geometry(sd: Mapping[str, torch.Tensor], model_type: str) -> dict[str, Any]:
    """What the tensors show of the architecture, in config.json's field names."""
    patch = next((sd[k] for k in ("embeddings.patch_embeddings.projection.weight",
                                  "embeddings.patch_embeddings.weight") if k in sd), None)
    regs = sd.get("embeddings.register_tokens")
    geo: dict[str, Any] = {
        "num_hidden_layers": _depth(sd),
        "num_register_tokens": int(regs.shape[1]) if regs is not None and regs.ndim == 3 else 0,
        "layer_scale": any(k.endswith("layer_scale1.lambda1") for k in sd),
    }
    if patch is not None and patch.ndim == 4:
        geo["hidden_size"], geo["patch_size"] = int(patch.shape[0]), int(patch.shape[-1])
    gated = any(".mlp.weights_in." in k or ".mlp.gate_proj." in k for k in sd)
    geo["use_swiglu_ffn" if model_type.startswith("dinov2") else "use_gated_mlp"] = gated
    if model_type == "dinov3_vit":
        geo["query_bias"] = any(k.endswith("attention.q_proj.bias") for k in sd)
        geo["value_bias"] = any(k.endswith("attention.v_proj.bias") for k in sd)
    return geo


def config_geometry(config: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    """The architecture fields of a config.json that the backbone must match."""
    fields = ["hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size", "layer_norm_eps"]
    fields += (["use_swiglu_ffn"] if model_type.startswith("dinov2")
               else ["use_gated_mlp", "rope_theta", "query_bias", "value_bias"])
    geo = {f: config[f] for f in fields if f in config}
    geo["num_register_tokens"] = config.get("num_register_tokens", 0)
    gated = geo.get("use_swiglu_ffn", geo.get("use_gated_mlp", False))
    if "hidden_act" in config and not (model_type.startswith("dinov2") and gated):  # DINOv2 SwiGLU: silu
        geo["hidden_act"] = config["hidden_act"]
    return geo


def model_geometry(vit: torch.nn.Module, depth: int) -> dict[str, Any]:
    """The same fields for a timm ViT (timm VisionTransformer for DINOv2, Eva for DINOv3) of `depth` blocks
    (its family's depth: a pruned ViT builds fewer)."""
    blk = vit.blocks[0]
    reg = getattr(vit, "reg_token", None)
    patch = vit.patch_embed.proj.weight
    gated = type(blk.mlp).__name__ in ("SwiGLU", "GluMlp")
    act = getattr(blk.mlp, "act", None)
    geo: dict[str, Any] = {
        "hidden_size": int(vit.embed_dim), "num_hidden_layers": depth,
        "num_attention_heads": int(blk.attn.num_heads), "patch_size": int(patch.shape[-1]),
        "num_register_tokens": int(reg.shape[1]) if reg is not None else 0,
        "layer_scale": getattr(blk, "gamma_1", None) is not None or not isinstance(
            getattr(blk, "ls1", torch.nn.Identity()), torch.nn.Identity),
        "layer_norm_eps": float(blk.norm1.eps),  # the final norm's too (it may be pruned)
        "use_swiglu_ffn": gated, "use_gated_mlp": gated,
        "hidden_act": {"GELU": "gelu", "SiLU": "silu"}.get(type(act).__name__, type(act).__name__),
    }
    rope = getattr(vit, "rope", None)
    if rope is not None:
        geo["rope_theta"] = float(rope.temperature)
        geo["query_bias"] = geo["value_bias"] = getattr(blk.attn, "q_bias", None) is not None
    return geo


def _same(a: Any, b: Any) -> bool:
    numbers = isinstance(a, (int, float)) and isinstance(b, (int, float))
    if isinstance(a, float) or isinstance(b, float):
        return numbers and math.isclose(a, b, rel_tol=1e-6)
    return a == b


def check_hf_config(
    backbone: Backbone, sd: Mapping[str, torch.Tensor], model_type: str,
    config: Mapping[str, Any] | None, config_name: str = "config.json",
) -> None:
    """Raise a CheckpointError naming every architecture field where the file and the backbone disagree.

    The fields come from `config` (the folder's config.json) where it has them, else from the
    tensor shapes (width, depth, patch, registers, layer scale, gating, DINOv3's q/v biases).
    """
    if config is not None:
        found = config.get("model_type")
        if found != model_type:
            raise CheckpointError(
                f"{config_name} has model_type {found!r} but the tensors are {ARCHITECTURES[model_type]}'s "
                f"({model_type!r}): the folder mixes two models; use the config.json of these weights"
            )
    file = file_geometry(sd, model_type)
    named = dict.fromkeys(file, "tensor shapes")
    if config is not None:
        given = config_geometry(config, model_type)
        file.update(given)
        named.update(dict.fromkeys(given, config_name))
    model = model_geometry(backbone.vit, backbone.num_layers)
    # a file without DINOv3's q/v biases fits a model with them (zero biases: the same function)
    lenient = {"query_bias", "value_bias"}
    wrong = [f"{k}: {named[k]} {file[k]}, {backbone.family} {backbone.size} {model[k]}"
             for k in sorted(file, key=ORDER.index) if k in model and not _same(file[k], model[k])
             and not (k in lenient and not file[k])]
    if not wrong:
        return
    hint = ""
    if backbone.family == "dinov2" and file.get("num_register_tokens", 0) != model["num_register_tokens"]:
        hint = f" (`registers: {str(bool(file['num_register_tokens'])).lower()}`)"
    shown = ", ".join(f"{k} {file[k]}" for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                   "patch_size", "num_register_tokens") if k in file)
    raise CheckpointError(
        f"the Hugging Face {ARCHITECTURES[model_type]} weights do not match "
        f"{backbone.family} {backbone.size}: " + "; ".join(wrong)
        + f". Choose the model.backbone_size and backbone options of the file{hint} (the file: {shown})"
    )


# ---------------------------------------------------------------- HF names -> official names

def hf_to_official(
    sd: Mapping[str, torch.Tensor], model_type: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Rename transformers tensors to the official Meta layout; returns (state dict, official -> file key).

    Separate q, k, v become one `attn.qkv`; a bias absent from the file (DINOv3 has no k bias) is
    zero, and a non-zero DINOv3 k bias is refused (the official model and timm fix it at 0). A key
    no rule knows is an error naming it.
    """
    rules = [(re.compile(p), r) for p, r in RENAMES[model_type]]
    qkv_rule = re.compile(QKV[model_type])
    gated = any(".mlp.gate_proj." in k for k in sd)
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    parts: dict[tuple[int, str], dict[str, str]] = {}
    unknown = []
    for key in sd:
        m = qkv_rule.match(key)
        if m:
            parts.setdefault((int(m.group(1)), m.group(3)), {})[m.group(2)[0]] = key  # q / k / v
            continue
        for rule, repl in rules:
            m = rule.match(key)
            if m:
                if repl is None:  # DINOv3 up_proj / down_proj
                    name = (MLP_GATED if gated else MLP)[m.group(2)]
                    new = f"blocks.{m.group(1)}.mlp.{name}.{m.group(3)}"
                else:
                    new = rule.sub(repl, key)
                out[new], origin[new] = sd[key], key
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"unknown keys for Hugging Face {ARCHITECTURES[model_type]} weights ({len(unknown)}): "
            f"{', '.join(sorted(unknown)[:12])}{' ...' if len(unknown) > 12 else ''}; only the bare model's "
            "weights are read (no task heads)"
        )
    for (i, kind), got in sorted(parts.items()):
        if kind == "weight":
            if set(got) != {"q", "k", "v"}:
                raise CheckpointError(
                    f"layer {i} of the Hugging Face weights has only the {'/'.join(sorted(got))} part of the "
                    f"attention projection (q, k and v are needed): {', '.join(got.values())}"
                )
            out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([sd[got[c]] for c in "qkv"], dim=0)
            continue
        k_bias = sd.get(got.get("k", ""))
        if model_type == "dinov3_vit" and k_bias is not None and not k_bias.is_meta and k_bias.any():
            raise CheckpointError(
                f"{got['k']} is not zero: DINOv3 has no key bias (the official model and timm fix it at 0), "
                "so these weights cannot be loaded exactly"
            )
        like = sd[next(iter(got.values()))]
        out[f"blocks.{i}.attn.qkv.bias"] = torch.cat(
            [sd[got[c]] if c in got else torch.zeros_like(like) for c in "qkv"])
    return out, origin
