"""The ``diasr`` command line.

Each subsystem owns its commands: a module listed in ``_COMMAND_MODULES`` exposes ``register(subparsers)``, which
adds its sub-commands with ``set_defaults(func=...)``. ``func(args) -> int`` is the exit code.

Command modules import torch, diffusers and the models inside their ``func`` only, so ``diasr --help`` and argument
errors answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys

_COMMAND_MODULES = [
    "diasr_diffusers.commands.generate",
    "diasr_diffusers.commands.data",
    "diasr_diffusers.commands.curate",
    "diasr_diffusers.commands.train",
    "diasr_diffusers.commands.eval",
    "diasr_diffusers.commands.app",
]


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line (``diasr generate: error: ...``) and exit code 2, without the long usage text."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diasr", description="Multi-subject video generation with Diffusers.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
