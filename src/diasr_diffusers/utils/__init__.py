"""Helpers: reference-image handling and routing-map visualisation."""

from .images import letterbox, normalize_subject_images, to_pil_rgb
from .visualization import SUBJECT_COLORS, overlay_routing_maps, routing_grid

__all__ = ["SUBJECT_COLORS", "letterbox", "normalize_subject_images", "overlay_routing_maps", "routing_grid", "to_pil_rgb"]
