"""Temporal consistency from optical flow: warp residual and brightness flicker (our metrics, not OpenS2V's).

The warp residual asks "how much of frame t+1 is *not* explained by moving frame t": every pixel of frame t is
looked up in frame t+1 at ``p + flow(p)``; the mean absolute difference over the pixels whose target stays inside
the frame is what motion cannot explain (flicker, popping, identity morphing). Smooth motion scores near 0 however
large it is, which is what separates it from MotionAmplitude.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._deps import require
from .motion import _check_frames, farneback_flows


def warp_residual(frames: np.ndarray | Sequence[np.ndarray]) -> dict[str, float]:
    """Flow-compensated temporal residual and global brightness flicker, both in ``[0, 1]`` (lower is steadier).

    Args:
        frames: ``(F, H, W, 3)`` uint8 RGB frames.

    Returns:
        ``{"WarpResidual": mean |gray_t - warp(gray_{t+1})| / 255,
        "BrightnessFlicker": mean |mean(gray_{t+1}) - mean(gray_t)| / 255}``.

    Example:
        >>> scores = warp_residual(read_video("outputs/multiface_2.mp4"))  # doctest: +SKIP
        >>> scores["WarpResidual"]  # doctest: +SKIP
        0.0132
    """
    cv2 = require("cv2")
    video = _check_frames(frames)
    gray = np.stack([cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in video]).astype(np.float32)
    flows = farneback_flows(video, opens2v_gray=False)
    height, width = gray.shape[1:]
    grid_x, grid_y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    residuals = []
    for t, flow in enumerate(flows):
        map_x = grid_x + flow[..., 0]
        map_y = grid_y + flow[..., 1]
        warped = cv2.remap(gray[t + 1], map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        # Pixels that flow out of the frame have no counterpart; counting them would punish camera pans.
        valid = (map_x >= 0) & (map_x <= width - 1) & (map_y >= 0) & (map_y <= height - 1)
        if valid.any():
            residuals.append(float(np.abs(gray[t] - warped)[valid].mean()) / 255.0)
    means = gray.reshape(len(gray), -1).mean(axis=1)
    return {
        "WarpResidual": float(np.mean(residuals)) if residuals else float("nan"),
        "BrightnessFlicker": float(np.mean(np.abs(np.diff(means)))) / 255.0,
    }
