"""Official checkpoint files of every family: written in the official key layout, loaded exactly.

Each family's writer below is the inverse of timm's converter: it turns a timm model's state
dict into the key names the official repositories save. `test_writer_inverts_timm_converter`
checks every writer against timm's own loading path (create_model(pretrained=True,
pretrained_cfg_overlay=dict(state_dict=...))), so the round trips are not circular.
"""

from __future__ import annotations

import argparse
import os

import pytest
import timm
import torch
from safetensors.torch import save_file

from segframe.backbones import dinov2, dinov3, retfound, visionfm
from segframe.backbones.base import Backbone
from segframe.backbones.checkpoint import LoadReport, read_checkpoint
from segframe.errors import CheckpointError, SegframeError

D = 64  # tiny width


def randomize(backbone: Backbone, seed: int) -> Backbone:
    """Random weights everywhere (timm's init leaves biases 0 and layer scale 1e-5: too weak a test)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in backbone.vit.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            p.copy_(noise + 1.0 if "norm" in name and name.endswith("weight") else noise)
        rope = getattr(backbone.vit, "rope", None)
        if rope is not None:
            rope.periods.mul_(1.25)  # not timm's computed periods: only an exact copy reproduces them
    return backbone.eval()


def feats(backbone: Backbone, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return backbone.features(x)


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------- official-format writers

def official_dinov3(vit, sat: bool = False) -> dict[str, torch.Tensor]:
    """timm EVA (DINOv3) -> the key layout of facebookresearch/dinov3 checkpoints."""
    sd = vit.state_dict()
    swiglu = any(".mlp.fc1_g." in k for k in sd)
    out = {}
    for k, v in sd.items():
        if k == "reg_token":
            out["storage_tokens"] = v
        elif k == "rope.periods":
            out["rope_embed.periods"] = v
        elif k.endswith(".attn.q_bias"):
            pre = k[: -len("q_bias")]
            # qkv.bias has a k part that the official model multiplies by bias_mask (= 0) ...
            out[pre + "qkv.bias"] = torch.cat([v, torch.randn_like(v), sd[pre + "v_bias"]])
            ones, zeros = torch.ones_like(v), torch.zeros_like(v)
            out[pre + "qkv.bias_mask"] = torch.cat([ones, zeros, ones])
        elif k.endswith(".attn.v_bias"):
            continue
        else:
            k = k.replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")
            if swiglu:
                k = k.replace(".mlp.fc1_g.", ".mlp.w1.").replace(".mlp.fc1_x.", ".mlp.w2.")
                k = k.replace(".mlp.fc2.", ".mlp.w3.")
            out[k] = v
    out["mask_token"] = torch.randn(1, vit.embed_dim)
    if sat:  # L-SAT and 7B: norm of local crops' cls/storage tokens, pretraining only
        out["local_cls_norm.weight"] = torch.randn(vit.embed_dim)
        out["local_cls_norm.bias"] = torch.randn(vit.embed_dim)
    return out


def official_dinov2(vit) -> dict[str, torch.Tensor]:
    """timm DINOv2 ViT -> facebookresearch/dinov2 keys (register_tokens, cls entry in pos_embed, w12/w3)."""
    sd = dict(vit.state_dict())
    out = {}
    if "reg_token" in sd:
        # official: pos_embed has a cls entry; timm (no_embed_class) folds it into cls_token
        pos0 = torch.randn(1, 1, vit.embed_dim)
        out["register_tokens"] = sd.pop("reg_token")
        out["cls_token"] = sd.pop("cls_token") - pos0
        out["pos_embed"] = torch.cat([pos0, sd.pop("pos_embed")], dim=1)
    packed_swiglu = type(vit.blocks[0].mlp).__name__ == "GluMlp"  # giant: official w12 (x1|x2) and w3
    for k, v in sd.items():
        out[k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.") if packed_swiglu else k] = v
    out["mask_token"] = torch.randn(1, vit.embed_dim)
    return out


def mae_extras(dim: int = 32) -> dict[str, torch.Tensor]:
    """What MAE pretraining stores beside the encoder (RETFound-MAE files)."""
    return {
        "mask_token": torch.randn(1, 1, dim),
        "decoder_embed.weight": torch.randn(dim, D), "decoder_embed.bias": torch.randn(dim),
        "decoder_pos_embed": torch.randn(1, 197, dim),
        "decoder_blocks.0.norm1.weight": torch.randn(dim),
        "decoder_blocks.0.attn.qkv.weight": torch.randn(3 * dim, dim),
        "decoder_norm.weight": torch.randn(dim), "decoder_pred.weight": torch.randn(16 * 16 * 3, dim),
    }


def dino_heads(prefix: str = "") -> dict[str, torch.Tensor]:
    return {
        f"{prefix}dino_head.mlp.0.weight": torch.randn(32, D),
        f"{prefix}dino_head.last_layer.weight_g": torch.randn(8, 1),
        f"{prefix}ibot_head.mlp.0.weight": torch.randn(32, D),
    }


def ibot_head(prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}head.mlp.0.weight": torch.randn(32, D), f"{prefix}head.mlp.0.bias": torch.randn(32),
            f"{prefix}head.last_layer.weight_g": torch.randn(8, 1),
            f"{prefix}head.last_layer.weight_v": torch.randn(8, 32)}


def write_dinov3(writer: Backbone, sat: bool = False) -> dict:
    return official_dinov3(writer.vit, sat=sat)


def write_dinov2(writer: Backbone) -> dict:
    return official_dinov2(writer.vit)


def write_retfound_mae(writer: Backbone) -> dict:
    model = {**writer.vit.state_dict(), **mae_extras()}
    args = argparse.Namespace(model="mae_vit_large_patch16", mask_ratio=0.75)
    return {"model": model, "epoch": 799, "args": args}


def write_retfound_dinov2(writer: Backbone) -> dict:
    teacher = {f"backbone.{k}": v for k, v in official_dinov2(writer.vit).items()}
    return {"teacher": {**teacher, **dino_heads()}, "iteration": 1000}


def write_visionfm(writer: Backbone, student: Backbone) -> dict:
    """iBOT training checkpoint; the student differs from the teacher so the test sees which is loaded."""
    teacher = {f"backbone.{k}": v for k, v in writer.vit.state_dict().items()}
    stud = {f"module.backbone.{k}": v for k, v in student.vit.state_dict().items()}
    stud["module.backbone.masked_embed"] = torch.randn(1, D)
    return {"teacher": {**teacher, **ibot_head("")}, "student": {**stud, **ibot_head("module.")},
            "optimizer": {"state": {}, "param_groups": []}, "epoch": 400,
            "args": argparse.Namespace(arch="vit_base", patch_size=16, modality="Fundus")}


# (id, build(), writer(backbone) -> file contents, timm name + overrides, BACKBONES.md recipe for timm)
def _strip(sd, drop=()):
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("module.").removeprefix("backbone.")
        if not any(k.startswith(d) for d in drop):
            out[k] = v
    return out


CASES = {
    "dinov3": (lambda: dinov3.build("tiny", dinov3.DinoV3Params()), write_dinov3,
               ("vit_small_patch16_dinov3_qkvb", {}), lambda f: f),
    "dinov3_sat": (lambda: dinov3.build("tiny", dinov3.DinoV3Params(weights="sat493m")),
                   lambda b: write_dinov3(b, sat=True), ("vit_small_patch16_dinov3_qkvb", {}), lambda f: f),
    "dinov2": (lambda: dinov2.build("tiny", dinov2.DinoV2Params()), write_dinov2,
               ("vit_small_patch14_dinov2", {}), lambda f: f),
    "dinov2_reg4": (lambda: dinov2.build("tiny", dinov2.DinoV2Params(registers=True)), write_dinov2,
                    ("vit_small_patch14_reg4_dinov2", {}), lambda f: f),
    "retfound_mae": (lambda: retfound.build("tiny", retfound.RetFoundParams()), write_retfound_mae,
                     ("vit_large_patch16_224", {}), lambda f: _strip(f["model"], ("decoder", "mask_token"))),
    "retfound_dinov2": (lambda: retfound.build("tiny", retfound.RetFoundParams(variant="dinov2")),
                        write_retfound_dinov2, ("vit_small_patch14_dinov2", {}),
                        lambda f: _strip(f["teacher"], ("dino_head", "ibot_head"))),
    "visionfm": (lambda: visionfm.build("tiny", visionfm.VisionFMParams()), None,
                 ("vit_base_patch16_224", {}), lambda f: _strip(f["teacher"], ("head.", "masked_embed"))),
}
TINY = {"embed_dim": D, "depth": 4, "num_heads": 2}


def make_file(case: str, seed: int = 0) -> tuple[Backbone, dict]:
    build, write, _, _ = CASES[case]
    writer = randomize(build(), seed)
    contents = write_visionfm(writer, randomize(build(), seed + 100)) if case == "visionfm" else write(writer)
    return writer, contents


@pytest.mark.parametrize("case", list(CASES))
def test_writer_inverts_timm_converter(case):
    """timm's own loading path turns each official-format file back into the writer's weights."""
    _, _, (name, over), recipe = CASES[case]
    writer, contents = make_file(case)
    ref = timm.create_model(name, pretrained=True, num_classes=0, dynamic_img_size=True,
                            pretrained_cfg_overlay=dict(state_dict=recipe(contents)), **TINY, **over)
    want = writer.vit.state_dict()
    got = ref.state_dict()
    assert set(got) == set(want) - {"rope.periods"}  # timm recomputes the periods (not persistent there)
    for k in got:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=k)


@pytest.mark.parametrize("case", list(CASES))
def test_official_file_loads_exactly(case, tmp_path):
    writer, contents = make_file(case)
    path = tmp_path / "official.pth"
    torch.save(contents, path)
    loaded = CASES[case][0]()
    report = loaded.load_checkpoint(path)
    assert isinstance(report, LoadReport) and not report.missing
    assert sorted(report.loaded) == sorted(writer.vit.state_dict())
    p = writer.patch_size
    x = torch.randn(2, 3, 3 * p, 5 * p)
    assert max_diff(feats(loaded.eval(), x), feats(writer, x)) < 1e-5
    # dropped keys are the pretraining-only ones, and the summary says so on one line
    line = report.summary()
    assert "\n" not in line and f"loaded {len(report.loaded)}" in line and "missing 0" in line
    assert report.dropped


def test_dropped_keys_per_family(tmp_path):
    expected = {
        "dinov3_sat": {"mask_token", "local_cls_norm.weight", "local_cls_norm.bias",
                       *(f"blocks.{i}.attn.qkv.bias_mask" for i in range(4))},
        "retfound_mae": {"mask_token", *(k for k in mae_extras() if k.startswith("decoder"))},
        "retfound_dinov2": {"mask_token", *dino_heads()},
        "visionfm": set(ibot_head("")),  # teacher: the iBOT head, never the classifier it resembles
    }
    for case, want in expected.items():
        _, contents = make_file(case)
        loaded = CASES[case][0]()
        _, dropped = loaded.convert_state_dict(contents)
        assert set(dropped) == want, case


def test_dinov3_rope_periods_copied_exactly(tmp_path):
    writer, contents = make_file("dinov3")
    contents["rope_embed.periods"] = contents["rope_embed.periods"].bfloat16()  # as stored by pretraining
    torch.save(contents, tmp_path / "f.pth")
    loaded = CASES["dinov3"][0]()
    loaded.load_checkpoint(tmp_path / "f.pth")
    periods = loaded.vit.rope.periods
    assert periods.dtype == torch.float32
    assert torch.equal(periods, writer.vit.rope.periods.bfloat16().float())
    fresh = dinov3.build("tiny", dinov3.DinoV3Params()).vit.rope.periods
    assert not torch.allclose(periods, fresh)  # timm's own value would have been different


def test_visionfm_uses_teacher_and_student_fallback(tmp_path):
    writer, contents = make_file("visionfm")
    student = contents.pop("teacher") and contents  # only the student left
    torch.save(student, tmp_path / "s.pth")
    loaded = CASES["visionfm"][0]()
    report = loaded.load_checkpoint(tmp_path / "s.pth")
    assert report.source == "'student'" and "module.backbone.masked_embed" not in report.loaded
    assert "masked_embed" in report.dropped


def test_safetensors_and_flat_state_dict(tmp_path):
    writer, contents = make_file("dinov2")
    save_file({k: v.contiguous() for k, v in contents.items()}, tmp_path / "f.safetensors")
    loaded = CASES["dinov2"][0]()
    loaded.load_checkpoint(tmp_path / "f.safetensors")
    x = torch.randn(1, 3, 28, 42)
    assert max_diff(feats(loaded.eval(), x), feats(writer, x)) < 1e-5


def test_dinov3_swiglu_and_7b_layouts(tmp_path):
    """small_plus/huge_plus (SwiGLU w1/w2/w3) and 7b (no qkv bias) tiny stand-ins, through the same loader."""
    for name in ("vit_small_plus_patch16_dinov3_qkvb", "vit_7b_patch16_dinov3"):
        def build(name=name):
            vit = timm.create_model(name, pretrained=False, num_classes=0, **TINY)
            for blk in vit.blocks:
                blk.attn.qkv_bias_separate = True
            vit.rope.register_buffer("periods", vit.rope.periods, persistent=True)
            return Backbone(vit, family="dinov3", size="tiny", patch_size=16, checkpoint_format=dinov3.FORMAT)
        writer = randomize(build(), 1)
        contents = official_dinov3(writer.vit, sat=True)
        assert any(".mlp.w3." in k for k in contents)
        torch.save(contents, tmp_path / "f.pth")
        loaded = build()
        loaded.load_checkpoint(tmp_path / "f.pth")
        x = torch.randn(1, 3, 32, 48)
        assert max_diff(feats(loaded.eval(), x), feats(writer, x)) < 1e-5, name


def test_dinov2_giant_swiglu_layout(tmp_path):
    """giant's fused SwiGLU (mlp.w12 / mlp.w3 in the official file), on a tiny stand-in."""
    def build():
        vit = timm.create_model("vit_giant_patch14_dinov2", pretrained=False, num_classes=0,
                                dynamic_img_size=True, mlp_ratio=4, **TINY)
        return Backbone(vit, family="dinov2", size="tiny", patch_size=14, checkpoint_format=dinov2.FORMAT)
    writer = randomize(build(), 2)
    contents = official_dinov2(writer.vit)
    assert "blocks.0.mlp.w12.weight" in contents and "blocks.0.mlp.fc1.weight" not in contents
    torch.save(contents, tmp_path / "g.pth")
    loaded = build()
    loaded.load_checkpoint(tmp_path / "g.pth")
    x = torch.randn(1, 3, 28, 42)
    assert max_diff(feats(loaded.eval(), x), feats(writer, x)) < 1e-5


