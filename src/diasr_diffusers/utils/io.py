"""Atomic file writes: a reader (or a crash) never sees a half-written file."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Temp files of `atomic_path` are named `.<target name>.diasr-tmp-<host>-<pid>-<random><suffix>` so that the ones a
# killed process left behind (SIGKILL, power loss) can be recognised as ours and removed safely later.
_TMP_MARKER = "diasr-tmp"
_TMP_PATTERN = re.compile(r"^\..+\.diasr-tmp-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-")
# A temp file from another machine (shared file system) cannot be checked for a live writer: only remove it when
# nothing has touched it for this long.
FOREIGN_TEMP_MAX_AGE_S = 24 * 3600
_swept_folders: set[str] = set()


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # exists (owned by someone else), or not a pid we can judge: keep its file
    return True


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files of :func:`atomic_path` in ``folder`` whose writer is gone; return what was removed.

    A temp file is stale when its process (on this host) no longer runs, or, for one written on another host, when
    it is older than ``FOREIGN_TEMP_MAX_AGE_S``. Files that are not ours are never touched.
    """
    removed = []
    host, now = _host_tag(), time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TMP_PATTERN.match(entry.name)
        if match is None or not entry.is_file(follow_symlinks=False):
            continue
        try:
            if match["host"] == host:
                stale = int(match["pid"]) != os.getpid() and not _pid_alive(int(match["pid"]))
            else:
                stale = now - entry.stat(follow_symlinks=False).st_mtime > FOREIGN_TEMP_MAX_AGE_S
            if stale:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue  # raced with another cleaner or no permission: not our problem to report
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one ``os.replace``.

    The temporary name keeps ``path``'s suffix so writers that pick a format from the extension (ffmpeg, PIL) work.
    On error the temporary file is removed and ``path`` is left as it was. A temp file left by a killed process is
    removed by the next ``atomic_path`` into the same folder (see :func:`remove_stale_temp_files`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Once per folder and process: the first write to a folder clears what killed writers left there.
    folder_key = os.path.abspath(path.parent)
    if folder_key not in _swept_folders:
        remove_stale_temp_files(path.parent)
        _swept_folders.add(folder_key)
    prefix = f".{path.name}.{_TMP_MARKER}-{_host_tag()}-{os.getpid()}-"
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the result the permissions a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_video_atomic(frames: Any, path: str | os.PathLike, fps: int) -> None:
    """Diffusers' ``export_to_video`` into a temp file beside ``path``, then rename: never a half-written video.
    ``frames``: ``(F, H, W, 3)`` uint8 or float in [0, 1], or a list of such frames (or PIL images)."""
    import numpy as np
    from diffusers.utils import export_to_video

    if isinstance(fps, bool) or not isinstance(fps, int) or fps < 1:
        raise ValueError(f"`fps` must be a positive integer, got {fps!r}")
    frames = list(frames)
    if not frames:
        raise ValueError("no frames to write")
    if isinstance(frames[0], np.ndarray) and frames[0].dtype == np.uint8:
        frames = [f.astype(np.float32) / 255.0 for f in frames]  # export_to_video scales arrays by 255
    with atomic_path(path) as tmp:
        export_to_video(frames, str(tmp), fps=fps)
        if tmp.stat().st_size == 0:  # ffmpeg can fail without raising; never replace a video with nothing
            raise RuntimeError(f"writing {path} produced an empty file")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path``; on success it replaces ``path`` (a folder) in one rename.

    On error the temporary folder is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
