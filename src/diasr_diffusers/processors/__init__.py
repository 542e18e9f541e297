"""Attention processors: a model-agnostic routing core plus one thin adapter per model family."""

from .core import ROUTING_MODES, SubjectRoutingState, TextSegments
from .wan import SubjectSparseAttnProcessor, set_subject_sparse_attn_processor

__all__ = [
    "ROUTING_MODES",
    "SubjectRoutingState",
    "SubjectSparseAttnProcessor",
    "TextSegments",
    "set_subject_sparse_attn_processor",
]
