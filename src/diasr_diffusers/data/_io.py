"""File helpers shared by the data package: atomic writes and video I/O through imageio-ffmpeg."""

from __future__ import annotations

import io
import os
import re
import zipfile
from collections.abc import Mapping, Sequence

import numpy as np

from ..utils.io import atomic_path, atomic_write_bytes, atomic_write_text

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "ffmpeg_error_summary",
    "npz_bytes",
    "probe_video",
    "read_video_frames",
    "write_video",
]

# A fixed timestamp makes zip archives (``.npz``) byte-identical across runs; numpy's own ``savez`` stamps the
# current time into every member.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """A deterministic, compressed ``.npz`` (readable by ``np.load``) of ``arrays``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


_FFMPEG_NOISE = re.compile(r"^\[[^\]]*@ 0x[0-9a-f]+\]\s*")


def ffmpeg_error_summary(err: BaseException) -> str:
    """One line for an ffmpeg failure: imageio-ffmpeg's errors carry ffmpeg's whole banner and build configuration.

    Keeps the error's first line and ffmpeg's last stderr line (the actual reason), e.g. ``"Could not load meta
    information: Error opening input files: Invalid data found when processing input"``.
    """
    text = str(err).strip()
    head, _, stderr = text.partition("=== stderr ===")
    first = next((line.strip() for line in head.splitlines() if line.strip()), type(err).__name__)
    lines = [_FFMPEG_NOISE.sub("", line).strip() for line in stderr.splitlines()]
    lines = [line for line in lines if line]
    return f"{first}: {lines[-1]}" if lines and lines[-1] != first else first


def probe_video(path: str | os.PathLike) -> tuple[int, int, int, float]:
    """``(num_frames, height, width, fps)`` of a video file (the frame count is exact: ffmpeg walks the stream)."""
    import imageio_ffmpeg

    gen = imageio_ffmpeg.read_frames(str(path))
    try:
        meta = next(gen)
    finally:
        gen.close()
    width, height = meta["size"]
    num_frames, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    return int(num_frames), int(height), int(width), float(meta.get("fps") or 0.0)


def read_video_frames(path: str | os.PathLike, indices: Sequence[int]) -> np.ndarray:
    """Decode the frames at ``indices`` (any order, repeats allowed) as ``(len(indices), H, W, 3)`` uint8 RGB.

    Decoding is sequential and stops after the last requested frame, so clips near the start of a long video are
    cheap. Raises ``ValueError`` if the video has fewer frames than requested.
    """
    import imageio_ffmpeg

    if len(indices) == 0:
        raise ValueError("`indices` must name at least one frame")
    wanted = sorted(set(int(i) for i in indices))
    if wanted[0] < 0:
        raise ValueError(f"frame indices must be >= 0, got {wanted[0]}")
    last = wanted[-1]
    gen = imageio_ffmpeg.read_frames(str(path))
    found: dict[int, np.ndarray] = {}
    try:
        meta = next(gen)
        width, height = meta["size"]
        targets = set(wanted)
        for i, raw in enumerate(gen):
            if i in targets:
                found[i] = np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3)
            if i >= last:
                break
    finally:
        gen.close()
    if len(found) != len(wanted):
        raise ValueError(f"{path}: needed frame {last} but the video has only {max(found, default=-1) + 1} frames")
    return np.stack([found[int(i)] for i in indices])


def write_video(
    path: str | os.PathLike, frames: np.ndarray, fps: float, *, crf: int = 12, pix_fmt: str = "yuv444p"
) -> None:
    """Write ``(F, H, W, 3)`` uint8 frames as an H.264 mp4, atomically.

    ``yuv444p`` keeps full colour resolution (small sprites and thin stripes would bleed colour under 4:2:0);
    pass ``pix_fmt="yuv420p"`` for maximum player compatibility.
    """
    import imageio_ffmpeg

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"`frames` must be (F, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    _, height, width, _ = frames.shape
    with atomic_path(path) as tmp:
        writer = imageio_ffmpeg.write_frames(
            str(tmp),
            (width, height),
            fps=fps,
            codec="libx264",
            pix_fmt_out=pix_fmt,
            quality=None,
            macro_block_size=1,
            ffmpeg_log_level="error",
            # One encoder thread and no encoder tag in the stream: the same frames give the same bytes.
            output_params=["-crf", str(crf), "-threads", "1", "-bitexact", "-x264-params", "log-level=error"],
        )
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
