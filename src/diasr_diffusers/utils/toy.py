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

# The demo speaks the sprite model's language: a make-synthetic caption, two sprites it never saw together in
# training, references drawn by the synthetic renderer (diasr_diffusers/assets/sprite_refs).
DEMO_PROMPT = "A video of the striped red star and the dotted blue circle moving over a radial gradient background."
DEMO_SUBJECTS = [
    ("the striped red star", "striped_red_star.png"),
    ("the dotted blue circle", "dotted_blue_circle.png"),
]
DEMO_STEPS = 12  # three panels in the demo's time budget; the layout panel is as clean at 12 as at 20
DEMO_GUIDANCE = 4.0
DEMO_FILES = ("demo.mp4", "demo.png", "scores.json", "report.md")  # what `diasr demo` writes into --out
DEMO_UPSCALE = 4  # the model makes 64x64 frames; the videos are written 4x larger (nearest) to be watchable


def sprite_model_path() -> str:
    """The folder of the shipped sprite model (a Diffusers ``DiasRPipeline`` folder with an ``id_router``)."""
    return str(resources.files("diasr_diffusers") / "assets" / "sprite_model")


def sprite_dense_model_path() -> str:
    """The folder of the shipped dense baseline (a ``DiasRPipeline`` folder without ``id_router``, trained by
    ``diasr train`` stage ``dense`` on the same data and budget as the sprite model: every video token attends to
    every reference, as in Phantom)."""
    return str(resources.files("diasr_diffusers") / "assets" / "sprite_dense")


def load_sprite_dense_model(path: str | None = None, **kwargs: Any) -> DiasRPipeline:
    """The shipped dense baseline (or the dense pipeline folder ``path``), to be called with ``routing="dense"``.

    Raises:
        FileNotFoundError: when the folder has no ``model_index.json``, naming the folder.

    Example:
        ```py
        >>> from diasr_diffusers.utils.toy import SPRITE_MODEL_SIZE, load_sprite_dense_model
        >>> dense = load_sprite_dense_model()
        >>> out = dense(prompt=..., subject_images=[...], subject_phrases=[...], routing="dense", **SPRITE_MODEL_SIZE)
        ```
    """
    import os

    from ..pipelines import DiasRPipeline

    folder = sprite_dense_model_path() if path is None else str(path)
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise FileNotFoundError(
            f"no dense baseline in {folder} (no model_index.json): it ships in diasr_diffusers/assets/sprite_dense "
            "(docs/toy_model.md says how it is trained)"
        )
    return DiasRPipeline.from_pretrained(folder, **kwargs)


def demo_subjects() -> tuple[list[str], list[Any]]:
    """The demo's subject phrases and reference images (PIL, RGB), shipped in ``assets/sprite_refs``."""
    from PIL import Image

    assets = resources.files("diasr_diffusers") / "assets" / "sprite_refs"
    return [p for p, _ in DEMO_SUBJECTS], [Image.open(assets / name).convert("RGB") for _, name in DEMO_SUBJECTS]


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
