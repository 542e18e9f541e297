"""One guard for every file a ``diasr`` command writes: never onto an input, never over a file it did not create.

Every command that writes calls :func:`check_outputs` with the files it will write and the files and folders it
reads, before any expensive work, and :func:`claim_outputs` just before it writes them. The rules:

- an output is never one of the inputs (paths are resolved: ``..``, ``~``, symlinks and hard links are followed),
  and never an existing file inside an input folder (``--videos``, a dataset), even with ``--overwrite``;
- an output never replaces a folder, and the outputs of one command are distinct;
- an existing output file is replaced only when this project wrote it (its name is recorded in the folder's
  ``.diasr-outputs.json``, see :func:`claim_outputs`) or with ``--overwrite``;
- the nearest existing parent folder must be writable (read-only folders are refused at once, not by a traceback).

Failures raise :class:`OutputPathError` (a ``ValueError``) whose message starts with the flag, e.g.
``--out: results.json would overwrite the --cases file``.

Disk-full errors of the writes themselves (``ENOSPC``, ``EFBIG``, ``EDQUOT``) are told apart by
:func:`disk_full_message`, so commands can print one line instead of a traceback; the writers are atomic
(:mod:`diasr_diffusers.utils.io`), so such a failure leaves no half-written file.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from .io import atomic_write_text

REGISTRY_NAME = ".diasr-outputs.json"
_DISK_FULL = {errno.ENOSPC: "the disk is full", errno.EFBIG: "the file is larger than this system allows"}
if hasattr(errno, "EDQUOT"):
    _DISK_FULL[errno.EDQUOT] = "the disk quota is exhausted"

PathLike = str | os.PathLike


class OutputPathError(ValueError):
    """An output path that would destroy data or cannot be written; the message names the flag."""


def resolve(path: PathLike) -> Path:
    """``path`` with ``~``, ``..`` and symlinks resolved (missing parts kept as given)."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def check_path_text(path: PathLike, flag: str) -> None:
    """Refuse (:class:`OutputPathError`) a path no file system takes: empty, a NUL byte, or a name or path past the
    system's length limits (``NAME_MAX`` per part, ``PATH_MAX`` in all)."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text.strip():
        raise OutputPathError(f"{flag}: the path is empty")
    if "\x00" in text:
        raise OutputPathError(f"{flag}: the path {text!r} holds a NUL byte")
    longest = max((len(os.fsencode(part)) for part in Path(text).parts), default=0)
    name_max, path_max = 255, 4096
    try:
        existing = next(p for p in (Path(text).absolute(), *Path(text).absolute().parents) if p.exists())
        name_max = os.pathconf(existing, "PC_NAME_MAX")
        path_max = os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError, StopIteration, AttributeError):
        pass
    if longest > name_max:
        raise OutputPathError(f"{flag}: a part of the path is {longest} bytes long; this file system allows {name_max}")
    if len(os.fsencode(os.path.abspath(text))) >= path_max:
        raise OutputPathError(f"{flag}: the path is longer than this system allows ({path_max} bytes)")


def _same(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    return folder in path.parents


def _registry(folder: Path) -> set[str]:
    try:
        names = json.loads((folder / REGISTRY_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    return {n for n in names if isinstance(n, str)} if isinstance(names, list) else set()


def is_ours(path: PathLike, _cache: dict[Path, set[str]] | None = None) -> bool:
    """Whether ``path``, or a folder above it, was claimed by a ``diasr`` command (:func:`claim_outputs`)."""
    cache = {} if _cache is None else _cache
    path = Path(os.path.abspath(path))
    for item in (path, *path.parents):
        if item.parent == item:
            return False
        if item.parent not in cache:
            cache[item.parent] = _registry(item.parent)
        if item.name in cache[item.parent]:
            return True
    return False


def claim_outputs(paths: Iterable[PathLike]) -> None:
    """Record ``paths`` as this project's outputs (call it after :func:`check_outputs`, just before writing), so a
    later run may replace them without ``--overwrite``. One small hidden file per folder, ``.diasr-outputs.json``.
    A claimed folder claims everything below it (a dataset's ``videos/``, a training run's ``pipeline/``)."""
    by_folder: dict[Path, set[str]] = {}
    for p in paths:
        p = Path(os.path.abspath(os.path.expanduser(os.fspath(p))))
        by_folder.setdefault(p.parent, set()).add(p.name)
    for folder, names in by_folder.items():
        known = _registry(folder)
        if names <= known:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / REGISTRY_NAME, json.dumps(sorted(known | names), indent=0) + "\n")


def check_writable_folder(folder: PathLike, flag: str) -> None:
    """The nearest existing ancestor of ``folder`` (itself included) is a writable folder; missing ones get made."""
    folder = Path(os.path.abspath(os.path.expanduser(os.fspath(folder))))
    for parent in (folder, *folder.parents):
        if parent.exists():
            if not parent.is_dir():
                raise OutputPathError(f"{flag}: the output would go under {parent}, which is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise OutputPathError(f"{flag}: the folder {parent} is not writable")
            return


def check_outputs(
    outputs: Sequence[tuple[str, PathLike]],
    inputs: Sequence[tuple[str, PathLike]] = (),
    *,
    overwrite: bool = False,
    flag: str = "--out",
    overwrite_hint: str = "pass --overwrite to replace it, or choose another name",
    folders: bool = False,
) -> list[Path]:
    """Refuse outputs that would land on an input, on each other, on a folder, or on a file we did not write.

    Args:
        outputs: ``(what, path)`` of every file the command will write; ``what`` names it in messages (e.g.
            ``"--out"``, ``"the bar chart"``).
        inputs: ``(what, path)`` of every file or folder the command reads (e.g. ``("--cases", "cases.json")``,
            ``("--videos", "videos/")``, ``("a reference image", ...)``). Missing inputs are ignored.
        overwrite: replace existing files that this project did not write (never inputs).
        flag: the flag the user can change (``--out``, ``--output-dir``), starting every message.
        overwrite_hint: what the user can do about an existing file we did not write (ends the message).
        folders: the outputs are folders the command replaces as a whole (a training run's ``pipeline/``): an
            existing folder is treated like an existing file instead of being refused.

    Returns:
        The resolved output paths, in order.
    """
    resolved_inputs = [(what, resolve(p)) for what, p in inputs if p is not None]
    resolved_inputs = [(what, p) for what, p in resolved_inputs if p.exists()]
    seen: dict[Path, str] = {}
    registries: dict[Path, set[str]] = {}
    checked_parents: set[Path] = set()
    result = []
    for what, given in outputs:
        check_path_text(given, flag if what == flag else f"{flag}: {what}")
        if os.path.islink(given) and not os.path.exists(given):
            raise OutputPathError(f"{flag}: {given} is a symbolic link that leads nowhere (broken, or a loop)")
        path = resolve(given)
        label = what if what == flag else f"{flag}: {what}"
        for other_path, other in seen.items():
            if _same(path, other_path):
                raise OutputPathError(f"{label} ({given}) is the same file as {other}: one would overwrite the other")
        seen[path] = what
        for in_what, in_path in resolved_inputs:
            if in_path.is_dir():
                if _same(path, in_path):
                    raise OutputPathError(f"{label} ({given}) is the {in_what} folder, an input")
                if _inside(path, in_path) and path.exists():
                    raise OutputPathError(
                        f"{label} ({given}) would overwrite {path.name} inside the {in_what} folder, an input"
                    )
            elif _same(path, in_path):
                named = f"the {in_what} file" if in_what.startswith("--") else f"{in_what} ({in_path.name})"
                raise OutputPathError(f"{label} ({given}) would overwrite {named}, an input")
        if path.is_dir() and not folders:
            raise OutputPathError(f"{label} ({given}) is a folder; give a file name")
        if path.exists() and not overwrite and not is_ours(path, registries):
            raise OutputPathError(f"{label} ({given}) exists and was not written by diasr; {overwrite_hint}")
        if path.parent not in checked_parents:
            check_writable_folder(path.parent, flag)
            checked_parents.add(path.parent)
        result.append(path)
    return result


def disk_full_message(err: BaseException) -> str | None:
    """One sentence for an ``OSError`` that means no space is left (full disk, file-size limit, quota), else ``None``."""
    if isinstance(err, OSError) and err.errno in _DISK_FULL:
        where = f" while writing {err.filename}" if err.filename else ""
        return f"{_DISK_FULL[err.errno]}{where} ({os.strerror(err.errno)}); nothing was half-written: free space and run again"
    return None
