"""Attention processors: a model-agnostic routing core plus one thin adapter per model family.

:func:`set_subject_sparse_attn_processor` installs the right adapter on any supported transformer (the family
registry, :mod:`diasr_diffusers.families`); the per-family installers are kept as aliases that also check the family.
"""

from .cogvideox import CogVideoXSubjectSparseAttnProcessor, set_cogvideox_subject_sparse_attn_processor
from .core import (
    ROUTING_MODES,
    RoutedAttnProcessorBase,
    SubjectRoutingState,
    TextSegments,
    install_subject_processors,
    set_subject_sparse_attn_processor,
)
from .hunyuan_video15 import (
    HunyuanVideo15SubjectSparseAttnProcessor,
    set_hunyuan_video15_subject_sparse_attn_processor,
)
from .ltx import LTXSubjectSparseAttnProcessor, set_ltx_subject_sparse_attn_processor
from .wan import SubjectSparseAttnProcessor, set_wan_subject_sparse_attn_processor

__all__ = [
    "ROUTING_MODES",
    "CogVideoXSubjectSparseAttnProcessor",
    "HunyuanVideo15SubjectSparseAttnProcessor",
    "LTXSubjectSparseAttnProcessor",
    "RoutedAttnProcessorBase",
    "SubjectRoutingState",
    "SubjectSparseAttnProcessor",
    "TextSegments",
    "install_subject_processors",
    "set_cogvideox_subject_sparse_attn_processor",
    "set_hunyuan_video15_subject_sparse_attn_processor",
    "set_ltx_subject_sparse_attn_processor",
    "set_subject_sparse_attn_processor",
    "set_wan_subject_sparse_attn_processor",
]
