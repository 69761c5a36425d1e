"""ONNX export of every installed decoder through `segframe.nnunet.export.export_onnx` (the function
`segframe export` uses), checked against PyTorch with onnxruntime: the same logits (max abs diff < 1e-3)
at batch 1 and 2 (the batch is dynamic), at sizes that are and are not multiples of the patch (the
padding and the backbone normalisation are inside the graph). The CLI on a real results folder is
tested in tests/test_val_best.py.

Each head exports once (an export takes seconds), so the sizes rotate over the heads.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config

from segframe.config import validate_config
from segframe.errors import SegframeError
from segframe.model import ViTSegModel
from segframe.plugins import get_registry

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
from segframe.nnunet.export import export_onnx  # noqa: E402

SIZES = [(97, 131), (192, 192), (257, 300)]  # dinov3 tiny: patch 16, so 192 needs no padding
SMALL = {"mask2former": {"num_queries": 8, "decoder_layers": 2, "pixel_decoder_layers": 1, "num_points": 256}}
# every size on some heads, the costliest head (mask2former) at the smallest
ORDER = sorted(get_registry().decoders(), key=lambda name: (name != "mask2former", name))
CASES = [(name, SIZES[i % 3]) for i, name in enumerate(ORDER)]  # the detail path: the dynamic test


def build(decoder: str, detail: bool) -> ViTSegModel:
    torch.manual_seed(0)
    fields = get_registry().decoder(decoder).spec.params.model_fields
    section = {"name": decoder, **({"hidden_size": 32} if "hidden_size" in fields else {}),
               **SMALL.get(decoder, {})}
    cfg = tiny_config("dinov3", section)
    if detail:
        cfg["model"]["detail"] = {"enabled": True, "channels": [8, 8, 8, 8]}
    model = ViTSegModel(validate_config(cfg), in_channels=3, num_classes=3).eval()
    with torch.no_grad():  # LayerScale starts at 1e-5: at 1 the blocks count in the logits being compared
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)
    return model


@pytest.mark.parametrize(("decoder", "size"), CASES, ids=[f"{d}-{h}x{w}" for d, (h, w) in CASES])
def test_onnx_logits_match_pytorch(decoder, size, tmp_path):
    model = build(decoder, False)
    path = tmp_path / "model.onnx"
    graph = export_onnx(model, path, size=size)
    assert graph == {"dynamic_size": False, "size": list(size), "reason": None}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    assert session.get_inputs()[0].shape == ["batch", 3, *size]
    for batch in (1, 2):
        x = torch.rand(batch, 3, *size) * 4 - 1  # not only [0, 1]: the graph normalises what it gets
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {"image": x.numpy()})[0]
        assert got.shape == expected.shape == (batch, 3, *size)
        assert np.abs(got - expected).max() < 1e-3, (decoder, size, batch)
    with pytest.raises(Exception, match="dimensions|shape"):  # a fixed size is enforced, never guessed
        session.run(None, {"image": np.zeros((1, 3, size[0] + 1, size[1]), np.float32)})


def test_dinov3_exports_for_every_image_size(tmp_path):
    """DINOv3 with the detail path: one graph with symbolic height and width (padding, RoPE grid,
    resize and crop all follow the input), whose logits match PyTorch's at every size and batch."""
    model = build("linear", True)
    path = tmp_path / "model.onnx"
    graph = export_onnx(model, path)
    assert graph == {"dynamic_size": True, "size": None, "reason": None, "min_size": [32, 32]}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 3, "height", "width"]
    for i, size in enumerate([*SIZES, (32, 47)]):
        x = torch.rand(1 + i % 2, 3, *size) * 4 - 1
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {"image": x.numpy()})[0]
        assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-3, size


# DINOv2's +0.1-offset resize and RETFound's plain bicubic. VisionFM resizes as RETFound does; the _reg4
# models' antialias resize exported as these do when checked once by hand (its numbers against
# F.interpolate: tests/test_backbones.py). One export each, to keep the suite short.
LEARNED_POS_EMBED = [{"name": "dinov2"}, {"name": "retfound"}]


@pytest.mark.parametrize("backbone", LEARNED_POS_EMBED, ids=["dinov2", "retfound"])
def test_learned_position_embeddings_export_for_every_image_size(backbone, tmp_path):
    """The position embedding is resized to the token grid inside the graph, so one graph serves
    every size, patch 14 (DINOv2) and 16 (RETFound) alike."""
    cfg = tiny_config(backbone, "linear")
    torch.manual_seed(0)
    model = ViTSegModel(validate_config(cfg), in_channels=3, num_classes=2).eval()
    with torch.no_grad():
        model.backbone.vit.pos_embed.normal_()  # a resize that matters: no two grid cells alike
    graph = export_onnx(model, tmp_path / "model.onnx")
    p = model.patch_size
    assert graph == {"dynamic_size": True, "size": None, "reason": None, "min_size": [2 * p, 2 * p]}
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for size in [*SIZES, (2 * p, 2 * p + 5)]:
        x = torch.rand(1, 3, *size)
        with torch.no_grad():
            expected = model(x).numpy()
        assert np.abs(session.run(None, {"image": x.numpy()})[0] - expected).max() < 1e-3, size


def test_a_network_that_fixes_the_size_is_refused_or_fixed_never_wrong(tmp_path, monkeypatch):
    """A resize that compares sizes in Python (as segframe.upsample.resize must not) fixes the size:
    without a fallback, one error naming the guard and no file; with one, a graph of that size."""
    import segframe.upsample

    def python_resize(x, size):
        return x if tuple(x.shape[-2:]) == tuple(size) else torch.nn.functional.interpolate(
            x, size=tuple(size), mode="bilinear", align_corners=False)

    monkeypatch.setattr(segframe.upsample, "resize", python_resize)
    model = ViTSegModel(validate_config(tiny_config("dinov3", "linear")), in_channels=3, num_classes=2).eval()
    with pytest.raises(SegframeError, match=r"^cannot export the network with a dynamic image size: .*guard"):
        export_onnx(model, tmp_path / "model.onnx")
    assert not list(tmp_path.iterdir())
    graph = export_onnx(model, tmp_path / "model.onnx", fallback_size=(64, 80))
    assert graph["size"] == [64, 80] and not graph["dynamic_size"] and "guard" in graph["reason"]
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.rand(1, 3, 64, 80)
    with torch.no_grad():
        assert np.abs(session.run(None, {"image": x.numpy()})[0] - model(x).numpy()).max() < 1e-3
