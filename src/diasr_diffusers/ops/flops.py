"""FLOPs model of subject-bucketed attention and of one Wan transformer forward with N subjects.

Counting convention (as FlashAttention's benchmarks): a ``(m, k) @ (k, n)`` matmul costs ``2mkn``; softmax, norms
and elementwise ops are not counted. Attention forward is ``4 * Lq * Lk * d * H`` (``QK^T`` and ``PV``); the backward
is counted as 2.5x the forward (five matmuls instead of two).

Attention patterns over video tokens ``Lv`` and N references of ``R_s`` tokens each (self-attention over
``[video | ref_1 | ... | ref_N]``):

* ``"video_only"``: plain text-to-video, ``4dH Lv^2`` (the floor).
* ``"dense_joint"``: Phantom, every token sees every token, ``4dH (Lv + sum R_s)^2``.
* ``"routed"``: DiasR, video queries see all video keys plus the references of their bucket, reference queries see
  their own reference: ``4dH [Lv^2 + sum_s n_s R_s + sum_s R_s^2]`` with ``n_s`` the video tokens routed to ``s``.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

BACKWARD_FACTOR = 2.5
_PATTERNS = ("routed", "dense_joint", "video_only")
_PASSES = {"forward": 1.0, "backward": BACKWARD_FACTOR, "forward+backward": 1.0 + BACKWARD_FACTOR}


def _check_pass(which: str) -> float:
    if not isinstance(which, str) or which not in _PASSES:
        raise ValueError(f"`which` must be one of {list(_PASSES)}, got {which!r}")
    return _PASSES[which]


def _count(name: str, value: object, minimum: int = 0) -> int:
    """An exact int >= ``minimum``: ``int()`` would truncate 2.7 and accept ``True`` as 1."""
    try:
        if isinstance(value, bool):
            raise TypeError
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} {value!r}") from None
    if n < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {n}")
    return n


def _counts(name: str, values: Iterable[int]) -> list[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"`{name}` must be a sequence of ints, got {type(values).__name__}")
    return [_count(f"{name}[{i}]", x) for i, x in enumerate(values)]


def equal_routing(video_tokens: int, num_subjects: int) -> list[int]:
    """Video tokens per subject when the video is split in equal shares between the N subjects and null."""
    video_tokens, num_subjects = _count("video_tokens", video_tokens), _count("num_subjects", num_subjects)
    return [video_tokens // (num_subjects + 1)] * num_subjects


def attention_flops(
    video_tokens: int,
    reference_tokens: Sequence[int],
    *,
    heads: int,
    head_dim: int,
    pattern: str = "routed",
    routed_tokens: Sequence[int] | None = None,
    which: str = "forward",
    batch: int = 1,
) -> float:
    """FLOPs of one self-attention over ``[video | refs]`` under ``pattern``.

    Args:
        video_tokens: ``Lv``.
        reference_tokens: ``R_s`` for each subject (may be empty).
        heads, head_dim: ``H`` and ``d``.
        pattern: ``"routed"``, ``"dense_joint"`` or ``"video_only"`` (see the module docstring).
        routed_tokens: ``n_s``, video tokens routed to each subject (``"routed"`` only); defaults to
            :func:`equal_routing` (equal shares for the subjects and null).
        which: ``"forward"``, ``"backward"`` (2.5x forward) or ``"forward+backward"``.
        batch: batch size.

    Example:
        >>> attention_flops(4096, [], heads=4, head_dim=64, pattern="video_only") == 4 * 4096**2 * 64 * 4
        True
    """
    factor = _check_pass(which)
    video_tokens, refs = _count("video_tokens", video_tokens), _counts("reference_tokens", reference_tokens)
    heads, head_dim, batch = _count("heads", heads), _count("head_dim", head_dim), _count("batch", batch)
    if pattern == "video_only":
        pairs = video_tokens**2
    elif pattern == "dense_joint":
        pairs = (video_tokens + sum(refs)) ** 2
    elif pattern == "routed":
        n = (
            _counts("routed_tokens", routed_tokens)
            if routed_tokens is not None
            else equal_routing(video_tokens, len(refs))
        )
        if len(n) != len(refs):
            raise ValueError(f"`routed_tokens` needs one entry per subject ({len(refs)}), got {len(n)}")
        if any(x < 0 for x in n) or sum(n) > video_tokens:
            raise ValueError(
                f"`routed_tokens` {n} must be non-negative and sum to at most video_tokens={video_tokens}"
            )
        pairs = video_tokens**2 + sum(a * r for a, r in zip(n, refs)) + sum(r * r for r in refs)
    else:
        raise ValueError(f"`pattern` must be one of {list(_PATTERNS)}, got {pattern!r}")
    return float(4 * pairs * head_dim * heads * batch) * factor


@dataclass(frozen=True)
class WanConfig:
    """The sizes of a Wan 2.1 text-to-video transformer that matter for FLOPs."""

    dim: int
    heads: int
    layers: int
    ffn_dim: int

    def __post_init__(self):
        for name in ("dim", "heads", "layers", "ffn_dim"):
            _count(name, getattr(self, name), minimum=1)
        if self.dim % self.heads:  # head_dim would be silently floored
            raise ValueError(f"`dim` ({self.dim}) must be a multiple of `heads` ({self.heads})")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


WAN_CONFIGS: dict[str, WanConfig] = {
    "wan2.1-1.3b": WanConfig(dim=1536, heads=12, layers=30, ffn_dim=8960),
    "wan2.1-14b": WanConfig(dim=5120, heads=40, layers=40, ffn_dim=13824),
}

# Latent tokens after the VAE (4x temporal, 8x spatial) and the 1x2x2 patchify, 81 frames -> 21 latent frames.
# A reference image is one extra latent frame.
WAN_TOKENS: dict[str, dict[str, int]] = {
    "480p": {"video": 21 * 30 * 52, "reference": 30 * 52},  # 32,760 and 1,560
    "720p": {"video": 21 * 45 * 80, "reference": 45 * 80},  # 75,600 and 3,600
}


def wan_step_flops(
    model: str | WanConfig,
    num_subjects: int,
    *,
    video_tokens: int,
    reference_tokens: int,
    text_tokens: int = 512,
    pattern: str = "routed",
    routed_tokens: Sequence[int] | None = None,
    which: str = "forward",
) -> dict[str, float]:
    """FLOPs of one Wan transformer forward (one denoising step without CFG) with ``num_subjects`` references.

    Per layer: self-attention Q/K/V/O projections over all ``T = Lv + N * R`` tokens (``8 T dim^2``), the
    self-attention core under ``pattern`` (:func:`attention_flops`), text cross-attention (Q/O projections over ``T``,
    K/V projections over the text, core ``4 T * text * dim``) and the FFN (``4 T dim ffn``). Patch embedding, the
    output head, norms and time modulation are left out (< 1%). ``pattern="video_only"`` also drops the reference
    tokens from every term: it is plain text-to-video. CFG multiplies everything by the number of guidance passes.

    Returns a dict with ``self_attention``, ``cross_attention``, ``projections``, ``ffn`` and ``total`` FLOPs.
    """
    if isinstance(model, str):
        if model not in WAN_CONFIGS:
            raise ValueError(f"Unknown `model` {model!r}; expected one of {list(WAN_CONFIGS)} or a WanConfig")
        cfg = WAN_CONFIGS[model]
    elif isinstance(model, WanConfig):
        cfg = model
    else:
        raise TypeError(f"`model` must be a name in {list(WAN_CONFIGS)} or a WanConfig, got {type(model).__name__}")
    factor = _check_pass(which)
    num_subjects, text_tokens = _count("num_subjects", num_subjects), _count("text_tokens", text_tokens)
    video_tokens, reference_tokens = _count("video_tokens", video_tokens), _count("reference_tokens", reference_tokens)
    refs = [reference_tokens] * num_subjects
    if pattern == "video_only":
        refs = []
    tokens = video_tokens + sum(refs)
    core = attention_flops(
        video_tokens, refs, heads=cfg.heads, head_dim=cfg.head_dim, pattern=pattern,
        routed_tokens=routed_tokens if pattern == "routed" and refs else None, which=which,
    )  # fmt: skip
    projections = (8 * tokens * cfg.dim**2 + 2 * tokens * cfg.dim**2 * 2 + 4 * text_tokens * cfg.dim**2) * factor
    cross = 4 * tokens * text_tokens * cfg.dim * factor
    ffn = 4 * tokens * cfg.dim * cfg.ffn_dim * factor
    per_layer = {"self_attention": core, "cross_attention": cross, "projections": projections, "ffn": ffn}
    out = {name: float(value * cfg.layers) for name, value in per_layer.items()}
    out["total"] = sum(out.values())
    return out
