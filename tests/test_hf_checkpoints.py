"""Hugging Face transformers-format and timm-format DINOv2 / DINOv3 weights, checked against those libraries.

Each transformers model (Dinov2Model, Dinov2WithRegistersModel, DINOv3ViTModel) is built offline
from a small config with random weights and saved with `save_pretrained`; segframe loads the folder
into its timm backbone and must reproduce transformers' own outputs. timm-format DINOv3 state dicts
are checked against timm's own model the same way. Every released size's key layout is checked on
the meta device (no weights allocated), with the architectures transformers builds from the Hub's
config values.
"""

from __future__ import annotations

import json
import shutil

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from test_checkpoints import official_dinov3
from transformers import (
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    DINOv3ViTConfig,
    DINOv3ViTModel,
)

try:  # transformers 5 renames modules in memory and back on save_pretrained; 4.x keeps the Hub names
    from transformers.core_model_loading import revert_weight_conversion
except ImportError:
    def revert_weight_conversion(model, state_dict):
        return state_dict

from segframe.backbones import dinov2, dinov3, visionfm
from segframe.backbones.base import Backbone, set_pos_embed_resize
from segframe.errors import CheckpointError

TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2)
TIMM_TINY = dict(embed_dim=64, depth=4, num_heads=2)


def stand_in(name: str, family: str, patch: int, **over) -> Backbone:
    """A tiny backbone on another released architecture (SwiGLU giant / 7B) built as the family builds it."""
    vit = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True, **TIMM_TINY, **over)
    fmt = dinov3.FORMAT if family == "dinov3" else dinov2.FORMAT
    if family == "dinov3":
        for blk in vit.blocks:
            blk.attn.qkv_bias_separate = True
        vit.rope.register_buffer("periods", vit.rope.periods, persistent=True)
    return Backbone(vit, family=family, size="tiny", patch_size=patch, checkpoint_format=fmt)


# case -> (transformers config, model class, segframe backbone, pos-embed resize transformers uses)
# Dinov2Model (transformers 5.x) resizes the position embedding with plain bicubic to the new grid;
# segframe's default follows the official DINOv2 code (+0.1 offset), so the parity run switches to
# transformers' resize. The registers model resizes with antialias, which is segframe's default.
CASES = {
    "dinov2": (Dinov2Config(**TINY, image_size=518, patch_size=14), Dinov2Model,
               lambda: dinov2.build("tiny", dinov2.DinoV2Params()), "plain"),
    "dinov2_registers": (Dinov2WithRegistersConfig(**TINY, image_size=518, patch_size=14,
                                                   num_register_tokens=4), Dinov2WithRegistersModel,
                         lambda: dinov2.build("tiny", dinov2.DinoV2Params(registers=True)), None),
    # giant's fused SwiGLU: transformers' hidden (int(64*3*2/3)+7)//8*8 = 128 = timm's GluMlp 256 / 2
    "dinov2_swiglu": (Dinov2Config(**TINY, image_size=518, patch_size=14, use_swiglu_ffn=True, mlp_ratio=3),
                      Dinov2Model, lambda: stand_in("vit_giant_patch14_dinov2", "dinov2", 14, mlp_ratio=4),
                      "plain"),
    "dinov3": (DINOv3ViTConfig(**TINY, intermediate_size=256, num_register_tokens=4), DINOv3ViTModel,
               lambda: dinov3.build("tiny", dinov3.DinoV3Params()), None),
    # 7B-like: gated MLP (silu), no q/k/v bias
    "dinov3_gated": (DINOv3ViTConfig(**TINY, intermediate_size=128, num_register_tokens=4, use_gated_mlp=True,
                                     hidden_act="silu", query_bias=False, value_bias=False),
                     DINOv3ViTModel, lambda: stand_in("vit_7b_patch16_dinov3", "dinov3", 16), None),
}


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (inits leave biases 0 and layer scale constant: too weak a test)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            p.copy_(noise + 1.0 if "norm" in name and name.endswith("weight") else noise)
    return module.eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """case -> (save_pretrained folder, the transformers model), written once for the module."""
    out = {}
    for case, (config, model_cls, _, _) in CASES.items():
        model = randomize(model_cls(config))
        folder = tmp_path_factory.mktemp(case)
        model.save_pretrained(folder)
        out[case] = (folder, model)
    return out


