"""The DPT plugin against the older nnU-Net fork's model_dpt (its own code, read from the reference
folder): `neck_hidden_sizes: [D]*4` and `use_batch_norm_in_fusion_residual: true` build the fork's head,
its weights copied in by name, and the fork's whole forward equals the plugin's head on the same tokens
followed by the model's bilinear resize and crop, on odd token grids, in eval and training mode."""

import pytest
import torch
import torch.nn.functional as F
from fork_reference import TINY_ARCH, fork_module, no_pretrained
from segframe_dpt import DPTParams, build
from test_dpt import _randomize

from segframe.plugins import DecoderInputs, HeadContext
from segframe.upsample import crop, resize

HIDDEN = 16
UNUSED = "fusion_stage.layers.0.residual_layer1"  # built by transformers, never called


def fork_model(backbone: str, readout: str) -> torch.nn.Module:
    module = fork_module("model_dpt")
    torch.manual_seed(0)
    with no_pretrained({**TINY_ARCH, "init_values": 1.0}):  # layer scale 1: the levels differ
        model = module.create_segmentation_model(
            backbone_name=backbone, backbone_size="large", num_classes=3, fusion_hidden_size=HIDDEN,
            readout_type=readout, use_lora=False)
    _randomize(model.neck)  # O(1) activations and non-trivial BatchNorm statistics
    _randomize(model.head)
    return model.eval()


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("backbone, readout", [("visionfm", "project"), ("dinov2", "project"),
                                               ("dinov3", "add"), ("visionfm", "ignore")])
def test_fork_head_built_exactly(backbone, readout):
    fork = fork_model(backbone, readout)
    patch, d = fork.backbone_patch_size, fork.embed_dim
    params = DPTParams(hidden_size=HIDDEN, readout=readout, neck_hidden_sizes=[d] * 4,
                       use_batch_norm_in_fusion_residual=True)
    context = HeadContext(backbone=backbone, patch_size=patch, embed_dim=d, num_levels=4, has_cls_token=True,
                          num_register_tokens=0, image_channels=3, neck="identity")
    head = build(params, [d] * 4, [patch] * 4, 3, context)
    neck = {k: v for k, v in fork.neck.state_dict().items() if not k.startswith(UNUSED + ".")}
    head.neck.load_state_dict(neck)  # strict: the same modules and shapes, no more, no less
    head.head.load_state_dict(fork.head.state_dict())
    unused = fork.neck.get_submodule(UNUSED)
    assert numel(unused) > 0 and numel(head) == numel(fork.neck) + numel(fork.head) - numel(unused)
    calls = []
    unused.register_forward_hook(lambda *args: calls.append(1))

    h, w = 45, 61  # odd token grids: 3 x 4 on patch 16, 4 x 5 on patch 14
    x = torch.randn(2, 3, h, w)
    padded = F.pad(x, (0, -w % patch, 0, -h % patch), mode="reflect")  # the fork pads like ViTSegModel
    for mode in ("eval", "train"):
        for model in (fork, head):
            model.train(mode == "train")
            for m in model.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0  # training mode compares BatchNorm on batch statistics, not dropout masks
        with torch.no_grad():
            theirs = fork(x)
            _, levels = fork.backbone.forward_intermediates(
                padded, indices=fork.feature_indices, norm=True, output_fmt="NCHW", return_prefix_tokens=True)
            inputs = DecoderInputs(features=[f for f, _ in levels],
                                   cls_tokens=None if readout == "ignore" else [t[:, 0] for _, t in levels])
            logits = head(inputs)
        assert logits.shape[-2:] == padded.shape[-2:] and head.output_stride == 1
        ours = crop(resize(logits, padded.shape[-2:]), h, w)
        assert theirs.shape == ours.shape == (2, 3, h, w)
        assert theirs.std() > 0.1
        assert (ours - theirs).abs().max() < 1e-4, mode
    assert not calls
