"""Pipelines."""

from .pipeline_diasr_cogvideox import DiasRCogVideoXPipeline
from .pipeline_diasr_hunyuan_video15 import DiasRHunyuanVideo15Pipeline
from .pipeline_diasr_ltx import DiasRLTXPipeline
from .pipeline_diasr_wan import DiasRPipeline, DiasRPipelineOutput
from .pipeline_ingredients import IngredientsPipeline, IngredientsPipelineOutput
from .reference_styles import REFERENCE_STYLES, ReferenceStyle

__all__ = [
    "REFERENCE_STYLES",
    "DiasRCogVideoXPipeline",
    "DiasRHunyuanVideo15Pipeline",
    "DiasRLTXPipeline",
    "DiasRPipeline",
    "DiasRPipelineOutput",
    "IngredientsPipeline",
    "IngredientsPipelineOutput",
    "ReferenceStyle",
]
