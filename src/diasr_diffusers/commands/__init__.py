"""Sub-commands of the ``diasr`` CLI, one module per family."""

from __future__ import annotations

import argparse
from collections.abc import Iterable


def in_cli_words(err: BaseException | str, names: Iterable[tuple[str, str]]) -> str:
    """An API error message in command-line words: each ``(api_text, flag)`` pair, e.g. ``("`num_workers`",
    "--workers")``, replaced in order (the library names its arguments; the user typed flags)."""
    text = str(err)
    for api, flag in names:
        text = text.replace(api, flag)
    return text


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``(default: X)`` after each flag's help, unless the help already says its default (``--device``: "default:
    cuda if available, else cpu") or there is none to tell (``None``, a ``store_true`` flag's ``False``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or action.default == []:
            return text
        return super()._get_help_string(action)
