"""diasr-diffusers: multi-subject video generation for Hugging Face Diffusers.

DiasR's subject-sparse bucketed attention and dual-modal ID routing (with Ingredients-style routing supervision),
as a Diffusers pipeline, drop-in attention processors and an exact sparse attention op.
"""

__version__ = "0.1.0.dev0"

from .ops import bucketed_attention
from .pipelines import DiasRPipeline, DiasRPipelineOutput
from .processors import SubjectRoutingState, SubjectSparseAttnProcessor, set_subject_sparse_attn_processor
from .routing import IDRouter

__all__ = [
    "DiasRPipeline",
    "DiasRPipelineOutput",
    "IDRouter",
    "SubjectRoutingState",
    "SubjectSparseAttnProcessor",
    "__version__",
    "bucketed_attention",
    "set_subject_sparse_attn_processor",
]
