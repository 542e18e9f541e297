"""Lazy package exports (PEP 562): a package lists ``name -> submodule`` and its names are imported on first use, so
light callers (the ``diasr`` command line, the loader's checks) do not pay for importing torch and diffusers."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, names: dict[str, str], namespace: dict[str, Any]) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package`` whose ``names`` map each public name to its (relative) submodule;
    a resolved name is stored in ``namespace`` (the package's globals) so later lookups skip ``__getattr__``."""

    def __getattr__(name: str) -> Any:
        if name in names:
            value = getattr(importlib.import_module(names[name], package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*namespace, *names})

    return __getattr__, __dir__
