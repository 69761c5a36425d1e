"""Fixtures shared by tests/ and the in-repo plugins' tests: the nnU-Net disc world and the runs trained
in it once per session (tests/nnunet_discs.py), and the torch threads of every test."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent / "tests"))

pytest_plugins = ["nnunet_discs"]


def pytest_configure(config):
    """Torch threads: the cores shared among pytest-xdist's workers (`make test` runs 2 on 2 cores; more
    OpenMP threads than cores make them spin), unless OMP_NUM_THREADS says otherwise; exported, so the
    processes the tests start use as many. xdist's controller runs no test and leaves the variable to
    its workers."""
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped with the reason without one)")
    if getattr(config.option, "numprocesses", None) and "PYTEST_XDIST_WORKER" not in os.environ:
        return
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // workers)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a CUDA GPU: without one each is skipped with that reason
    (benchmarks/gpu_check.py runs them on a GPU machine)."""
    import pytest

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none is visible): run benchmarks/gpu_check.py on one")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
