"""Routing: identity anchors, the ID router, routing losses and mask helpers."""

from .masks import masks_to_token_grid, routing_labels_from_coverage, token_grid_factors

__all__ = ["masks_to_token_grid", "routing_labels_from_coverage", "token_grid_factors"]
