"""Shared fixtures: tiny configs and a clean plugin registry per test that changes it."""

import pytest

from segframe.plugins import get_registry, reset_registry


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
