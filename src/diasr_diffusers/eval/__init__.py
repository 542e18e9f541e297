"""Evaluation: OpenS2V-Eval-compatible scores, identity matching and leakage, routing quality.

Heavy or optional dependencies (OpenCV, dlib, scipy, matplotlib, transformers models) are imported only by the
functions that need them; a missing one raises an ImportError naming the package to install.
"""

from .cases import EvalCase, load_cases
from .flicker import warp_residual
from .identity import (
    ClipTextScorer,
    DlibFaceEmbedder,
    FaceEmbedder,
    IdentityScores,
    InsightFaceEmbedder,
    SubjectEmbedder,
    TransformersImageEmbedder,
    cosine_similarity,
    identity_scores,
    leakage_margins,
    leakage_score,
    match_one_to_one,
)
from .motion import farneback_flows, motion_amplitude
from .scores import TOTAL_SCORE_WEIGHTS, aggregate_video_scores, total_score, total_score_metrics
from .video import VideoReadError, read_video, sample_frame_indices

__all__ = [
    "ClipTextScorer",
    "DlibFaceEmbedder",
    "EvalCase",
    "FaceEmbedder",
    "IdentityScores",
    "InsightFaceEmbedder",
    "SpriteEmbedder",
    "SubjectEmbedder",
    "SubjectLocation",
    "TOTAL_SCORE_WEIGHTS",
    "TransformersImageEmbedder",
    "VideoReadError",
    "aggregate_video_scores",
    "cosine_similarity",
    "crop_subject",
    "farneback_flows",
    "identity_scores",
    "leakage_margins",
    "leakage_score",
    "load_cases",
    "load_sprite_embedder",
    "locate_subject",
    "match_one_to_one",
    "motion_amplitude",
    "read_video",
    "label_iou",
    "routing_iou",
    "sample_frame_indices",
    "total_score",
    "total_score_metrics",
    "warp_residual",
]


_SPRITES = ("SpriteEmbedder", "SubjectLocation", "crop_subject", "load_sprite_embedder", "locate_subject")


def __getattr__(name: str):
    # eval.routing and eval.sprites need torch (sprites also diffusers); imported on first use so that `diasr --help`
    # (which reads eval.runner's metric names) does not pay for them (PEP 562).
    if name in ("label_iou", "routing_iou"):
        from . import routing

        return getattr(routing, name)
    if name in _SPRITES:
        from . import sprites

        return getattr(sprites, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
