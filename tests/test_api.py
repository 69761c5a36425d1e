"""The top-level Python API: `from segframe import ViTSegModel, create_segmentation_model, load_config,
Predictor` works, and `import segframe` stays light (no torch, timm or nnU-Net until a name is used)."""

import subprocess
import sys

import segframe


def test_import_segframe_is_light():
    code = ("import sys, segframe; print(sorted(m for m in ('torch', 'timm', 'nnunetv2', 'transformers') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_public_names_are_the_real_objects(tmp_path):
    from segframe import Predictor, ViTSegModel, create_segmentation_model, load_config
    from segframe.config import load_config as config_load
    from segframe.model import ViTSegModel as Model
    from segframe.model import create_segmentation_model as create
    from segframe.nnunet.predict import Predictor as NnunetPredictor

    assert (ViTSegModel, create_segmentation_model, load_config, Predictor) == (
        Model, create, config_load, NnunetPredictor)
    assert {"ViTSegModel", "create_segmentation_model", "load_config", "Predictor"} <= set(dir(segframe))
    assert {"ViTSegModel", "create_segmentation_model", "load_config", "Predictor"} <= set(segframe.__all__)


def test_unknown_name_is_an_attribute_error():
    try:
        segframe.NoSuchThing  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("segframe.NoSuchThing did not raise")
