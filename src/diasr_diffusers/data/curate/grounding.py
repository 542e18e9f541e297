"""Subject boxes from phrases on the annotated frame (the clip's first frame).

Offline default, :class:`FaceBodyGrounder`: a phrase naming a person ("man", "woman", "girl", ...) gets the body box
below a dlib face (one face per person phrase, largest faces first). It is a heuristic for footage without a
detector model; the real detector is GroundingDINO (:class:`~diasr_diffusers.data.curate.hub.GroundingDinoGrounder`,
OpenS2V's box/text thresholds 0.25/0.25). Boxes a captions file gives are used as they are and skip both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .faces import DlibFaces

Box = tuple[float, float, float, float]

PERSON_WORDS = (
    "person", "people", "man", "men", "woman", "women", "boy", "girl", "child", "kid", "guy", "lady", "gentleman",
    "pedestrian", "individual", "character", "actor", "actress", "player", "rider", "cyclist", "biker", "driver",
)  # fmt: skip
_PERSON = re.compile(r"\b(" + "|".join(PERSON_WORDS) + r")\b", re.IGNORECASE)


def names_a_person(phrase: str) -> bool:
    """Whether a phrase names a person (whole-word match against :data:`PERSON_WORDS`)."""
    return bool(_PERSON.search(phrase))


@dataclass
class FaceBodyGrounder:
    """``ground(frame, phrases) -> [(box, score) | None per phrase]``: person phrases get a body box under a face.

    The body box spans ``body_width`` face widths and reaches ``body_height`` face heights down from the top of the
    face (an upper body at these defaults), clipped to the frame.
    """

    faces: DlibFaces = field(default_factory=DlibFaces)
    body_width: float = 3.0
    body_height: float = 6.0
    name: str = "dlib-face-body"

    def ground(self, frame: np.ndarray, phrases: list[str]) -> list[tuple[Box, float] | None]:
        h, w = frame.shape[:2]
        found = sorted(self.faces.detect(frame), key=lambda f: -(f[2] - f[0]) * (f[3] - f[1]))
        out: list[tuple[Box, float] | None] = []
        for phrase in phrases:
            if not names_a_person(phrase) or not found:
                out.append(None)
                continue
            x1, y1, x2, y2, score = found.pop(0)
            fw, fh, cx = x2 - x1, y2 - y1, (x1 + x2) / 2
            box = (max(0.0, cx - fw * self.body_width / 2), max(0.0, y1 - 0.3 * fh),
                   min(float(w), cx + fw * self.body_width / 2), min(float(h), y1 + fh * self.body_height))  # fmt: skip
            out.append((box, float(score)))
        return out


@dataclass
class NoGrounder:
    """Boxes only from the captions file; every other phrase is dropped with the reason "no box"."""

    name: str = "captions-file-boxes"
    _unused: Any = None

    def ground(self, frame: np.ndarray, phrases: list[str]) -> list[tuple[Box, float] | None]:
        return [None] * len(phrases)
