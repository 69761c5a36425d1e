"""What only a CUDA GPU can check, marked `cuda` (skipped with the reason where none is visible;
benchmarks/gpu_check.py runs them on a GPU machine): every head on the GPU against the CPU, the
autocast precisions `train.precision` picks there, torch.compile against eager (nnU-Net compiles on
CUDA by default), and a results folder predicted on the GPU as on the CPU."""

import pytest
import torch
from conftest import tiny_config

from segframe.config import validate_config
from segframe.model import ViTSegModel
from segframe.nnunet.runtime import AUTOCAST_DTYPES, resolve_precision
from segframe.plugins import get_registry

pytestmark = pytest.mark.cuda
HEADS = sorted(get_registry().decoders())
SMALL = {"mask2former": {"num_queries": 8, "decoder_layers": 2, "pixel_decoder_layers": 1, "num_points": 256}}


def build(head: str, **model) -> ViTSegModel:
    torch.manual_seed(0)
    fields = get_registry().decoder(head).spec.params.model_fields
    section = {"name": head, **({"hidden_size": 32} if "hidden_size" in fields else {}),
               **SMALL.get(head, {})}
    return ViTSegModel(validate_config(tiny_config("dinov3", section, **model)), in_channels=3, num_classes=3)


@pytest.fixture(autouse=True)
def exact_matmul():
    """No TF32: the GPU's float32 products as the CPU's, up to summation order."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("head", HEADS)
def test_every_head_on_the_gpu_gives_the_cpus_logits_and_trains(head):
    model = build(head).eval()
    x = torch.rand(2, 3, 97, 131)
    with torch.no_grad():
        expected = model(x)
        got = model.cuda()(x.cuda()).cpu()
    assert torch.allclose(got, expected, atol=1e-3, rtol=1e-3), (got - expected).abs().max()
    model.train()
    out = model(x.cuda())
    if model.owns_loss:
        loss = model.training_loss(out, torch.randint(0, 3, (2, 1, 97, 131), device="cuda"))[0]
    else:
        loss = (out[0] if isinstance(out, tuple) else out).square().mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("precision", ["bf16", "fp16", "auto", "nnunet"])
def test_train_precision_steps_on_the_gpu(precision):
    """Five AdamW steps on one batch under the autocast `train.precision` resolves to (fp16 with a grad
    scaler, as the trainer): the loss is finite and falls."""
    model = build("upernet").cuda().train()
    resolved = resolve_precision(precision, torch.device("cuda"))
    optimizer = torch.optim.AdamW(model.param_groups(1e-3, 0.0), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda") if resolved == "fp16" else None
    x, y = torch.rand(2, 3, 64, 64, device="cuda"), torch.randint(0, 3, (2, 64, 64), device="cuda")
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        with torch.autocast("cuda", dtype=AUTOCAST_DTYPES.get(resolved, torch.float32),
                            enabled=resolved != "fp32"):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses


@pytest.mark.parametrize("head", ["upernet", "segformer", "mask2former"])
def test_compiled_model_matches_eager_on_the_gpu(head):
    """torch.compile (inductor, as nnU-Net's `nnUNet_compile` default on CUDA): logits in eval and the
    gradients of one training step equal eager's within float32 reordering."""
    model = build(head).cuda()
    compiled = torch.compile(model)
    x = torch.rand(2, 3, 64, 96, device="cuda")
    model.eval()
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-3, rtol=1e-3)
    if model.owns_loss:
        return  # its training outputs are matched-query dicts: checked by the eval logits above
    model.train()
    grads = []
    for net in (model, compiled):
        model.zero_grad()
        out = net(x)
        (out[0] if isinstance(out, tuple) else out).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for eager, compiled_grad in zip(*grads, strict=True):
        assert torch.allclose(eager, compiled_grad, atol=1e-4, rtol=1e-3)


def test_a_results_folder_predicts_on_the_gpu_as_on_the_cpu(tmp_path, monkeypatch):
    import numpy as np
    from test_prune import old_results_folder

    from segframe.nnunet.predict import Predictor

    cfg = validate_config(tiny_config("dinov2", layers=[0, 1, 2, 3]))
    folder = old_results_folder(tmp_path, monkeypatch, cfg)[0]
    image = (np.random.default_rng(0).random((70, 90, 3)) * 255).astype(np.uint8)
    cpu = Predictor.from_results(folder, device="cpu").predict(image, probabilities=True)
    gpu = Predictor.from_results(folder, device="cuda").predict(image, probabilities=True)
    assert np.abs(gpu[1] - cpu[1]).max() < 1e-2  # nnU-Net sums the window in float16 on the GPU
    assert (gpu[0] == cpu[0]).mean() > 0.999
