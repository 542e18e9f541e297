"""diasr-diffusers: multi-subject video generation for Hugging Face Diffusers.

DiasR's subject-sparse bucketed attention and dual-modal ID routing (with Ingredients-style routing supervision),
as a Diffusers pipeline, drop-in attention processors and an exact sparse attention op.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

__version__ = "0.1.0.dev0"

# Public names are imported on first use (PEP 562): importing torch and diffusers takes seconds, and the `diasr`
# command line must answer `--help` (and reject bad arguments) without paying for them.
_LAZY = {
    "DiasRAutoPipeline": ".pipelines",
    "DiasRCogVideoXPipeline": ".pipelines",
    "DiasRHunyuanVideo15Pipeline": ".pipelines",
    "DiasRLTXPipeline": ".pipelines",
    "DiasRPipeline": ".pipelines",
    "DiasRPipelineOutput": ".pipelines",
    "IDRouter": ".routing",
    "IngredientsPipeline": ".pipelines",
    "IngredientsPipelineOutput": ".pipelines",
    "IngredientsTransformer3DModel": ".models",
    "SubjectRoutingState": ".processors",
    "SubjectSparseAttnProcessor": ".processors",
    "bucketed_attention": ".ops",
    "load_pipeline": ".pipelines",
    "set_subject_sparse_attn_processor": ".processors",
}

# A literal list (not derived from _LAZY) so that linters and type checkers see the public names.
__all__ = [
    "DiasRAutoPipeline",
    "DiasRCogVideoXPipeline",
    "DiasRHunyuanVideo15Pipeline",
    "DiasRLTXPipeline",
    "DiasRPipeline",
    "DiasRPipelineOutput",
    "IDRouter",
    "IngredientsPipeline",
    "IngredientsPipelineOutput",
    "IngredientsTransformer3DModel",
    "SubjectRoutingState",
    "SubjectSparseAttnProcessor",
    "__version__",
    "bucketed_attention",
    "load_pipeline",
    "set_subject_sparse_attn_processor",
]

if TYPE_CHECKING:
    from .models import IngredientsTransformer3DModel
    from .ops import bucketed_attention
    from .pipelines import (
        DiasRAutoPipeline,
        DiasRCogVideoXPipeline,
        DiasRHunyuanVideo15Pipeline,
        DiasRLTXPipeline,
        DiasRPipeline,
        DiasRPipelineOutput,
        IngredientsPipeline,
        IngredientsPipelineOutput,
        load_pipeline,
    )
    from .processors import SubjectRoutingState, SubjectSparseAttnProcessor, set_subject_sparse_attn_processor
    from .routing import IDRouter


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
