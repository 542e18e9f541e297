"""Routing quality: how well the router's per-token subject assignment matches ground-truth subject masks."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..routing.masks import masks_to_token_grid, routing_labels_from_coverage


def _as_tensor(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    try:
        return torch.from_numpy(np.asarray(value))
    except (TypeError, ValueError) as err:
        raise ValueError(f"`{name}` must be an array or tensor, got {type(value).__name__}") from err


def routing_iou(
    routing_maps: torch.Tensor | np.ndarray,
    masks: torch.Tensor | np.ndarray,
    *,
    temporal_compression: int = 4,
    spatial_compression: int = 8,
    patch_size: tuple[int, int, int] = (1, 2, 2),
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Per-subject IoU between routing maps and ground-truth masks on the token grid.

    Args:
        routing_maps: ``(B, F_lat, H_tok, W_tok)`` or ``(F_lat, H_tok, W_tok)`` integer subject index per video
            token, ``-1`` for tokens routed to no subject (as returned by ``DiasRPipeline(return_routing_maps=True)``).
        masks: pixel masks ``(B, N, F, H, W)`` or ``(N, F, H, W)`` (bool / {0, 1} / coverage in ``[0, 1]``), one per
            subject, in the same order as the routing indices.
        temporal_compression, spatial_compression, patch_size: the VAE and patch factors that map pixels to tokens
            (Wan2.1: 4, 8, (1, 2, 2)); see :func:`diasr_diffusers.routing.masks_to_token_grid`.
        threshold: a token's ground truth is the subject covering at least this fraction of it, else ``-1``.

    Returns:
        ``{"per_subject_iou": [N floats or None], "mean_iou": float | None, "background_iou": float | None,
        "accuracy": float, "per_sample_mean_iou": [B]}``. Intersections and unions are summed over the batch; a
        subject that is absent from both the maps and the ground truth has IoU ``None`` and is left out of the mean.

    Example:
        >>> maps = torch.full((3, 4, 4), -1); maps[:, :2, :2] = 0
        >>> masks = torch.zeros(1, 9, 64, 64); masks[0, :, :32, :32] = 1
        >>> routing_iou(maps, masks)["per_subject_iou"]
        [1.0]
    """
    for name, value in (("temporal_compression", temporal_compression), ("spatial_compression", spatial_compression)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    if len(patch_size) != 3 or not all(
        isinstance(p, int | np.integer) and not isinstance(p, bool) and p >= 1 for p in patch_size
    ):
        raise ValueError(f"`patch_size` must be three positive integers (t, h, w), got {patch_size!r}")
    if not 0.0 < float(threshold) <= 1.0:  # also refuses NaN, which would label every token background
        raise ValueError(f"`threshold` must be in (0, 1], got {threshold!r}")
    maps = _as_tensor(routing_maps, "routing_maps")
    gt_masks = _as_tensor(masks, "masks")
    if gt_masks.dtype.is_complex or not (gt_masks.dtype == torch.bool or gt_masks.dtype.is_floating_point or
                                         gt_masks.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32,
                                                            torch.int64)):  # fmt: skip
        raise ValueError(f"`masks` must be bool, 0/1 integers or coverage floats, got dtype {gt_masks.dtype}")
    if gt_masks.numel() and gt_masks.dtype != torch.bool:
        low, high = float(gt_masks.min()), float(gt_masks.max())
        if not (0.0 <= low and high <= 1.0):  # NaN fails both comparisons
            raise ValueError(
                f"`masks` values must be in [0, 1] (bool, 0/1 or coverage), got [{low}, {high}]"
                + ("; divide 0/255 masks by 255" if high == 255 else "")
            )
    if maps.dtype.is_floating_point or maps.dtype == torch.bool:
        raise ValueError(f"`routing_maps` must hold integer subject indices, got dtype {maps.dtype}")
    if maps.ndim == 3:
        maps = maps.unsqueeze(0)
    if maps.ndim != 4:
        raise ValueError(
            f"`routing_maps` must be (B, F_lat, H_tok, W_tok) or (F_lat, H_tok, W_tok), got {tuple(maps.shape)}"
        )
    if gt_masks.ndim == 4:
        gt_masks = gt_masks.unsqueeze(0)
    if gt_masks.ndim != 5:
        raise ValueError(f"`masks` must be (B, N, F, H, W) or (N, F, H, W), got {tuple(gt_masks.shape)}")
    if gt_masks.shape[0] != maps.shape[0]:
        raise ValueError(f"`masks` has batch {gt_masks.shape[0]} but `routing_maps` has batch {maps.shape[0]}")
    num_subjects = gt_masks.shape[1]
    if maps.numel() and (maps.min() < -1 or maps.max() >= num_subjects):
        raise ValueError(
            f"`routing_maps` values must be in [-1, {num_subjects}) for {num_subjects} subject masks, "
            f"got [{int(maps.min())}, {int(maps.max())}]"
        )
    coverage = masks_to_token_grid(
        gt_masks.float(),
        temporal_compression=temporal_compression,
        spatial_compression=spatial_compression,
        patch_size=patch_size,
    )  # (B, N, F_tok, H_tok, W_tok)
    if tuple(coverage.shape[2:]) != tuple(maps.shape[1:]):
        raise ValueError(
            f"`masks` map to a token grid of {tuple(coverage.shape[2:])} but `routing_maps` is {tuple(maps.shape[1:])}; "
            "check temporal_compression / spatial_compression / patch_size"
        )
    truth = routing_labels_from_coverage(coverage, threshold=threshold)  # (B, L)
    return label_iou(maps.reshape(maps.shape[0], -1), truth, num_subjects)


def label_iou(predicted: torch.Tensor, truth: torch.Tensor, num_subjects: int) -> dict[str, Any]:
    """Per-subject IoU between predicted and ground-truth token labels (``-1`` = null / background).

    Args:
        predicted, truth: ``(B, L)`` or ``(L,)`` integer labels in ``[-1, num_subjects)``.
        num_subjects: N.

    Returns:
        The dict of :func:`routing_iou`. Intersections and unions are summed over the batch; a subject absent from
        both has IoU ``None`` and is left out of the means.
    """
    pred = torch.as_tensor(predicted).detach().cpu().long()
    truth = torch.as_tensor(truth).detach().cpu().long()
    if pred.ndim == 1:
        pred, truth = pred[None], truth[None]
    if pred.shape != truth.shape:
        raise ValueError(f"`predicted` {tuple(pred.shape)} and `truth` {tuple(truth.shape)} must have the same shape")

    def iou(label: int, p: torch.Tensor, g: torch.Tensor) -> tuple[int, int]:
        inter = int(((p == label) & (g == label)).sum())
        union = int(((p == label) | (g == label)).sum())
        return inter, union

    per_subject = []
    for s in range(num_subjects):
        inter, union = iou(s, pred, truth)
        per_subject.append(inter / union if union else None)
    per_sample = []
    for b in range(pred.shape[0]):
        values = []
        for s in range(num_subjects):
            inter, union = iou(s, pred[b], truth[b])
            if union:
                values.append(inter / union)
        per_sample.append(float(np.mean(values)) if values else None)
    inter, union = iou(-1, pred, truth)
    valid = [v for v in per_subject if v is not None]
    return {
        "per_subject_iou": per_subject,
        "mean_iou": float(np.mean(valid)) if valid else None,
        "background_iou": inter / union if union else None,
        "accuracy": float((pred == truth).float().mean()),
        "per_sample_mean_iou": per_sample,
    }
