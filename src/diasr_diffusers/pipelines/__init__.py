"""Pipelines."""

from .pipeline_diasr_cogvideox import DiasRCogVideoXPipeline
from .pipeline_diasr_hunyuan_video15 import DiasRHunyuanVideo15Pipeline
from .pipeline_diasr_wan import DiasRPipeline, DiasRPipelineOutput
from .reference_styles import REFERENCE_STYLES, ReferenceStyle

__all__ = [
    "REFERENCE_STYLES",
    "DiasRCogVideoXPipeline",
    "DiasRHunyuanVideo15Pipeline",
    "DiasRPipeline",
    "DiasRPipelineOutput",
    "ReferenceStyle",
]
