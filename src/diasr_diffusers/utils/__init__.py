"""Helpers: reference-image handling and routing-map visualisation."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

# Imported on first use (PEP 562): `diasr_diffusers.utils.io` is used by light modules (the CLI) that must not pay
# for importing torch.
_LAZY = {
    "SUBJECT_COLORS": ".visualization",
    "letterbox": ".images",
    "normalize_subject_images": ".images",
    "overlay_routing_maps": ".visualization",
    "routing_grid": ".visualization",
    "routing_legend": ".visualization",
    "to_pil_rgb": ".images",
}

__all__ = [
    "SUBJECT_COLORS",
    "letterbox",
    "normalize_subject_images",
    "overlay_routing_maps",
    "routing_grid",
    "routing_legend",
    "to_pil_rgb",
]

if TYPE_CHECKING:
    from .images import letterbox, normalize_subject_images, to_pil_rgb
    from .visualization import SUBJECT_COLORS, overlay_routing_maps, routing_grid, routing_legend


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
