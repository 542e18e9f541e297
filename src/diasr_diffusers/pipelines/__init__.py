"""Pipelines."""

from .pipeline_diasr_cogvideox import DiasRCogVideoXPipeline
from .pipeline_diasr_wan import DiasRPipeline, DiasRPipelineOutput
from .reference_styles import REFERENCE_STYLES, ReferenceStyle

__all__ = ["REFERENCE_STYLES", "DiasRCogVideoXPipeline", "DiasRPipeline", "DiasRPipelineOutput", "ReferenceStyle"]
