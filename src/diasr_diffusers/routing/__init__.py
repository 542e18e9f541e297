"""Routing: identity anchors, the ID router, routing losses and mask helpers."""

from .ingredients_router import IngredientsIDRouter, majority_identity
from .losses import ingredients_routing_loss, mask_loss, routing_cross_entropy
from .masks import (
    check_layout_masks,
    layout_labels,
    masks_to_token_grid,
    normalize_masks,
    pixels_to_token_grid,
    routing_labels_from_coverage,
    token_grid_factors,
)
from .phrases import check_phrases, clean_prompt, phrase_problems, phrase_spans, phrase_token_owners
from .router import IDRouter, buckets_from_logits, chosen_log_prob, resolve_routed_layers

__all__ = [
    "IDRouter",
    "IngredientsIDRouter",
    "ingredients_routing_loss",
    "buckets_from_logits",
    "check_layout_masks",
    "check_phrases",
    "chosen_log_prob",
    "clean_prompt",
    "layout_labels",
    "majority_identity",
    "mask_loss",
    "masks_to_token_grid",
    "pixels_to_token_grid",
    "normalize_masks",
    "phrase_problems",
    "phrase_spans",
    "phrase_token_owners",
    "resolve_routed_layers",
    "routing_cross_entropy",
    "routing_labels_from_coverage",
    "token_grid_factors",
]
