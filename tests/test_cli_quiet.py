"""A quiet CLI: torch's `torch.jit.interface is deprecated` FutureWarning (raised while timm imports)
is hidden unless the user asks for warnings; `segframe plugins` does not import timm; and
`segframe config check` validates what it can without data."""

import subprocess
import sys

import yaml

from segframe.cli import main

WARNING = "torch.jit.interface` is deprecated"
TINY = {"backbone": "dinov2", "backbone_size": "tiny"}


def segframe(*args: str, python_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *python_flags, "-m", "segframe.cli", *args],
                          capture_output=True, text=True)


def test_the_warning_is_hidden_unless_asked_for(tmp_path):
    config = tmp_path / "tiny.yaml"  # model.layers makes `config check` build the backbone: timm is imported
    config.write_text(yaml.safe_dump({"model": {**TINY, "layers": [3]}}))
    quiet = segframe("config", "check", str(config))
    assert quiet.returncode == 0 and WARNING not in quiet.stderr, quiet.stderr
    loud = segframe("config", "check", str(config), python_flags=("-W", "default::FutureWarning"))
    assert loud.returncode == 0 and WARNING in loud.stderr, loud.stderr


def test_listing_plugins_does_not_import_timm():
    code = ("import sys; from segframe.cli import main; main(['plugins']); "
            "print('timm imported:', 'timm' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and "dinov2" in done.stdout, done.stderr
    assert "timm imported: False" in done.stdout and WARNING not in done.stderr


def check(path, capsys) -> tuple[int, str, str]:
    code = main(["config", "check", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


def test_config_check_errors(tmp_path, capsys):
    code, _, err = check(tmp_path, capsys)
    assert code == 1 and "is a directory, not a YAML file" in err and "does not exist" not in err
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("model: {backbone: dinov2}  # caf\u00e9\n".encode("latin-1"))
    code, _, err = check(latin, capsys)
    assert code == 1 and "is not UTF-8 text" in err and "Traceback" not in err
    for size in ([64], [64, 0], [64, -14], [1, 2, 3]):
        path = tmp_path / "patch.yaml"
        path.write_text(yaml.safe_dump({"train": {"patch_size": size}}))
        code, _, err = check(path, capsys)
        assert code == 1 and "train.patch_size: must be two positive integers" in err, (size, err)
    path = tmp_path / "layers.yaml"
    path.write_text(yaml.safe_dump({"model": {**TINY, "layers": [1, 7]}}))
    code, _, err = check(path, capsys)
    assert code == 1 and "model.layers: [1, 7] invalid for dinov2 tiny with 4 blocks" in err, err


def test_config_check_refuses_an_empty_file_and_takes_braces_for_defaults(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    code, out, err = check(empty, capsys)
    assert code == 1 and "is empty: it would train every default" in err and "`{}`" in err
    braces = tmp_path / "braces.yaml"
    braces.write_text("{}")
    code, out, err = check(braces, capsys)
    assert code == 0 and err == "" and yaml.safe_load(out)["model"]["backbone"]["name"] == "dinov2"
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"model": {**TINY, "layers": [0, 3]},
                                    "train": {"patch_size": [70, 70]}}))
    code, out, err = check(good, capsys)
    assert code == 0 and err == "" and yaml.safe_load(out)["model"]["layers"] == [0, 3]