def test_chunked_dinov2_training_checkpoint(tmp_path):
    """DINOv2 training with block_chunks=2 saves blocks.<chunk>.<global index>.*; they are unchunked."""
    writer, contents = make_file("retfound_dinov2")
    teacher = {}
    for k, v in contents["teacher"].items():
        if k.startswith("backbone.blocks."):
            i = int(k.split(".")[2])
            k = k.replace(f"backbone.blocks.{i}.", f"backbone.blocks.{i // 2}.{i}.")
        teacher[k] = v
    assert "backbone.blocks.1.3.norm1.weight" in teacher
    torch.save({"teacher": teacher}, tmp_path / "chunked.pth")
    loaded = CASES["retfound_dinov2"][0]()
    loaded.load_checkpoint(tmp_path / "chunked.pth")
    x = torch.randn(1, 3, 28, 42)
    assert max_diff(feats(loaded.eval(), x), feats(writer, x)) < 1e-5


def test_gray_input_adapts_patch_embedding(tmp_path):
    """A 3-channel file into in_chans=1: timm's adapt_input_conv sums the RGB filters."""
    writer, contents = make_file("dinov2")
    torch.save(contents, tmp_path / "f.pth")
    gray = dinov2.build("tiny", dinov2.DinoV2Params(), in_chans=1)
    gray.load_checkpoint(tmp_path / "f.pth")
    w3 = writer.vit.patch_embed.proj.weight
    torch.testing.assert_close(gray.vit.patch_embed.proj.weight, w3.sum(dim=1, keepdim=True))
    x = torch.rand(1, 1, 28, 42)
    assert max_diff(feats(gray.eval(), x), feats(writer, x.expand(-1, 3, -1, -1))) < 1e-5