def normalised(b: Backbone, h: int, w: int, seed: int = 0) -> torch.Tensor:
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))
    return (x - torch.tensor(b.mean).view(1, 3, 1, 1)) / torch.tensor(b.std).view(1, 3, 1, 1)


def differences(b: Backbone, hf: torch.nn.Module, x: torch.Tensor, blocks: bool = True) -> dict[str, float]:
    """Max abs differences to transformers: last hidden state, its patch and prefix tokens, and (with
    `blocks`) every block's un-normed output (transformers' hidden_states[i + 1])."""
    with torch.no_grad():
        out = hf(pixel_values=x, output_hidden_states=blocks)
        last = b.num_layers - 1
        (patches,), (prefix,) = b.features(x, layers=[last], norm=True, prefix_tokens=True)
        if blocks:
            feats, feats_prefix = b.features(x, layers=list(range(b.num_layers)), norm=False,
                                             prefix_tokens=True)
    n = b.num_prefix_tokens
    patches = patches.flatten(2).transpose(1, 2)
    ref = out.last_hidden_state
    diff = {
        "last_hidden_state": (torch.cat([prefix, patches], 1) - ref).abs().max().item(),
        "patch_tokens": (patches - ref[:, n:]).abs().max().item(),
        "prefix_tokens": (prefix - ref[:, :n]).abs().max().item(),
    }
    for i, (f, p) in enumerate(zip(feats, feats_prefix, strict=True) if blocks else []):
        ours = torch.cat([p, f.flatten(2).transpose(1, 2)], 1)
        diff[f"block {i}"] = (ours - out.hidden_states[i + 1]).abs().max().item()
    return diff


@pytest.mark.parametrize("case", list(CASES))
def test_hf_folder_matches_transformers(case, folders):
    folder, hf = folders[case]
    config, model_cls, build, resize = CASES[case]
    b = build()
    report = b.load_checkpoint(folder)
    assert report.format == f"Hugging Face {model_cls.__name__}"
    assert report.source == "model.safetensors + config.json"
    assert not report.missing and report.dropped == ["embeddings.mask_token"]
    assert f"(Hugging Face {model_cls.__name__}, model.safetensors + config.json): loaded" in report.summary()
    b.eval()
    if resize:
        set_pos_embed_resize(b.vit, resize)
    p = b.patch_size
    native = config.image_size
    # native: no resize anywhere; odd: a non-square grid, resized; every block compared there
    for h, w, blocks in ((native, native, False), (5 * p, 7 * p, True)):
        diff = differences(b, hf, normalised(b, h, w), blocks)
        assert max(diff.values()) < 1e-4, (h, w, diff)


def test_dinov2_default_resize_is_the_official_codes_not_transformers(folders):
    """The default backbone resizes the position embedding as the official DINOv2 code does (+0.1
    offset), which transformers 5.x does not: at other sizes than 518 their features differ (the parity
    test above is apples to apples only with transformers' resize)."""
    folder, hf = folders["dinov2"]
    b = dinov2.build("tiny", dinov2.DinoV2Params())
    b.load_checkpoint(folder)
    assert differences(b.eval(), hf, normalised(b, 70, 98), blocks=False)["last_hidden_state"] > 1e-3


def test_safetensors_alone_reads_the_architecture_from_shapes(folders, tmp_path):
    folder, hf = folders["dinov3"]
    shutil.copy(folder / "model.safetensors", tmp_path / "weights.safetensors")
    b = dinov3.build("tiny", dinov3.DinoV3Params())
    report = b.load_checkpoint(tmp_path / "weights.safetensors")
    assert "no config.json: architecture read from the tensor shapes" in report.source
    assert max(differences(b.eval(), hf, normalised(b, 48, 80)).values()) < 1e-4
    # a config.json beside the file is used (heads are not visible in the shapes)
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_attention_heads": 4}))
    with pytest.raises(CheckpointError, match=r"num_attention_heads: config.json 4, dinov3 tiny 2"):
        dinov3.build("tiny", dinov3.DinoV3Params()).load_checkpoint(tmp_path / "weights.safetensors")
    with torch.device("meta"):
        small = dinov3.build("small", dinov3.DinoV3Params())
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"hidden_size: tensor shapes 64, dinov3 small 384; "
                                              r"num_hidden_layers: tensor shapes 4, dinov3 small 12"):
        small.load_checkpoint(tmp_path / "weights.safetensors")


