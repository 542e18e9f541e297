"""Pipelines: one DiasR pipeline per model family, the Ingredients pipeline, and the loader that picks the family of
a checkpoint (:mod:`.loading`).

Names are imported on first use (PEP 562), as in the top-level package: the loader's checks (and ``diasr --help``)
must not pay for importing torch, diffusers and every family's model code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_LAZY = {
    "REFERENCE_STYLES": ".reference_styles",
    "DiasRAutoPipeline": ".loading",
    "DiasRCogVideoXPipeline": ".pipeline_diasr_cogvideox",
    "DiasRHunyuanVideo15Pipeline": ".pipeline_diasr_hunyuan_video15",
    "DiasRLTXPipeline": ".pipeline_diasr_ltx",
    "DiasRPipeline": ".pipeline_diasr_wan",
    "DiasRPipelineOutput": ".subjects",
    "IngredientsPipeline": ".pipeline_ingredients",
    "IngredientsPipelineOutput": ".pipeline_ingredients",
    "ReferenceStyle": ".reference_styles",
    "UsageError": ".loading",
    "check_model_fits": ".loading",
    "load_pipeline": ".loading",
}

__all__ = [
    "REFERENCE_STYLES",
    "DiasRAutoPipeline",
    "DiasRCogVideoXPipeline",
    "DiasRHunyuanVideo15Pipeline",
    "DiasRLTXPipeline",
    "DiasRPipeline",
    "DiasRPipelineOutput",
    "IngredientsPipeline",
    "IngredientsPipelineOutput",
    "ReferenceStyle",
    "UsageError",
    "check_model_fits",
    "load_pipeline",
]

if TYPE_CHECKING:
    from .loading import DiasRAutoPipeline, UsageError, check_model_fits, load_pipeline
    from .pipeline_diasr_cogvideox import DiasRCogVideoXPipeline
    from .pipeline_diasr_hunyuan_video15 import DiasRHunyuanVideo15Pipeline
    from .pipeline_diasr_ltx import DiasRLTXPipeline
    from .pipeline_diasr_wan import DiasRPipeline
    from .pipeline_ingredients import IngredientsPipeline, IngredientsPipelineOutput
    from .reference_styles import REFERENCE_STYLES, ReferenceStyle
    from .subjects import DiasRPipelineOutput


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
