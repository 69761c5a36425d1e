"""The files segframe reads and writes for a user: JSON read with one clear error, and atomic writes.

An atomic write goes to a hidden temporary file beside the target, whose name ends as the target's (writers
choose their format by the ending), and is renamed over the target only when it is complete: a failed or
killed write leaves the previous file or none, never a partial one. Checkpoints, plans, exported graphs,
migrated configs, masks, colour maps and metrics are all written so.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from segframe.errors import SegframeError

PARTIAL = ".partial-"  # the temporary files' prefix


def read_json(path: str | os.PathLike, what: str = "", error: type[SegframeError] = SegframeError
              ) -> dict[str, Any]:
    """The JSON object in `path`; `error` names `what` (e.g. "plans.json of the results folder") and the
    file when it is missing, unreadable, not JSON or not an object."""
    path = Path(path)
    what = f"{what} " if what else ""
    if not path.is_file():
        raise error(f"{what}not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{what}{path} is not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{what}{path} holds a JSON {type(data).__name__}, not an object")
    return data


def partial_files(path: Path) -> list[Path]:
    """Temporary files of writes to `path` that were killed before their rename."""
    return sorted(path.parent.glob(f"{PARTIAL}*-{path.name}"))


Content = bytes | str | Callable[[Path], None]


def write_atomically(path: str | os.PathLike, content: Content, durable: bool = False,
                     error: type[SegframeError] = SegframeError,
                     failures: tuple[type[BaseException], ...] = (OSError,)) -> None:
    """Write `content` (bytes, text, or a function that writes the file it is given: it may check that
    file and raise) to `path` atomically; see `write_all`."""
    write_all({Path(path): content}, durable, error, failures)


def write_all(files: dict[Path, Content], durable: bool = False, error: type[SegframeError] = SegframeError,
              failures: tuple[type[BaseException], ...] = (OSError,)) -> None:
    """Write every file's content to its temporary file, then rename them all: a failure leaves none of
    them changed (metrics.json and metrics.csv stay a pair).

    `durable` also flushes the files and the renames to disk (checkpoints: a power cut keeps the old file
    or the new one). A failure of the kinds in `failures` (OSError: a full disk, a read-only folder)
    becomes one `error` naming the file and the cause; anything else is raised as it is. Either way no
    temporary file is left.
    """
    temps = {Path(path): _temporary(Path(path)) for path in files}
    target = None
    try:
        for target, content in files.items():
            temporary = temps[Path(target)]
            if callable(content):
                content(temporary)
            else:
                temporary.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
            if durable:
                _fsync(temporary)
        for target, temporary in temps.items():
            os.replace(temporary, target)
    except failures as exc:
        lines = str(exc).strip().splitlines()
        cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else \
            f"{type(exc).__name__}: {lines[0] if lines else ''}"
        raise error(f"cannot write {target}: {cause}") from None
    finally:
        for temporary in temps.values():
            with contextlib.suppress(OSError):  # e.g. a read-only folder, where no temporary file was made
                temporary.unlink(missing_ok=True)
    if durable:
        for folder in {path.parent for path in temps}:
            with contextlib.suppress(OSError):  # the renames themselves, where the file system allows
                _fsync(folder)


def _temporary(path: Path) -> Path:
    return path.with_name(f"{PARTIAL}{os.getpid()}-{threading.get_ident()}-{path.name}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