# ---------------------------------------------------------------- errors: clear, and nothing changes

def _snapshot(b: Backbone) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in b.vit.state_dict().items()}


def _unchanged(b: Backbone, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in b.vit.state_dict().items())


def test_wrong_family_file(tmp_path):
    _, contents = make_file("dinov2")
    torch.save(contents, tmp_path / "dinov2.pth")
    target = dinov3.build("tiny", dinov3.DinoV3Params())
    before = _snapshot(target)
    with pytest.raises(CheckpointError, match="DINOv2") as exc:
        target.load_checkpoint(tmp_path / "dinov2.pth")
    assert "dinov2.pth" in str(exc.value)
    assert _unchanged(target, before)


def test_same_patch_wrong_family(tmp_path):
    """A DINOv3 file into VisionFM (both patch 16)."""
    _, contents = make_file("dinov3")
    torch.save(contents, tmp_path / "d3.pth")
    target = visionfm.build("tiny", visionfm.VisionFMParams())
    before = _snapshot(target)
    with pytest.raises(CheckpointError, match=r"4 register tokens, visionfm tiny has 0.*DINOv3"):
        target.load_checkpoint(tmp_path / "d3.pth")
    assert _unchanged(target, before)


def test_missing_backbone_keys_listed(tmp_path):
    _, contents = make_file("retfound_mae")
    del contents["model"]["blocks.3.norm2.weight"], contents["model"]["norm.bias"]
    torch.save(contents, tmp_path / "f.pth")
    target = retfound.build("tiny", retfound.RetFoundParams())
    before = _snapshot(target)
    listed = r"missing backbone keys \(2\): blocks.3.norm2.weight, norm.bias"
    with pytest.raises(CheckpointError, match=listed):
        target.load_checkpoint(tmp_path / "f.pth")
    assert _unchanged(target, before)
    report = target.load_checkpoint(tmp_path / "f.pth", strict=False)
    assert report.missing == ["blocks.3.norm2.weight", "norm.bias"] and "missing 2" in report.summary()
    contents["model"]["blocks.0.attn.extra.weight"] = torch.zeros(2)  # unknown keys: never silently dropped
    torch.save(contents, tmp_path / "g.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): blocks.0.attn.extra.weight"):
        target.load_checkpoint(tmp_path / "g.pth", strict=False)


