"""Shared fixtures: tiny configs and a clean plugin registry per test that changes it."""

import os

import pytest
import torch

from segframe.plugins import get_registry, reset_registry

# the 2 cores of the machines the suite is sized for, unless OMP_NUM_THREADS says otherwise
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


@pytest.fixture
def registry():
    """A fresh registry (entry points loaded) that the test may register plugins on."""
    reset_registry()
    yield get_registry()
    reset_registry()


def tiny_config(backbone: str = "dinov2", decoder="upernet", **model) -> dict:
    """A config dict for a depth-4, width-64 backbone."""
    dec = decoder if not isinstance(decoder, str) else {"name": decoder, "hidden_size": 32} \
        if decoder == "upernet" else decoder
    return {"model": {"backbone": backbone, "backbone_size": "tiny", "decoder": dec, **model}}
