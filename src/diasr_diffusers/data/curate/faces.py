"""Faces: dlib's detector on the annotated frame (HOG, compiled into dlib; no file needed) with optional 128-d
identity embeddings (ResNet weights inside the ``face-recognition-models`` wheel, as the identity metric uses)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class DlibFaces:
    """``detect(frame) -> [(x1, y1, x2, y2, score), ...]``; ``embed`` adds dlib descriptors for person subjects.

    Args:
        upsample: the detector upsamples the frame this many times (1 finds faces down to ~40 px).
    """

    upsample: int = 1
    name: str = "dlib-hog"
    _detector: Any = field(default=None, repr=False)
    _embedder: Any = field(default=None, repr=False)

    def detect(self, frame: np.ndarray) -> list[tuple[float, float, float, float, float]]:
        import dlib

        if self._detector is None:
            self._detector = dlib.get_frontal_face_detector()
        rects, scores, _ = self._detector.run(np.ascontiguousarray(frame), self.upsample, 0.0)
        return [(float(r.left()), float(r.top()), float(r.right()), float(r.bottom()), round(float(s), 3))
                for r, s in zip(rects, scores)]  # fmt: skip

    def embed(self, frame: np.ndarray) -> list[tuple[tuple[float, float, float, float], np.ndarray]]:
        """Face boxes with their 128-d dlib descriptors (for identity checks across references)."""
        if self._embedder is None:
            from ...eval.identity import DlibFaceEmbedder

            self._embedder = DlibFaceEmbedder(upsample=self.upsample)
        return self._embedder.detect_and_embed(frame)
