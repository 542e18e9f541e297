"""Training data: the MuSA-style manifest format, its validation, the torch dataset, latent caching and the
synthetic multi-subject video generator. See ``docs/data.md``."""

from .dataset import (
    LatentCacheDataset,
    MuSADataset,
    RefAugment,
    cache_latents,
    collate_fn,
    encode_latents,
    prepare_reference,
    resize_crop,
)
from .manifest import (
    ClipRecord,
    LoadedManifest,
    MaskTrack,
    Problem,
    ReferenceImage,
    SubjectRecord,
    ValidationReport,
    load_manifest,
    validate_manifest,
    write_manifest,
)
from .synthetic import SpriteSpec, SyntheticClip, make_synthetic, render_clip, render_reference

__all__ = [
    "ClipRecord",
    "LatentCacheDataset",
    "LoadedManifest",
    "MaskTrack",
    "MuSADataset",
    "Problem",
    "RefAugment",
    "ReferenceImage",
    "SpriteSpec",
    "SubjectRecord",
    "SyntheticClip",
    "ValidationReport",
    "cache_latents",
    "collate_fn",
    "encode_latents",
    "load_manifest",
    "make_synthetic",
    "prepare_reference",
    "render_clip",
    "render_reference",
    "resize_crop",
    "validate_manifest",
    "write_manifest",
]
