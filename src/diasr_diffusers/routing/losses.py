"""Routing supervision: Ingredients' routing cross-entropy and DiasR's ``L_mask``."""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from .masks import normalize_masks


def routing_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -1, balanced: bool | float = False
) -> torch.Tensor:
    """Ingredients' routing loss: cross-entropy over subjects, background ignored.

    Args:
        logits: ``(B, L, N + 1)`` router logits (null last) or ``(B, L, N)`` subject logits only.
        labels: ``(B, L)`` int64 in ``[-1, N)``; ``-1`` (background) is ignored, as in Ingredients.
            To also teach the null anchor, map background to ``N`` yourself and pass ``ignore_index=-100``.
        balanced: weight each class present in ``labels`` equally (a small subject is not outvoted by a large
            background). A float ``p`` in ``[0, 1]`` weights each class by ``count ** -p``: ``1.0`` (= ``True``)
            balances fully, ``0.0`` (= ``False``) is plain cross-entropy, and values between trade subject recall
            for background precision.

    Returns:
        Scalar mean over labelled tokens (0 with a gradient path if none is labelled).
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"`logits` (B, L, C) and `labels` (B, L) disagree: {tuple(logits.shape)} vs {tuple(labels.shape)}"
        )
    if not logits.is_floating_point() or logits.shape[-1] == 0:
        raise ValueError(
            f"`logits` must be floating point with at least one class, got {logits.dtype} {tuple(logits.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"`labels` must hold integer class indices, got dtype {labels.dtype}")
    # Checked before the all-ignored shortcut, so a bad value is never accepted silently.
    if not isinstance(balanced, numbers.Real) or not 0.0 <= float(balanced) <= 1.0:
        raise ValueError(f"`balanced` must be a bool or a float in [0, 1], got {balanced!r}")
    power = float(balanced)
    labelled = labels != ignore_index
    if not labelled.any():
        return logits.sum() * 0.0
    # An out-of-range label is an IndexError on CPU and a device-side assert (a dead process) on CUDA.
    bad = labelled & ((labels < 0) | (labels >= logits.shape[-1]))
    if bad.any():
        raise ValueError(
            f"`labels` must be in [0, {logits.shape[-1]}) or `ignore_index`={ignore_index}, got {labels[bad][0].item()}"
        )
    flat_logits, flat_labels = logits.flatten(0, 1).float(), labels.flatten()
    if power == 0.0:
        return F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index)
    keep = flat_labels != ignore_index
    flat_logits, flat_labels = flat_logits[keep], flat_labels[keep]
    counts = torch.bincount(flat_labels, minlength=logits.shape[-1]).float()
    weight = torch.where(counts > 0, counts.clamp(min=1) ** -power, torch.zeros_like(counts))
    return F.cross_entropy(flat_logits, flat_labels, weight=weight)


def mask_loss(
    similarity_maps: torch.Tensor,
    masks: torch.Tensor,
    attention_maps: torch.Tensor | None = None,
    subject_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """DiasR's ``L_mask = sum_i ||S_i - M_i||^2 + ||A_i - M_i||^2``, averaged over tokens.

    Args:
        similarity_maps: ``(B, N, L)`` router map per subject in ``[0, 1]`` (e.g. the softmax probabilities
            ``logits.softmax(-1)[..., :N].transpose(1, 2)``).
        masks: ``(B, N, L)`` ground-truth subject masks on the token grid (coverage in ``[0, 1]`` or binary).
        attention_maps: optional ``(B, N, L)`` attention mass each video token puts on subject ``i``'s reference
            tokens.
        subject_valid: optional ``(B, N)`` bool (or 0/1), False for padded subjects (excluded).

    Returns:
        Scalar: sum over subjects, mean over batch and tokens.
    """
    if similarity_maps.shape != masks.shape or similarity_maps.ndim != 3:
        raise ValueError(
            f"`similarity_maps` and `masks` must both be (B, N, L), got {tuple(similarity_maps.shape)} and {tuple(masks.shape)}"
        )
    if attention_maps is not None and attention_maps.shape != masks.shape:
        raise ValueError(
            f"`attention_maps` must be (B, N, L) = {tuple(masks.shape)}, got {tuple(attention_maps.shape)}"
        )
    masks = normalize_masks(masks).to(similarity_maps.dtype)
    err = (similarity_maps - masks).pow(2)
    if attention_maps is not None:
        err = err + (attention_maps.to(masks.dtype) - masks).pow(2)
    per_subject = err.mean(dim=-1)  # (B, N)
    if subject_valid is not None:
        # A (B, N, 1) or (N,) tensor would broadcast into a wrong sum without an error.
        if not isinstance(subject_valid, torch.Tensor) or tuple(subject_valid.shape) != tuple(per_subject.shape):
            raise ValueError(
                f"`subject_valid` must be (B, N) = {tuple(per_subject.shape)}, got {tuple(getattr(subject_valid, 'shape', ())) or subject_valid!r}"
            )
        if subject_valid.dtype != torch.bool and ((subject_valid != 0) & (subject_valid != 1)).any():
            raise ValueError("`subject_valid` must be bool (or 0/1): True for real subjects, False for padding")
        per_subject = per_subject * subject_valid.to(per_subject.dtype)
    return per_subject.sum(dim=1).mean()


def ingredients_routing_loss(
    layer_logits: list[torch.Tensor] | tuple[torch.Tensor, ...], index_mask: torch.Tensor
) -> torch.Tensor:
    """Ingredients' routing loss as its released training forward computes it.

    For each sample, the cross-entropy of every routed layer's ``(L, N)`` logits against its ``(L,)`` labels
    (background ``-1`` ignored) is summed over the layers and divided by their number; a sample with no labelled
    token contributes 0 (the released code turns that NaN into 0); the result is the mean over samples. Each sample
    is averaged over its own labelled tokens, so a sample with a small face weighs as much as one with a large face
    (unlike :func:`routing_cross_entropy` on the whole batch, which pools the tokens).

    Args:
        layer_logits: one ``(B, L, N)`` tensor per routed layer (``IngredientsTransformer3DModel(...,
            return_routing_logits=True).routing_logits``).
        index_mask: ``(B, L)`` integer labels in ``[-1, N)``: the identity of each video token, ``-1`` background.
    """
    if not layer_logits:
        raise ValueError("`layer_logits` is empty: the model has no routed layer")
    per_layer = []
    for logits in layer_logits:
        if logits.shape[:2] != index_mask.shape:
            raise ValueError(
                f"`index_mask` must be (B, L) = {tuple(logits.shape[:2])} like the logits, got {tuple(index_mask.shape)}"
            )
        per_sample = [routing_cross_entropy(logits[b : b + 1], index_mask[b : b + 1]) for b in range(logits.shape[0])]
        per_layer.append(torch.stack(per_sample))
    return torch.stack(per_layer).mean(dim=0).mean()
