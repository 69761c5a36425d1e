"""ONNX export of every installed decoder through `segframe.nnunet.export.export_onnx` (the function
`segframe export` uses), checked here again, independently of the exporter's own check: onnxruntime's
logits against PyTorch's (max abs diff < 1e-3) at batch 1 and 2, at an odd size, a patch-sized one and a
larger odd size (the padding and the backbone normalisation are inside the graph). The CLI on a real
results folder is tested in tests/test_val_best.py.

Every head with both necks is exported once, with a dynamic size where it can be (one module-scoped set
of exports: an export takes seconds, the CPU-heavy part of this file); linear with the identity neck
carries the detail path, so DINOv3's RoPE grid, padding, the detail path's resizes and crops are
checked at every size in the same graph.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config

from segframe.config import validate_config
from segframe.errors import ConfigError, SegframeError
from segframe.model import ViTSegModel
from segframe.plugins import get_registry

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
from segframe.nnunet.export import check_sizes, export_onnx  # noqa: E402

SIZES = [(97, 131), (192, 192), (257, 300)]  # dinov3 tiny: patch 16, so 192 needs no padding
PATCH = (192, 192)  # nnU-Net's patch, as `segframe export` passes it
SMALL = {"mask2former": {"num_queries": 8, "decoder_layers": 2, "pixel_decoder_layers": 1, "num_points": 256}}
NECKS = ("identity", "pyramid")
MATRIX = [(head, neck) for head in sorted(get_registry().decoders()) for neck in NECKS]
# heads that build their own resolutions from same-stride levels refuse the pyramid neck (a ConfigError)
NO_PYRAMID = {("dpt", "pyramid"), ("primus", "pyramid"), ("unetr", "pyramid")}
# as measured (docs/plugins.md's table): these fix the image size in their own code, so a graph for every
# size is refused with the reason (with `segframe export`'s fallback: a graph for the patch size)
FIXED = {("dpt", "identity"), ("mask2former", "identity"), ("mask2former", "pyramid"), ("linear", "pyramid"),
         ("upernet", "identity")}


DETAIL = ("linear", "identity")  # the combination exported with the detail path


def build(decoder: str, detail: bool, neck: str = "identity") -> ViTSegModel:
    torch.manual_seed(0)
    fields = get_registry().decoder(decoder).spec.params.model_fields
    section = {"name": decoder, **({"hidden_size": 32} if "hidden_size" in fields else {}),
               **SMALL.get(decoder, {})}
    cfg = tiny_config("dinov3", section, neck=neck)
    if detail:
        cfg["model"]["detail"] = {"enabled": True, "channels": [8, 8, 8, 8]}
    model = ViTSegModel(validate_config(cfg), in_channels=3, num_classes=3).eval()
    with torch.no_grad():  # LayerScale starts at 1e-5: at 1 the blocks count in the logits being compared
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)
    return model


def assert_matches(model: ViTSegModel, onnx_file, sizes) -> None:
    """onnxruntime against PyTorch at each size, batch 2 at the first and 1 at the others."""
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    for i, size in enumerate(sizes):
        x = torch.rand(2 if i == 0 else 1, 3, *size) * 4 - 1  # not only [0, 1]: the graph normalises
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {"image": x.numpy()})[0]
        assert got.shape == expected.shape == (x.shape[0], 3, *size)
        assert np.abs(got - expected).max() < 1e-3, size


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """(head, neck) -> (model, the graph's file, export_onnx's answer, or its SegframeError)."""
    done = {}
    for head, neck in MATRIX:
        if (head, neck) in NO_PYRAMID:
            continue
        model = build(head, (head, neck) == DETAIL, neck)
        path = tmp_path_factory.mktemp(f"{head}-{neck}") / "model.onnx"
        try:
            done[head, neck] = model, path, export_onnx(model, path)
        except SegframeError as exc:
            done[head, neck] = model, path, exc
    return done


@pytest.mark.parametrize(("head", "neck"), MATRIX, ids=[f"{h}-{n}" for h, n in MATRIX])
def test_every_head_and_neck_exports_a_checked_graph_for_every_size(exports, head, neck):
    """A dynamic graph is right at sizes far from the traced example; one that cannot be is refused with
    one readable line and no file (`segframe export` then falls back: the test below)."""
    if (head, neck) in NO_PYRAMID:
        with pytest.raises(ConfigError, match="set model.neck: identity"):
            build(head, False, neck)
        return
    model, path, graph = exports[head, neck]
    if (head, neck) in FIXED:
        assert isinstance(graph, SegframeError), graph
        message = str(graph)
        assert message.startswith("cannot export the network with a dynamic image size: ")
        assert "\n" not in message and "AssertionError" not in message and "Cannot create Dim" not in message
        assert not path.exists()
        return
    assert not isinstance(graph, SegframeError), graph
    min_side = 3 * 16 if neck == "pyramid" else 2 * 16
    assert graph["dynamic_size"] and graph["min_size"] == [min_side, min_side] and graph["reason"] is None
    sizes = check_sizes(16, None)
    assert [c["size"] for c in graph["checked"]] == [list(s) for s in sizes]
    assert all(c["max_abs_diff"] < 1e-3 for c in graph["checked"])
    print(head, neck, [(c["size"], f"{c['max_abs_diff']:.1e}") for c in graph["checked"]])  # docs' table
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 3, "height", "width"]
    assert_matches(model, path, [*SIZES, (min_side, min_side + 5)])


def test_a_head_that_fixes_the_size_falls_back_to_the_patch(tmp_path):
    """DPT: the graph for nnU-Net's patch, checked there, with the reason; any other size is refused by
    onnxruntime, never guessed."""
    model = build("dpt", False)
    graph = export_onnx(model, tmp_path / "model.onnx", fallback_size=PATCH)
    assert not graph["dynamic_size"] and graph["size"] == list(PATCH)
    assert graph["reason"].startswith("the network's code computes numbers from the image size")
    assert [c["size"] for c in graph["checked"]] == [list(PATCH)] * 2
    assert_matches(model, tmp_path / "model.onnx", [PATCH, PATCH])
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 3, *PATCH]
    with pytest.raises(Exception, match="dimensions|shape"):
        session.run(None, {"image": np.zeros((1, 3, PATCH[0] + 1, PATCH[1]), np.float32)})


def test_a_graph_wrong_away_from_the_example_is_never_called_dynamic(tmp_path, monkeypatch):
    """UperNet with torch's own nn.AdaptiveAvgPool2d in its pyramid pooling traces without a guard, but
    its lowering fixes the bins at the example size: onnxruntime fails at 97x131. The check refuses it."""
    model = build("upernet", False)
    for block in model.decoder.head.psp_modules.blocks:
        block.layers[0] = torch.nn.AdaptiveAvgPool2d(block.layers[0].output_size)
        block.add_module("0", block.layers[0])
    with pytest.raises(SegframeError, match=r"dynamic image size: onnxruntime cannot run the graph at 97x131 "
                                            r"\(GatherND: invalid index"):
        export_onnx(model, tmp_path / "model.onnx")
    assert not list(tmp_path.iterdir())


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
    assert graph["dynamic_size"] and graph["min_size"] == [2 * p, 2 * p] and graph["reason"] is None
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for size in [*SIZES, (2 * p, 2 * p + 5)]:
        x = torch.rand(1, 3, *size)
        with torch.no_grad():
            expected = model(x).numpy()
        assert np.abs(session.run(None, {"image": x.numpy()})[0] - expected).max() < 1e-3, size


def test_a_network_that_fixes_the_size_is_refused_or_fixed_never_wrong(tmp_path, monkeypatch):
    """A resize that compares sizes in Python (as segframe.upsample.resize must not) fixes the size:
    without a fallback, one error naming the guard and no file (the fallback's graph: the DPT test)."""
    import segframe.upsample

    def python_resize(x, size):
        return x if tuple(x.shape[-2:]) == tuple(size) else torch.nn.functional.interpolate(
            x, size=tuple(size), mode="bilinear", align_corners=False)

    monkeypatch.setattr(segframe.upsample, "resize", python_resize)
    model = ViTSegModel(validate_config(tiny_config("dinov3", "linear")), in_channels=3, num_classes=2).eval()
    with pytest.raises(SegframeError, match=r"^cannot export the network with a dynamic image size: .*guard"):
        export_onnx(model, tmp_path / "model.onnx")
    assert not list(tmp_path.iterdir())


def test_the_pyramid_necks_pooling_is_max_pool_in_ceil_mode():
    """CeilMaxPool (the pyramid neck's 0.5x level, exportable for every size) against torch's own."""
    from segframe.upsample import CeilMaxPool

    for size in [(1, 1), (2, 3), (5, 8), (7, 7), (16, 33)]:
        x = torch.randn(2, 3, *size)
        assert torch.equal(CeilMaxPool()(x), torch.nn.MaxPool2d(2, 2, ceil_mode=True)(x)), size
