"""Sub-commands of the ``diasr`` CLI, one module per family."""

from __future__ import annotations

from collections.abc import Iterable


def in_cli_words(err: BaseException | str, names: Iterable[tuple[str, str]]) -> str:
    """An API error message in command-line words: each ``(api_text, flag)`` pair, e.g. ``("`num_workers`",
    "--workers")``, replaced in order (the library names its arguments; the user typed flags)."""
    text = str(err)
    for api, flag in names:
        text = text.replace(api, flag)
    return text
