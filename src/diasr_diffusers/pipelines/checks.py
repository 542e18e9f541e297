"""Argument checks shared by every pipeline (the DiasR families and Ingredients): one wording for every mistake.

Each raises ``TypeError`` / ``ValueError`` naming the argument in backticks, before anything is encoded.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch


def check_int(name: str, value: Any, minimum: int) -> None:
    """An integer (``bool`` is refused: ``num_frames=True`` is a mistake, not 1) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")


def check_real(name: str, value: Any, minimum: float | None = None) -> None:
    """A finite real number (not ``bool``), of at least ``minimum`` when given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")


def check_finite_tensors(name: str, value: Any) -> None:
    """Every tensor in ``value`` (a tensor, or nested lists / tuples of them) is floating point and finite: one NaN
    in a conditioning tensor makes the whole video NaN."""
    stack = [(name, value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, (list, tuple)):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(item))
        elif isinstance(item, torch.Tensor):
            if not item.is_floating_point():
                raise TypeError(f"`{where}` must be a floating-point tensor, got {item.dtype}")
            if not torch.isfinite(item).all():
                raise ValueError(f"`{where}` holds NaN or infinite values")
        elif item is not None:
            raise TypeError(f"`{where}` must be a tensor (or a list of tensors), got {type(item).__name__}")


def frames_the_vae_makes(num_frames: int, temporal: int) -> int:
    """The frame count a causal video VAE with ``temporal`` compression decodes for ``num_frames`` requested frames
    (``temporal * k + 1``: the largest such count not above ``num_frames``)."""
    return (num_frames - 1) // temporal * temporal + 1
