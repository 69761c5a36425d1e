"""The `segframe` command: dispatches to subcommand modules, turning our errors into clear messages.

Each subcommand module exposes `register(subparsers)`, which adds its parser and sets
`func` (called with the parsed args; returns an exit code). Modules are imported only
when needed so `segframe plugins` stays fast and works without nnU-Net set up.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from segframe.errors import SegframeError

# subcommand -> module with register(subparsers)
COMMANDS = {
    "plugins": "segframe.commands",
    "config": "segframe.commands",
    "train": "segframe.nnunet.cli",
    "predict": "segframe.nnunet.cli",
    "trainer-path": "segframe.nnunet.cli",
    "data": "segframe.data.cli",
    "evaluate": "segframe.evaluate",
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
