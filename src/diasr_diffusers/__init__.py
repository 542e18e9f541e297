"""diasr-diffusers: multi-subject video generation for Hugging Face Diffusers (DiasR + Ingredients-style routing)."""

__version__ = "0.1.0.dev0"

from .ops import bucketed_attention

__all__ = ["bucketed_attention", "__version__"]
