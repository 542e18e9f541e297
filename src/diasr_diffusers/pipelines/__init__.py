"""Pipelines."""

from .pipeline_diasr_wan import DiasRPipeline, DiasRPipelineOutput

__all__ = ["DiasRPipeline", "DiasRPipelineOutput"]
