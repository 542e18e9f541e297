"""Routing: identity anchors, the ID router, routing losses and mask helpers."""

from .losses import mask_loss, routing_cross_entropy
from .masks import masks_to_token_grid, normalize_masks, routing_labels_from_coverage, token_grid_factors
from .router import IDRouter, buckets_from_logits, chosen_log_prob, resolve_routed_layers

__all__ = [
    "IDRouter",
    "buckets_from_logits",
    "chosen_log_prob",
    "mask_loss",
    "masks_to_token_grid",
    "normalize_masks",
    "resolve_routed_layers",
    "routing_cross_entropy",
    "routing_labels_from_coverage",
    "token_grid_factors",
]
