"""The embedded sprite model: a small DiasR model trained from scratch on the CPU on ``make-synthetic`` sprites.

It is the package's working default: ``diasr demo`` runs on it, offline, in seconds. It is a toy: 64x64 pixels,
5 frames, prompts written like ``make-synthetic`` captions (``"A video of the striped red star and the dotted blue
circle moving over a radial gradient background."``), subjects drawn from the sprite vocabulary (shapes, colours and
patterns of :mod:`diasr_diffusers.data.synthetic`). How it was trained and what it can and cannot do:
``docs/toy_model.md``.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..pipelines import DiasRPipeline

# The sizes the sprite model was trained at; generate with them (`max_sequence_length` also pads the prompt, and the
# padding tokens take part in cross-attention, so another length changes the result).
SPRITE_MODEL_SIZE = {"height": 64, "width": 64, "num_frames": 5, "max_sequence_length": 64}


def sprite_model_path() -> str:
    """The folder of the shipped sprite model (a Diffusers ``DiasRPipeline`` folder with an ``id_router``)."""
    return str(resources.files("diasr_diffusers") / "assets" / "sprite_model")


def load_sprite_model(**kwargs: Any) -> DiasRPipeline:
    """The shipped sprite model: ``DiasRPipeline.from_pretrained(sprite_model_path(), **kwargs)``.

    Example:
        ```py
        >>> from diasr_diffusers.utils.toy import SPRITE_MODEL_SIZE, load_sprite_model
        >>> pipe = load_sprite_model()
        >>> out = pipe(prompt=..., subject_images=[...], subject_phrases=[...], routing="router", **SPRITE_MODEL_SIZE)
        ```
    """
    from ..pipelines import DiasRPipeline

    return DiasRPipeline.from_pretrained(sprite_model_path(), **kwargs)
