"""The detail path (`model.detail`): every backbone x decoder x neck, the path is live (output depends
on it, every parameter gets a gradient, removing it changes the result, a zero path is exactly the
bilinear upsampling of the head's logits), the conv units per stage against nnU-Net's StackedConvBlocks,
fractional head strides, 1/3/N channels, LoRA and a frozen backbone, gradient checkpointing, DDP,
config errors, the plans round trip, and a short training on 1-px lines that the detail path recovers
and the upsampler alone does not."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from ddp import starting_model, train_ddp
from pydantic import BaseModel, ConfigDict
from test_model import dead_parameters, without_graph_gradient
from torch import nn

from segframe import DecoderSpec, hookimpl
from segframe.config import DetailConfig, dump_config, load_config, validate_config
from segframe.detail import DetailPath
from segframe.errors import ConfigError
from segframe.model import ViTSegModel
from segframe.plugins import get_registry
from segframe.upsample import BilinearUpsampler

REGISTRY = get_registry()
BACKBONES = list(REGISTRY.backbones())
DECODERS = list(REGISTRY.decoders())
DETAIL = {"enabled": True, "channels": [8, 8, 16, 16]}


def decoder_section(name: str) -> dict:
    params = REGISTRY.decoder(name).spec.params.model_fields
    return {"name": name, **({"hidden_size": 32} if "hidden_size" in params else {})}


def build(backbone="dinov3", decoder="upernet", in_channels=3, num_classes=2, seed=0, lora=None, **model):
    torch.manual_seed(seed)
    model.setdefault("detail", DETAIL)
    cfg = tiny_config(backbone, decoder_section(decoder) if isinstance(decoder, str) else decoder, **model)
    if lora:
        cfg["lora"] = lora
    return ViTSegModel(validate_config(cfg), in_channels=in_channels, num_classes=num_classes)


def owns_loss(name: str) -> bool:
    return callable(getattr(build(decoder=name, detail={"enabled": False}).decoder, "training_loss", None))


DENSE_DECODERS = [d for d in DECODERS if not owns_loss(d)]


MATRIX = sorted({("dinov2", d) for d in DENSE_DECODERS} | {(b, "upernet") for b in BACKBONES})


@pytest.mark.parametrize("neck", ["identity", "pyramid"])
@pytest.mark.parametrize(("backbone", "decoder"), MATRIX)
def test_every_backbone_and_decoder_with_both_necks(backbone, decoder, neck):
    """Shape, finite, every trainable parameter (the detail path's included) is in the training graph
    and moves the eval logits, for odd sizes down to 1x1; no upsampler is built. Every decoder on
    patch 14 (strides that divide nothing), every backbone on UperNet; a neck the decoder itself
    refuses is skipped."""
    try:
        model = build(backbone, decoder, neck=neck, num_classes=3).train()
    except ConfigError as exc:
        if "model.neck" not in str(exc):
            raise
        pytest.skip(f"{decoder} refuses neck {neck}")
    assert model.upsampler is None and isinstance(model.detail, DetailPath)
    x = torch.rand(2, 3, 20, 33)
    out = model(x)
    assert out.shape == (2, 3, 20, 33) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert not without_graph_gradient(model)
    assert not dead_parameters(model, x)
    assert any(n.startswith("detail.") for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for size in [(1, 1), (17, 5)]:
            odd = model(torch.rand(1, 3, *size))
            assert odd.shape == (1, 3, *size) and torch.isfinite(odd).all()


def test_zero_path_is_bilinear_head_logits_and_removing_it_changes_the_result():
    model = build("dinov2", neck="pyramid").eval()  # head stride 3.5: not a divisor of anything
    x = torch.rand(2, 3, 30, 45)
    with torch.no_grad():
        out = model(x)
        padded = model.pad(model._normalize(x))
        head = model.decoder(model._head_inputs(padded))
        bilinear = F.interpolate(head, size=padded.shape[-2:], mode="bilinear", align_corners=False)
        bilinear = bilinear[..., :30, :45]
        assert not torch.allclose(out, bilinear, atol=1e-4)  # the path adds something
        # removing it (the model as it would be with a bilinear upsampler) changes the result
        removed = copy.deepcopy(model)
        removed.detail, removed.upsampler = None, BilinearUpsampler()
        torch.testing.assert_close(removed(x), bilinear)
        # with the last conv at zero the path contributes nothing: exactly head + bilinear
        model.detail.out.weight.zero_()
        torch.testing.assert_close(model(x), bilinear)


def test_output_depends_on_every_part_of_the_path():
    model = build().eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        for name in ["encoder.0.0.0.weight", "encoder.3.1.0.weight", "decoder.3.0.0.weight",
                     "decoder.0.1.0.weight"]:
            changed = copy.deepcopy(model)
            weight = changed.detail.get_parameter(name)  # not a rescale: the norm after it undoes that
            weight.add_(0.1 * weight.std() * torch.randn_like(weight))
            assert not torch.allclose(changed(x), ref, atol=1e-6), name


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _FineHead(nn.Module):
    """Logits at 16 px per token: stride 0.875 on a patch-14 backbone (larger than the image)."""

    def __init__(self, channels: int, patch: int, k: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, k, 1)
        self.output_stride = patch / 16

    def forward(self, inputs):
        return F.interpolate(self.conv(inputs.features[-1]), scale_factor=16, mode="bilinear")


class _LossHead(_FineHead):
    def training_loss(self, outputs, target, ignore_index):
        return outputs.mean()


def _plugin(name, head):
    class Plugin:
        @hookimpl
        def segframe_decoders(self):
            return [DecoderSpec(name=name, description="test head", params=_Params, contract=2,
                                build=lambda p, c, s, k, ctx: head(c[-1], ctx.patch_size, k))]
    return Plugin()


def test_fractional_head_stride_below_one(registry):
    registry.register(_plugin("finehead", _FineHead), "finehead")
    model = ViTSegModel(tiny_config("dinov2", {"name": "finehead"}, detail=DETAIL), num_classes=2).train()
    assert model.decoder.output_stride == 0.875
    x = torch.rand(2, 3, 30, 20)
    out = model(x)
    assert out.shape == (2, 2, 30, 20)
    out.square().mean().backward()
    assert not without_graph_gradient(model)
    assert not dead_parameters(model, x)


def test_refused_for_a_head_that_owns_its_loss_and_with_an_upsampler(registry):
    registry.register(_plugin("losshead", _LossHead), "losshead")
    with pytest.raises(ConfigError, match=r"model\.detail: .*losshead.*owns its training loss"):
        ViTSegModel(tiny_config("dinov2", {"name": "losshead"}, detail={"enabled": True}), num_classes=2)
    ViTSegModel(tiny_config("dinov2", {"name": "losshead"}), num_classes=2)  # fine without it
    with pytest.raises(ConfigError, match=r"model\.upsampler: bilinear and model\.detail\.enabled"):
        build(upsampler="bilinear")


@pytest.mark.parametrize(("detail", "match"), [
    ({"enabled": True, "channels": [8, 8, 16]}, r"model\.detail\.channels"),
    ({"enabled": True, "channels": [8, 0, 8, 8]}, r"model\.detail\.channels\.1: .*greater than or equal"),
    ({"enabled": True, "norm": "layer"}, r"model\.detail\.norm"),
    ({"enabled": True, "units": [1, 2, 2]}, r"model\.detail\.units"),
    ({"enabled": True, "units": [0, 2, 2, 2]}, r"model\.detail\.units\.0: .*greater than or equal"),
    ({"enable": True}, r"model\.detail\.enable: unknown key"),
])
def test_bad_detail_config_is_a_clear_error(detail, match):
    with pytest.raises(ConfigError, match=match):
        validate_config(tiny_config(detail=detail))


@pytest.mark.parametrize("units", [[1, 2, 2, 2], [3, 1, 2, 1]])
def test_units_per_stage_compute_nnunets_stacked_conv_blocks(units):
    """`model.detail.units`: each encoder and decoder stage is nnU-Net's StackedConvBlocks with that
    many conv units (dynamic_network_architectures as the reference, the same weights copied in),
    and the model with fewer units still trains every parameter."""
    from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks

    model = build(detail={**DETAIL, "units": units}).train()
    path = model.detail
    for stages in (path.encoder, path.decoder):
        for i, stage in enumerate(stages):
            conv = stage[0][0]
            ref = StackedConvBlocks(units[i], nn.Conv2d, conv.in_channels, conv.out_channels, 3,
                                    conv.stride, norm_op=nn.InstanceNorm2d, norm_op_kwargs={"affine": True},
                                    nonlin=nn.LeakyReLU, nonlin_kwargs={"negative_slope": 0.01})
            ours = list(stage.parameters())
            theirs = list(ref.parameters())
            assert [p.shape for p in ours] == [p.shape for p in theirs]
            with torch.no_grad():
                for a, b in zip(ours, theirs, strict=True):
                    b.copy_(a + 0.1 * torch.randn_like(a) * (a.ndim == 1))  # norm affines off 1/0
                    a.copy_(b)
            x = torch.rand(2, conv.in_channels, 13, 10)
            torch.testing.assert_close(stage(x), ref(x))
    x = torch.rand(2, 3, 24, 40)
    model(x).mean().backward()
    assert not without_graph_gradient(model)
    assert not dead_parameters(model, x)


@pytest.mark.parametrize(("in_channels", "first"), [(1, 3), (3, 3), (5, 5)])
def test_channels(in_channels, first):
    model = build(in_channels=in_channels).train()
    assert model.detail.encoder[0][0][0].in_channels == first
    x = torch.rand(2, in_channels, 24, 40)
    out = model(x)
    assert out.shape == (2, 2, 24, 40)
    out.mean().backward()
    assert not without_graph_gradient(model)
    assert not dead_parameters(model, x)


@pytest.mark.parametrize("mode", ["frozen", "lora"])
def test_frozen_backbone_and_lora_still_train_the_path(mode):
    lora = {"enabled": True, "r": 2} if mode == "lora" else None
    model = build(freeze_backbone=mode == "frozen", lora=lora)
    model.train()(torch.rand(2, 3, 32, 32)).square().mean().backward()
    detail = dict(model.detail.named_parameters())
    assert all(p.requires_grad and p.grad.abs().sum() > 0 for p in detail.values())
    base = [p for n, p in model.backbone.named_parameters() if "lora_" not in n]
    assert not any(p.requires_grad for p in base)
    assert model.parameter_counts()["detail"] == (sum(p.numel() for p in detail.values()),) * 2
    names = {n for g in model.param_groups(1e-3, 0.05) for n in g["names"]}
    assert {f"detail.{n}" for n in detail} <= names


def test_grad_checkpointing_recomputes_the_path_with_the_same_gradients():
    ref = build(neck="pyramid").train()
    ckpt = build(neck="pyramid", grad_checkpointing=True).train()
    ckpt.load_state_dict(ref.state_dict())
    assert ckpt.detail.checkpointing and not ref.detail.checkpointing
    calls = []
    ckpt.detail.encoder[0].register_forward_pre_hook(lambda *a: calls.append(1))
    x = torch.rand(2, 3, 32, 32)
    ref(x).square().mean().backward()
    ckpt(x).square().mean().backward()
    assert len(calls) == 2  # forward, and again in backward
    grads = dict(ref.named_parameters())
    for n, p in ckpt.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n].grad, rtol=1e-4, atol=1e-6, msg=n)


def test_config_round_trip_and_plans(tmp_path):
    """The detail section survives YAML and the plans; nnU-Net's build (as at inference) rebuilds
    the same module tree."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from segframe.nnunet.plans import make_plans
    from segframe.nnunet.trainer import nnUNetTrainerSegframe

    cfg = validate_config(tiny_config("dinov3", decoder_section("segformer"),
                                      detail={"enabled": True, "channels": [4, 8, 8, 12], "norm": "group"}))
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
    base = {"plans_name": "nnUNetPlans", "dataset_name": "Dataset001_X", "configurations": {"2d": {
        "patch_size": [64, 64], "batch_size": 2, "data_identifier": "nnUNetPlans_2d",
        "architecture": {"network_class_name": "x", "arch_kwargs": {}, "_kw_requires_import": []}}}}
    plans, _ = make_plans(base, "2d", cfg, "nnUNetPlans_segframe_x", 16)
    manager = PlansManager(plans)
    net = nnUNetTrainerSegframe.build_network_architecture(manager, manager.get_configuration("2d"), 3, 2)
    assert net.config.model.detail == cfg.model.detail
    assert net.detail.out.in_channels == 4 and isinstance(net.detail.encoder[0][0][1], nn.GroupNorm)
    torch.manual_seed(0)
    assert net.state_dict().keys() == ViTSegModel(cfg, 3, 2).state_dict().keys()


def test_ddp_two_cpu_processes(tmp_path):
    """The detail path trains in DDP beside a frozen backbone with LoRA (tests/ddp.py)."""
    cfg = tiny_config("dinov3", decoder_section("upernet"), neck="pyramid", freeze_backbone=True,
                      detail=DETAIL)
    case = {"config": {**cfg, "lora": {"enabled": True, "r": 2}}}
    ranks = [rank["detail"] for rank in train_ddp({"detail": case}, tmp_path)]
    initial = dict(starting_model(case).named_parameters())
    detail = [n for n in ranks[0] if n.startswith("detail.")]
    assert detail
    for name in detail:
        torch.testing.assert_close(ranks[0][name], ranks[1][name], msg=f"{name} differs between ranks")
        assert not torch.equal(ranks[0][name], initial[name].detach()), f"{name} did not train"


# ---------------------------------------------------------------- learning

def line_images(gen: torch.Generator, n: int, size: int = 32, k: int = 3) -> tuple[torch.Tensor, ...]:
    """Gray images with `k` random 1-px horizontal or vertical lines (+1) in Gaussian noise (sd 0.3)."""
    y = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        for _ in range(k):
            pos = int(torch.randint(2, size - 2, (1,), generator=gen))
            if torch.rand(1, generator=gen) < 0.5:
                y[i, pos, :] = 1
            else:
                y[i, :, pos] = 1
    return y[:, None].float() + 0.3 * torch.randn(n, 1, size, size, generator=gen), y


def train_lines(detail: bool, steps: int) -> float:
    torch.manual_seed(0)
    cfg = tiny_config("dinov3", decoder_section("upernet"),
                      detail={"enabled": detail, "channels": [8, 8, 8, 8]})
    model = ViTSegModel(validate_config(cfg), in_channels=1, num_classes=2).train()
    opt = torch.optim.AdamW(model.parameters(), 1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = line_images(gen, 4)
        out = model(x)
        p = out.softmax(1)[:, 1]
        soft_dice = 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
        loss = F.cross_entropy(out, y) + soft_dice
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = line_images(torch.Generator().manual_seed(99), 8)
    with torch.no_grad():
        pred = model.eval()(x).argmax(1) == 1
    return 2 * (pred & (y == 1)).sum().item() / (pred.sum().item() + (y == 1).sum().item())


LEARN_STEPS = 60


def test_short_training_recovers_one_pixel_lines_only_with_the_detail_path():
    """Same budget (60 AdamW steps of 4 images 32x32), seed, data and loss (CE + soft Dice); the only
    difference is the detail path. A line is a sixteenth of a patch-16 token wide: the progressive
    upsampler reads only the head's 2x2 logits, so at best it smears a line over its tokens (line
    Dice below 0.5; measured 0.0 even after 100 steps), while the path sees the pixels (measured
    0.999). Both trainings take about 15 s on one core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: a second thread only adds contention on a shared CPU
    try:
        with_detail = train_lines(True, LEARN_STEPS)
        without = train_lines(False, LEARN_STEPS)
    finally:
        torch.set_num_threads(threads)
    assert with_detail > 0.8, with_detail
    assert without < 0.5, without


def test_autocast_bfloat16_on_cpu():
    model = build("dinov2", neck="pyramid").eval()
    x = torch.rand(1, 3, 30, 44)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.shape == ref.shape
    err = (out.float() - ref).abs().max().item()
    assert err < 0.05 * ref.abs().max().item(), err  # bfloat16 keeps ~3 significant digits


def test_benchmark_rows_for_any_decoder():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from vessels import row_config

    demo = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    label, cfg, *_ = row_config("upernet+detail+p256", demo)
    assert cfg.model.detail.enabled and cfg.model.neck == "pyramid" and cfg.train.patch_size == [256, 256]
    assert label == "DINOv3-S + UperNet 128 (pyramid neck) + detail, patch 256x256"
    label, cfg, *_ = row_config("segformer", demo)
    assert not cfg.model.detail.enabled and cfg.model.neck == "identity"
    assert cfg.train.patch_size == [192, 192]
    plain = demo.train.loss.model_copy(update={"skeleton_recall": 0.0})  # a row without +srec has no term
    # ... and trains in fp32 without +trainbf16, its final validation too without +valbf16
    assert cfg.model.decoder.params["hidden_size"] == 128 and cfg.train == demo.train.model_copy(
        update={"patch_size": [192, 192], "batch_size": 2, "loss": plain, "precision": "fp32",
                "validation_precision": "fp32"})
    on = demo.model.model_copy(update={"detail": DetailConfig(enabled=True)})
    detailed = demo.model_copy(update={"model": on})
    assert not row_config("upernet", detailed)[1].model.detail.enabled  # a plain row stays plain
    with pytest.raises(ConfigError, match="unknown decoder 'nope'"):
        row_config("nope+detail", demo)
    with pytest.raises(ConfigError, match="unknown option 'wide'"):
        row_config("upernet+wide", demo)
