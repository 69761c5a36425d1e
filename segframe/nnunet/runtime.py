"""Where and in what arithmetic a network runs: the torch device a `-device` names, the CPU's threads,
`train.precision` and `train.validation_precision`, and bfloat16 on the CPU (`--precision bf16`).

Imports only torch: every other module of segframe.nnunet may use it.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from segframe.errors import ConfigError, SegframeError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_threads() -> int:
    """Torch threads of a CPU run: OMP_NUM_THREADS when it is set to a whole number >= 1, else every core
    (nnU-Net's CLIs always take every core; two runs side by side then each spin on both)."""
    text = os.environ.get("OMP_NUM_THREADS", "").strip()
    if text:
        if not text.isdigit() or int(text) < 1:
            raise SegframeError(f"OMP_NUM_THREADS={text!r}: set it to a whole number >= 1, or unset it to "
                                "use every core")
        return int(text)
    return os.cpu_count() or 1


def torch_device(device: Any) -> torch.device:
    """The torch.device of a `-device` name ("cuda", "cpu", "mps"; "auto" or None: CUDA if visible, else
    the CPU) or of a torch.device; a device that is not there is one error. On the CPU, torch takes
    `cpu_threads()` threads."""
    if isinstance(device, torch.device):
        return device
    name = str(device) if device not in (None, "auto") else "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SegframeError("-device cuda: no CUDA GPU is visible; use -device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise SegframeError("-device mps: MPS is not available here; use -device cpu")
    if name not in ("cuda", "cpu", "mps"):
        raise SegframeError(f"device {name!r}: use cuda, cpu or mps")
    if name == "cpu":
        torch.set_num_threads(cpu_threads())
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """`train.precision` for a device: auto = bf16 on CUDA that supports it, fp16 (with a grad scaler)
    on older CUDA, fp32 elsewhere; nnunet = fp16 on any CUDA, fp32 elsewhere (nnU-Net's trainer)."""
    cuda = device.type == "cuda"
    if precision == "nnunet":
        return "fp16" if cuda else "fp32"
    if precision == "auto":
        if not cuda:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "mps" and precision != "fp32":
        raise ConfigError(f"train.precision: {precision} is not supported on mps (nnU-Net runs mps without "
                          "autocast); use fp32 or auto")
    return precision


def check_validation_precision(precision: str, device: torch.device) -> None:
    """`train.validation_precision: bf16` is for the CPU; refused elsewhere before any file is written."""
    if precision == "bf16" and device.type != "cpu":
        raise ConfigError(f"train.validation_precision: bf16 is for the CPU (on {device.type} nnU-Net's own "
                          "autocast applies in validation); use fp32")


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512_BF16 or AMX), as oneDNN reports it."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(torch.backends.mkldnn.is_available() and check is not None and check())


def emulated_bf16_note(setting: str) -> str | None:
    """The note for bfloat16 `setting` on a CPU that only emulates it; None where it is native."""
    if native_bf16():
        return None
    return (f"this CPU has no native bfloat16 arithmetic (AVX512_BF16 or AMX): {setting} is emulated and "
            "slower than fp32 here")


def bf16_network(network: Any) -> None:
    """Run `network`'s forward under CPU bfloat16 autocast and hand back float32 logits, so nnU-Net's
    sliding window, Gaussian weighting, mirroring and resampling stay as they are. Convolutions and
    matrix products run in bfloat16 (torch's CPU autocast list); the weights stay float32, and the
    forward is replaced on the instance, so loading another fold's weights keeps it (`del
    network.forward` restores the class's)."""
    forward = network.forward

    def forward_bf16(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return forward(x).float()

    network.forward = forward_bf16
