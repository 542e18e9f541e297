"""Masks from boxes on the annotated frame, propagated over every frame of the clip.

``segment(frames, boxes) -> (masks (N, F, H, W) bool, scores [N])``: one track per box, frame 0 is the annotated
frame. Offline default, :class:`GrabCutFlowSegmenter`: OpenCV GrabCut initialised with the box on frame 0, then
each mask is carried to the next frame by backward Farneback flow (``mask_t(x) = mask_{t-1}(x + flow_{t->t-1}(x))``).
The model a GPU user runs is SAM 2.1 video (:class:`~diasr_diffusers.data.curate.hub.Sam2VideoSegmenter`): box
prompts on frame 0 and ``propagate_in_video_iterator``, as OpenS2V's masks come from SAM 2.1 box prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...eval.motion import FARNEBACK_PARAMS
from .frames import resize_max_side


@dataclass
class GrabCutFlowSegmenter:
    """GrabCut on the annotated frame + flow-warped propagation, at ``max_side`` analysis resolution.

    Args:
        max_side: long side of the working resolution (masks are resized back to the frame size).
        iterations: GrabCut iterations.
    """

    max_side: int = 384
    iterations: int = 4
    name: str = "opencv-grabcut+farneback-warp"

    def segment(self, frames: np.ndarray, boxes: list[tuple[float, float, float, float]]) -> tuple[np.ndarray, list]:
        import cv2

        num, (h, w) = len(boxes), frames.shape[1:3]
        small = np.stack([resize_max_side(fr, self.max_side) for fr in frames])
        sh, sw = small.shape[1:3]
        sx, sy = sw / w, sh / h
        first = np.zeros((num, sh, sw), dtype=bool)
        scores = []
        for i, (x1, y1, x2, y2) in enumerate(boxes):
            rect = (int(x1 * sx), int(y1 * sy), max(2, int((x2 - x1) * sx)), max(2, int((y2 - y1) * sy)))
            rect = (min(rect[0], sw - 2), min(rect[1], sh - 2), min(rect[2], sw - rect[0]), min(rect[3], sh - rect[1]))
            mask = np.zeros((sh, sw), np.uint8)
            bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
            try:
                cv2.grabCut(np.ascontiguousarray(small[0][..., ::-1]), mask, rect, bgd, fgd, self.iterations,
                            cv2.GC_INIT_WITH_RECT)  # fmt: skip
                fg = (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
            except cv2.error:  # a degenerate box (all one colour): fall back to the box itself
                fg = np.zeros((sh, sw), bool)
            if not fg.any():
                fg = np.zeros((sh, sw), bool)
                fg[rect[1] : rect[1] + rect[3], rect[0] : rect[0] + rect[2]] = True
            first[i] = fg
            # GrabCut has no confidence; report how much of the box it kept (1.0 = the box itself).
            scores.append(round(float(fg.sum() / max(1, rect[2] * rect[3])), 4))
        return self.propagate(frames, first, small=small), scores

    def propagate(self, frames: np.ndarray, first: np.ndarray, small: np.ndarray | None = None) -> np.ndarray:
        """Carry masks ``(N, h, w)`` of frame 0 over every frame: ``(N, F, H, W)`` bool at the frames' size.

        ``first`` may be at the frames' size or at the working size."""
        import cv2

        f, h, w = frames.shape[:3]
        if small is None:
            small = np.stack([resize_max_side(fr, self.max_side) for fr in frames])
        sh, sw = small.shape[1:3]
        num = len(first)
        if first.shape[1:] != (sh, sw):
            first = np.stack([cv2.resize(m.astype(np.uint8), (sw, sh), interpolation=cv2.INTER_NEAREST) > 0
                              for m in first]) if num else np.zeros((0, sh, sw), bool)  # fmt: skip
        tracks = np.zeros((num, f, sh, sw), dtype=bool)
        tracks[:, 0] = first
        gray = [cv2.cvtColor(np.ascontiguousarray(fr), cv2.COLOR_RGB2GRAY) for fr in small]
        grid_x, grid_y = np.meshgrid(np.arange(sw, dtype=np.float32), np.arange(sh, dtype=np.float32))
        for t in range(1, f):
            flow = cv2.calcOpticalFlowFarneback(gray[t], gray[t - 1], None, **FARNEBACK_PARAMS)
            map_x, map_y = grid_x + flow[..., 0], grid_y + flow[..., 1]
            for i in range(num):
                prev = tracks[i, t - 1].astype(np.float32)
                tracks[i, t] = cv2.remap(prev, map_x, map_y, cv2.INTER_LINEAR, borderValue=0) > 0.5
        if (sh, sw) != (h, w):
            full = np.zeros((num, f, h, w), dtype=bool)
            for i in range(num):
                for t in range(f):
                    full[i, t] = cv2.resize(tracks[i, t].astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
            tracks = full
        return tracks