def test_wrong_size_and_registers(tmp_path):
    _, contents = make_file("dinov2_reg4")
    torch.save(contents, tmp_path / "reg.pth")
    target = dinov2.build("tiny", dinov2.DinoV2Params(registers=False))
    with pytest.raises(CheckpointError, match="4 register tokens.*has 0.*registers: true"):
        target.load_checkpoint(tmp_path / "reg.pth")
    _, contents = make_file("dinov2")
    torch.save(contents, tmp_path / "plain.pth")
    target = dinov2.build("tiny", dinov2.DinoV2Params(registers=True))
    with pytest.raises(CheckpointError, match="0 register tokens.*has 4.*registers: false"):
        target.load_checkpoint(tmp_path / "plain.pth")


def test_truncated_file(tmp_path):
    _, contents = make_file("dinov2")
    torch.save(contents, tmp_path / "f.pth")
    data = (tmp_path / "f.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\"")
    target = dinov2.build("tiny", dinov2.DinoV2Params())
    before = _snapshot(target)
    for name in ("cut.pth", "cut.safetensors"):
        with pytest.raises(CheckpointError, match="truncated"):
            target.load_checkpoint(tmp_path / name)
    assert _unchanged(target, before)


def test_missing_file(tmp_path):
    target = dinov2.build("tiny", dinov2.DinoV2Params())
    with pytest.raises(CheckpointError, match="does not exist.*model.checkpoint_path"):
        target.load_checkpoint(tmp_path / "nope.pth")


