"""``diasr generate`` and ``diasr demo`` (filled in by the core issue)."""

from __future__ import annotations


def register(subparsers) -> None:
    pass
