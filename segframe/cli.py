"""The `segframe` command: dispatches to subcommand modules, turning our errors into clear messages.

Each subcommand module exposes `register(subparsers)`, which adds its parser and sets
`func` (called with the parsed args; returns an exit code). Modules are imported only
when needed so `segframe plugins` stays fast and works without nnU-Net set up.
Library deprecation warnings that say nothing to a user (torch's `torch.jit.interface is
deprecated`, raised while timm imports) are hidden unless warnings are asked for
(`python -W ...` or PYTHONWARNINGS).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from segframe.errors import SegframeError

# (category, message regex) of warnings from libraries we use that a user cannot act on
QUIET = [(FutureWarning, r"`torch\.jit\.interface` is deprecated")]


def quiet_library_warnings() -> None:
    """Hide QUIET warnings, unless the user asked for warnings with -W or PYTHONWARNINGS."""
    if sys.warnoptions:
        return
    for category, message in QUIET:
        warnings.filterwarnings("ignore", message=message, category=category)


# subcommand -> module with register(subparsers)
COMMANDS = {
    "plugins": "segframe.commands",
    "config": "segframe.commands",
    "train": "segframe.nnunet.cli",
    "predict": "segframe.nnunet.cli",
    "trainer-path": "segframe.nnunet.cli",
    "data": "segframe.data.cli",
    "evaluate": "segframe.evaluate",
    "export": "segframe.nnunet.cli",
    "demo": "segframe.demo",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segframe",
        description="Fine-tune ViT foundation models for 2D segmentation inside nnU-Net v2.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    done = set()
    for name, module in COMMANDS.items():
        if module in done or (only and name != only):
            continue
        done.add(module)
        try:
            importlib.import_module(module).register(sub)
        except ImportError as exc:
            if only:
                raise
            sub.add_parser(name, help=f"(unavailable: {exc})")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    quiet_library_warnings()
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except SegframeError as exc:
        print(f"segframe {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
