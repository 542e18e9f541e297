"""Decoding a frame range of a source video, and the small image helpers the stages share."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .._io import ffmpeg_error_summary


class BadVideoError(RuntimeError):
    """A source video cannot be used (unreadable, unknown codec, zero frames); the message is the report's reason."""


@dataclass(frozen=True)
class VideoInfo:
    """What ffmpeg says about a source video. ``num_frames`` is exact (ffmpeg walks the whole stream)."""

    path: str
    num_frames: int
    height: int
    width: int
    fps: float

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps if self.fps > 0 else 0.0


def probe(path: str | os.PathLike) -> VideoInfo:
    """Probe a source video; raise :class:`BadVideoError` with a one-line reason if it cannot be decoded."""
    import imageio_ffmpeg

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise BadVideoError(f"not a file: {path}")
    try:
        gen = imageio_ffmpeg.read_frames(path)
        try:
            meta = next(gen)
        finally:
            gen.close()
        num_frames, _ = imageio_ffmpeg.count_frames_and_secs(path)
    except Exception as err:  # imageio-ffmpeg raises RuntimeError/OSError/StopIteration for broken input
        raise BadVideoError(f"unreadable video ({ffmpeg_error_summary(err)})") from None
    width, height = meta["size"]
    fps = float(meta.get("fps") or 0.0)
    if int(num_frames) <= 0:
        raise BadVideoError("the video holds no decodable frames")
    if fps <= 0:
        raise BadVideoError("the video reports no frame rate")
    return VideoInfo(path, int(num_frames), int(height), int(width), fps)


def read_range(path: str | os.PathLike, start: int, end: int, step: int = 1) -> np.ndarray:
    """Frames ``start, start+step, ... < end`` as ``(F, H, W, 3)`` uint8 RGB, decoding sequentially from the start.

    Sequential decoding is exact for every container (seeking by timestamp is not, for AVI/XviD with B-frames).
    Raises :class:`BadVideoError` when the stream ends before ``start`` or ffmpeg fails mid-way.
    """
    import imageio_ffmpeg

    if not 0 <= start < end or step < 1:
        raise ValueError(f"need 0 <= start < end and step >= 1, got start={start}, end={end}, step={step}")
    frames = []
    try:
        gen = imageio_ffmpeg.read_frames(os.fspath(path))
        try:
            meta = next(gen)
            width, height = meta["size"]
            for i, raw in enumerate(gen):
                if i >= end:
                    break
                if i >= start and (i - start) % step == 0:
                    frames.append(np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3))
        finally:
            gen.close()
    except Exception as err:
        raise BadVideoError(f"decoding failed ({ffmpeg_error_summary(err)})") from None
    if not frames:
        raise BadVideoError(f"no frames decoded in [{start}, {end})")
    return np.stack(frames)


def resize_max_side(image: np.ndarray, max_side: int) -> np.ndarray:
    """Downscale so the long side is at most ``max_side`` (area interpolation); no-op for smaller images."""
    import cv2

    h, w = image.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return image
    return cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def box_iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """IoU of two ``xyxy`` boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks of the same shape."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight ``xyxy`` (exclusive max) box of a boolean mask, or None if it is empty."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