class _Payload:
    """Unpickling this runs os.mkdir: what a malicious checkpoint could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_pickled_object_refused_unless_trusted(tmp_path):
    _, contents = make_file("dinov2")
    marker = tmp_path / "code_ran"
    torch.save({"model": contents, "extra": _Payload(marker)}, tmp_path / "evil.pth")
    target = dinov2.build("tiny", dinov2.DinoV2Params())
    before = _snapshot(target)
    with pytest.raises(CheckpointError, match=r"model\.trust_checkpoint: true") as exc:
        target.load_checkpoint(tmp_path / "evil.pth")
    assert "mkdir" in str(exc.value)
    assert not marker.exists() and _unchanged(target, before)
    target.load_checkpoint(tmp_path / "evil.pth", trust=True)  # the user vouches for it
    assert marker.exists()


def test_namespace_args_need_no_trust(tmp_path):
    _, contents = make_file("retfound_mae")
    torch.save(contents, tmp_path / "f.pth")
    assert isinstance(read_checkpoint(tmp_path / "f.pth")["args"], argparse.Namespace)


def test_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    torch.save({"epoch": 3}, tmp_path / "empty.pth")
    target = dinov2.build("tiny", dinov2.DinoV2Params())
    with pytest.raises(CheckpointError, match="not a state dict"):
        target.load_checkpoint(tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="no tensors found"):
        target.load_checkpoint(tmp_path / "empty.pth")
    assert issubclass(CheckpointError, SegframeError)


def test_load_into_lora_wrapped_backbone(tmp_path):
    """peft renames qkv.weight -> qkv.base_layer.weight; loading still fills it and leaves adapters alone."""
    from peft import LoraConfig, inject_adapter_in_model

    writer, contents = make_file("dinov3")
    torch.save(contents, tmp_path / "f.pth")
    target = CASES["dinov3"][0]()
    inject_adapter_in_model(LoraConfig(r=2, target_modules=r".*blocks\.\d+\.attn\.qkv"), target)
    lora_b = [p for n, p in target.named_parameters() if "lora_B" in n]
    with torch.no_grad():
        for p in lora_b:
            p.fill_(0.3)
    report = target.load_checkpoint(tmp_path / "f.pth")
    assert "blocks.0.attn.qkv.weight" in report.loaded and not report.missing
    qkv = target.vit.blocks[0].attn.qkv
    torch.testing.assert_close(qkv.base_layer.weight, writer.vit.blocks[0].attn.qkv.weight)
    assert all(bool((p == 0.3).all()) for p in lora_b)  # adapters untouched
    with torch.no_grad():
        for p in lora_b:
            p.zero_()
    x = torch.randn(1, 3, 32, 48)
    assert max_diff(feats(target.eval(), x), feats(writer, x)) < 1e-5
