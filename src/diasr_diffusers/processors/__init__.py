"""Attention processors: a model-agnostic routing core plus one thin adapter per model family."""

from .cogvideox import CogVideoXSubjectSparseAttnProcessor, set_cogvideox_subject_sparse_attn_processor
from .core import (
    ROUTING_MODES,
    RoutedAttnProcessorBase,
    SubjectRoutingState,
    TextSegments,
    install_subject_processors,
)
from .wan import SubjectSparseAttnProcessor, set_subject_sparse_attn_processor

__all__ = [
    "ROUTING_MODES",
    "CogVideoXSubjectSparseAttnProcessor",
    "RoutedAttnProcessorBase",
    "SubjectRoutingState",
    "SubjectSparseAttnProcessor",
    "TextSegments",
    "install_subject_processors",
    "set_cogvideox_subject_sparse_attn_processor",
    "set_subject_sparse_attn_processor",
]
