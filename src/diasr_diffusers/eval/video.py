"""Reading generated videos into ``(F, H, W, 3)`` uint8 RGB arrays (imageio's FFmpeg reader)."""

from __future__ import annotations

import os

import numpy as np


class VideoReadError(RuntimeError):
    """A video file exists but cannot be decoded (truncated, not a video, zero frames)."""


def read_video(path: str | os.PathLike, max_frames: int | None = None) -> np.ndarray:
    """Decode every frame of a video file.

    Args:
        path: a video file that FFmpeg can read (``.mp4`` in OpenS2V-Eval).
        max_frames: stop after this many frames (``None`` = all).

    Returns:
        ``(F, H, W, 3)`` uint8 RGB frames, the same layout OpenS2V-Eval gets from decord.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        VideoReadError: the file cannot be decoded or holds no frames.

    Example:
        >>> frames = read_video("outputs/singleface_3.mp4")  # doctest: +SKIP
        >>> frames.shape  # doctest: +SKIP
        (81, 480, 832, 3)
    """
    import imageio.v2 as imageio

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video not found: {path}")
    frames = []
    try:
        with imageio.get_reader(path, format="FFMPEG") as reader:
            for frame in reader:
                frames.append(np.asarray(frame)[..., :3])
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except Exception as err:  # imageio/ffmpeg raise a zoo of types for broken files
        from ..data._io import ffmpeg_error_summary

        raise VideoReadError(f"cannot decode {path}: {type(err).__name__}: {ffmpeg_error_summary(err)}") from err
    if not frames:
        raise VideoReadError(f"cannot decode {path}: no frames")
    video = np.stack(frames)
    if video.dtype != np.uint8:
        raise VideoReadError(f"cannot decode {path}: unexpected frame dtype {video.dtype}")
    return video


def sample_frame_indices(num_frames: int, num_samples: int | None) -> np.ndarray:
    """Evenly spaced frame indices including the first and last frame (OpenS2V-Eval's ``np.linspace`` sampling).

    Example:
        >>> sample_frame_indices(81, 5).tolist()
        [0, 20, 40, 60, 80]
    """
    if num_frames < 1:
        raise ValueError(f"`num_frames` must be >= 1, got {num_frames}")
    if num_samples is None or num_samples >= num_frames:
        return np.arange(num_frames)
    if num_samples < 1:
        raise ValueError(f"`num_samples` must be >= 1 or None, got {num_samples}")
    return np.linspace(0, num_frames - 1, num_samples, dtype=int)
