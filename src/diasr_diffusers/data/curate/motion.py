"""Motion score: OpenCV Farneback optical flow, the flow OpenS2V's stage-1 scripts use.

video-dataset-scripts (``modules/optical_flow.py``) runs Farneback with ``pyr_scale=0.5, levels=3, winsize=15,
iterations=3, poly_n=5, poly_sigma=1.2`` (the same numbers as :data:`diasr_diffusers.eval.motion.FARNEBACK_PARAMS`),
then takes a *signed* mean, so opposite motions cancel. For filtering we keep the same flow but report the mean
flow *magnitude* (a crowd walking both ways is motion), in pixels per frame at an analysis width of 256 pixels,
so the number does not depend on the source resolution. The signed OpenS2V-style mean is stored too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...eval.motion import farneback_flows
from .frames import resize_max_side

ANALYSIS_WIDTH = 256


@dataclass
class FarnebackMotion:
    """``score(frames) -> {"motion": mean |flow|, "motion_signed": OpenS2V-style signed mean, "motion_pairs": n}``.

    Flow is computed on ``num_pairs`` pairs of consecutive frames spread evenly over the clip (consecutive, so the
    unit stays "pixels per frame"), downscaled to ``ANALYSIS_WIDTH`` wide.
    """

    num_pairs: int = 8
    name: str = "opencv-farneback"

    def score(self, frames: np.ndarray) -> dict:
        n = len(frames)
        if n < 2:
            return {"motion": 0.0, "motion_signed": 0.0, "motion_pairs": 0}
        starts = np.unique(np.linspace(0, n - 2, min(self.num_pairs, n - 1)).round().astype(int))
        mags, signed = [], []
        for s in starts:
            pair = np.stack([_to_width(frames[s]), _to_width(frames[s + 1])])
            flow = farneback_flows(pair, opens2v_gray=False)[0]
            mags.append(float(np.linalg.norm(flow, axis=-1).mean()))
            signed.append(float(flow.mean()))
        return {
            "motion": round(float(np.mean(mags)), 4),
            "motion_signed": round(float(np.mean(signed)), 4),
            "motion_pairs": int(len(starts)),
        }


def _to_width(frame: np.ndarray) -> np.ndarray:
    import cv2

    h, w = frame.shape[:2]
    if w == ANALYSIS_WIDTH:
        return frame
    return cv2.resize(frame, (ANALYSIS_WIDTH, max(1, round(h * ANALYSIS_WIDTH / w))), interpolation=cv2.INTER_AREA)


__all__ = ["ANALYSIS_WIDTH", "FarnebackMotion", "resize_max_side"]