def test_sharded_folder_loads_the_same(folders, tmp_path):
    folder, hf = folders["dinov3"]
    hf.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    sharded, single = dinov3.build("tiny", dinov3.DinoV3Params()), dinov3.build("tiny", dinov3.DinoV3Params())
    report = sharded.load_checkpoint(tmp_path)
    single.load_checkpoint(folder)
    assert "safetensors shards + config.json" in report.source and not report.missing
    assert all(torch.equal(v, single.vit.state_dict()[k]) for k, v in sharded.vit.state_dict().items())


def test_config_that_does_not_match_names_fields(folders):
    with torch.device("meta"):
        base = dinov3.build("base", dinov3.DinoV3Params())
    with pytest.raises(CheckpointError) as exc:
        base.load_checkpoint(folders["dinov3"][0])
    msg = str(exc.value)
    assert "hidden_size: config.json 64, dinov3 base 768" in msg
    assert "num_attention_heads: config.json 2, dinov3 base 12" in msg
    assert "Choose the model.backbone_size" in msg and "\n" not in msg
    with pytest.raises(CheckpointError, match=r"num_register_tokens: config.json 0, dinov2 tiny 4.*"
                                              r"registers: false"):
        dinov2.build("tiny", dinov2.DinoV2Params(registers=True)).load_checkpoint(folders["dinov2"][0])
    with pytest.raises(CheckpointError, match=r"num_register_tokens: config.json 4, dinov2 tiny 0.*"
                                              r"registers: true"):
        dinov2.build("tiny", dinov2.DinoV2Params()).load_checkpoint(folders["dinov2_registers"][0])
    with pytest.raises(CheckpointError, match=r"use_gated_mlp: config.json True, dinov3 tiny False"):
        dinov3.build("tiny", dinov3.DinoV3Params()).load_checkpoint(folders["dinov3_gated"][0])


def _snapshot(b: Backbone) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in b.vit.state_dict().items()}


def _edited_copy(folder, tmp_path, name, edit=None, config=None):
    target = tmp_path / name
    shutil.copytree(folder, target)
    if edit is not None:
        sd = load_file(target / "model.safetensors")
        edit(sd)
        save_file(sd, target / "model.safetensors")
    if config is not None:
        (target / "config.json").write_text(config)
    return target


def test_bad_input_is_one_clear_error_and_changes_nothing(folders, tmp_path):
    folder = folders["dinov3"][0]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("not weights")
    bad = {
        "notes": (tmp_path / "notes",
                  r"not a Hugging Face model folder.*README.md.*config.json \+ model.safetensors"),
        "missing": (_edited_copy(folder, tmp_path, "missing", lambda sd: sd.pop("layer.2.norm2.weight")),
                    r"missing backbone keys \(1\): blocks.2.norm2.weight"),
        "unknown": (_edited_copy(folder, tmp_path, "unknown",
                                 lambda sd: sd.update({"classifier.weight": torch.zeros(3, 64)})),
                    r"unknown keys for Hugging Face DINOv3ViTModel weights \(1\): classifier.weight"),
        "no_key": (_edited_copy(folder, tmp_path, "no_key",
                                lambda sd: sd.pop("layer.1.attention.k_proj.weight")),
                   r"layer 1 of the Hugging Face weights has only the q/v part"),
        "json": (_edited_copy(folder, tmp_path, "json", config="{not json"), r"config.json is not readable"),
        "type": (_edited_copy(folder, tmp_path, "type", config=json.dumps({"model_type": "vit"})),
                 r"model_type 'vit' but the tensors are DINOv3ViTModel's"),
    }
    b = dinov3.build("tiny", dinov3.DinoV3Params())
    before = _snapshot(b)
    for name, (path, pattern) in bad.items():
        with pytest.raises(CheckpointError, match=pattern) as exc:
            b.load_checkpoint(path)
        assert str(path) in str(exc.value) and "\n" not in str(exc.value), name
    assert all(torch.equal(v, before[k]) for k, v in b.vit.state_dict().items())


