"""Fixtures shared by tests/ and the in-repo plugins' tests: the nnU-Net disc world and the runs trained
in it once per session (tests/nnunet_discs.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "tests"))

pytest_plugins = ["nnunet_discs"]
