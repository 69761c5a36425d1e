"""DDP in the tests: models trained a few AdamW steps by two gloo processes on the CPU, wrapped as nnU-Net
wraps them (no find_unused_parameters, so a trainable parameter without a gradient fails the run). One
spawn trains every case a test module asks for, and the ranks import only this module (not the test
modules, some of which import nnU-Net's trainer), so each rank starts in a few seconds."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from segframe.config import validate_config
from segframe.model import ViTSegModel


def starting_model(case: dict) -> ViTSegModel:
    """The case's model as both ranks start it (the tests compare against it): seed 0, then live LoRA
    adapters (lora_B drawn, not 0)."""
    torch.manual_seed(0)
    config = validate_config(case["config"])
    model = ViTSegModel(config, in_channels=3, num_classes=case.get("num_classes", 2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def loss_of(model: ViTSegModel, out, target: torch.Tensor) -> torch.Tensor:
    """nnU-Net's view: the head's own loss if it owns one, else cross-entropy on the logits (+ 0.4 x the
    auxiliary logits' when the head has them)."""
    if model.owns_loss:
        return model.training_loss(out, target[:, None])[0]
    if isinstance(out, tuple):  # (logits, auxiliary logits)
        return F.cross_entropy(out[0], target) + 0.4 * F.cross_entropy(out[1], target)
    return F.cross_entropy(out, target)


def _worker(rank: int, world: int, port: int, cases: dict[str, dict], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    result = {}
    for name, case in cases.items():
        model = starting_model(case)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        # no weight decay: it would move every non-zero weight, with a gradient or without
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
        torch.manual_seed(1 + rank)  # each rank sees other data
        size, classes = case.get("size", (32, 32)), case.get("num_classes", 2)
        try:
            for _ in range(case.get("steps", 2)):
                x, y = torch.rand(2, 3, *size), torch.randint(0, classes, (2, *size))
                loss = loss_of(model, ddp(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        except RuntimeError as exc:
            raise RuntimeError(f"case {name}: {exc}") from None
        result[name] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def train_ddp(cases: dict[str, dict], folder: Path) -> tuple[dict, dict]:
    """Train every case in one spawn of two ranks; each rank's trainable parameters, case -> name -> tensor.
    A case: {"config": a config dict, "num_classes": 2, "size": (32, 32), "steps": 2}."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, cases, str(folder)), nprocs=2, join=True)
    return tuple(torch.load(Path(folder) / f"rank{r}.pt") for r in range(2))