def test_dinov3_key_bias_must_be_zero(tmp_path):
    hf = randomize(DINOv3ViTModel(DINOv3ViTConfig(**TINY, intermediate_size=256, num_register_tokens=4,
                                                   key_bias=True)))
    k_biases = {name: p for name, p in hf.named_parameters() if name.endswith("attention.k_proj.bias")}
    with torch.no_grad():
        for p in k_biases.values():
            p.zero_()
    hf.save_pretrained(tmp_path / "zero")
    b = dinov3.build("tiny", dinov3.DinoV3Params())
    b.load_checkpoint(tmp_path / "zero")
    assert max(differences(b.eval(), hf, normalised(b, 32, 48)).values()) < 1e-4
    with torch.no_grad():
        next(p for name, p in k_biases.items() if "layer.2." in name).fill_(0.1)
    hf.save_pretrained(tmp_path / "nonzero")
    with pytest.raises(CheckpointError, match=r"layer.2.attention.k_proj.bias is not zero: "
                                              r"DINOv3 has no key bias"):
        b.load_checkpoint(tmp_path / "nonzero")


def test_file_in_another_layout_names_it(folders, tmp_path):
    with pytest.raises(CheckpointError, match=r"dinov2 does not read this file: it holds Hugging Face "
                                              r"transformers DINOv3ViTModel weights; read them with "
                                              r"model.backbone: dinov3"):
        dinov2.build("tiny", dinov2.DinoV2Params()).load_checkpoint(folders["dinov3"][0])
    with pytest.raises(CheckpointError, match=r"Dinov2WithRegistersModel weights; read them with "
                                              r"model.backbone: \{name: dinov2, registers: true\}"):
        visionfm.build("tiny", visionfm.VisionFMParams()).load_checkpoint(folders["dinov2_registers"][0])
    timm_d3 = timm.create_model("vit_small_patch16_dinov3_qkvb", num_classes=0, **TIMM_TINY)
    torch.save(timm_d3.state_dict(), tmp_path / "timm.pth")
    with pytest.raises(CheckpointError, match=r"patch size 16.*timm DINOv3 state dict.*"
                                              r"model.backbone: dinov3"):
        dinov2.build("tiny", dinov2.DinoV2Params()).load_checkpoint(tmp_path / "timm.pth")
    save_file({"encoder.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match=r"not a ViT checkpoint known here.*Hugging Face DINOv2/DINOv3"):
        dinov3.build("tiny", dinov3.DinoV3Params()).load_checkpoint(tmp_path / "other.safetensors")


# ---------------------------------------------------------------- timm-format DINOv3

@pytest.mark.parametrize("name", ["vit_small_patch16_dinov3", "vit_small_patch16_dinov3_qkvb"])
def test_timm_dinov3_state_dict_matches_timm(name, tmp_path):
    """timm's own model saves no RoPE periods (recomputed in float32), and its plain variant no q/v bias."""
    ref = randomize(timm.create_model(name, num_classes=0, dynamic_img_size=True, **TIMM_TINY))
    assert "rope.periods" not in ref.state_dict()
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    b = dinov3.build("tiny", dinov3.DinoV3Params())
    report = b.load_checkpoint(tmp_path / "timm.pth")
    assert report.format == "timm dinov3" and not report.missing
    assert dinov3.PERIODS_NOTE in report.notes and "recomputed in float32" in report.summary()
    assert (dinov3.ZERO_BIAS_NOTE in report.notes) == (not name.endswith("_qkvb"))
    x = normalised(b, 48, 80)
    with torch.no_grad():
        want = ref.forward_intermediates(x, indices=[1, 3], norm=True, output_fmt="NCHW",
                                         intermediates_only=True)
        got = b.eval().features(x, layers=[1, 3])
    assert max((g - w).abs().max().item() for g, w in zip(got, want, strict=True)) < 1e-4


def test_recomputed_periods_differ_from_the_official_files_bf16_values(tmp_path):
    """The same weights as an official file (periods stored rounded to bfloat16) and as timm's state dict
    (periods recomputed in float32): the periods differ by the bf16 rounding only, the features slightly."""
    ref = randomize(timm.create_model("vit_small_patch16_dinov3_qkvb", num_classes=0, **TIMM_TINY))
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    official = official_dinov3(ref)
    official["rope_embed.periods"] = ref.rope.periods.bfloat16()  # as the official release stores them
    torch.save(official, tmp_path / "official.pth")
    from_timm, from_official = (dinov3.build("tiny", dinov3.DinoV3Params()) for _ in range(2))
    assert from_official.load_checkpoint(tmp_path / "official.pth").format == "official dinov3"
    from_timm.load_checkpoint(tmp_path / "timm.pth")
    fp32, bf16 = from_timm.vit.rope.periods, from_official.vit.rope.periods
    assert torch.equal(fp32, ref.rope.periods)  # timm's own float32 values
    relative = ((fp32 - bf16) / fp32).abs()
    assert relative.max() > 0 and relative.max() <= 2 ** -9  # bf16 round-to-nearest: at most half of 2^-8
    x = normalised(from_timm, 48, 80)
    with torch.no_grad():
        diff = (from_timm.eval().features(x)[-1] - from_official.eval().features(x)[-1]).abs().max().item()
    assert 1e-6 < diff < 0.05, diff


# ---------------------------------------------------------------- every released size, on the meta device

# (family, size, options, transformers config) with the Hub configs' architecture values
# (facebook/dinov2-*, facebook/dinov2-with-registers-*, facebook/dinov3-vit*-pretrain-lvd1689m).
D2 = dict(image_size=518, patch_size=14, mlp_ratio=4, layer_norm_eps=1e-6)
D2_SIZES = {"small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16), "giant": (1536, 40, 24)}
D3 = dict(patch_size=16, num_register_tokens=4, layer_norm_eps=1e-5, rope_theta=100.0, key_bias=False)
D3_SIZES = {  # size -> hidden, layers, heads, intermediate, gated (silu), q/v bias
    "small": (384, 12, 6, 1536, False, True), "small_plus": (384, 12, 6, 1536, True, True),
    "base": (768, 12, 12, 3072, False, True), "large": (1024, 24, 16, 4096, False, True),
    "huge_plus": (1280, 32, 20, 5120, True, True), "7b": (4096, 40, 32, 8192, True, False),
}
REAL = [("dinov2", size, {"registers": regs},
         (Dinov2WithRegistersConfig if regs else Dinov2Config)(
             hidden_size=h, num_hidden_layers=n, num_attention_heads=a, use_swiglu_ffn=size == "giant", **D2,
             **({"num_register_tokens": 4} if regs else {})))
        for size, (h, n, a) in D2_SIZES.items() for regs in (False, True)]
REAL += [("dinov3", size, {}, DINOv3ViTConfig(
    hidden_size=h, num_hidden_layers=n, num_attention_heads=a, intermediate_size=i, use_gated_mlp=g,
    hidden_act="silu" if g else "gelu", query_bias=qv, value_bias=qv, **D3))
    for size, (h, n, a, i, g, qv) in D3_SIZES.items()]
MODELS = {"dinov2": Dinov2Model, "dinov2_with_registers": Dinov2WithRegistersModel,
          "dinov3_vit": DINOv3ViTModel}


@pytest.mark.parametrize("family,size,opts,config", REAL,
                         ids=[f"{f}-{s}{'-reg' if o.get('registers') else ''}" for f, s, o, _ in REAL])
def test_every_released_size_maps_completely(family, size, opts, config):
    """The Hub key names (transformers' save layout) of each released size map onto the backbone: every
    backbone key filled, no key unknown, every shape right; nothing allocated."""
    with torch.device("meta"):
        hf = MODELS[config.model_type](config)
        b = (dinov2 if family == "dinov2" else dinov3).build(
            size, (dinov2.DinoV2Params if family == "dinov2" else dinov3.DinoV3Params)(**opts))
    sd = revert_weight_conversion(hf, hf.state_dict())  # what save_pretrained writes
    hub_names = ("encoder.layer.0.attention.attention.query", "layer.0.attention.q_proj")
    assert any(k.startswith(hub_names) for k in sd)
    state, report = b.prepare_state_dict(sd, config=config.to_dict())
    assert set(state) == set(b.vit.state_dict()) and not report.missing
    assert set(report.dropped) == {"embeddings.mask_token"}
