"""routing_iou: routing maps on the token grid vs ground-truth pixel masks."""

import numpy as np
import pytest
import torch

from diasr_diffusers.eval import routing_iou


def two_subject_masks() -> np.ndarray:
    """(N=2, F=5, 64, 64): subject 0 = left half, subject 1 = top-right quarter, in every frame."""
    masks = np.zeros((2, 5, 64, 64), dtype=bool)
    masks[0, :, :, :32] = True
    masks[1, :, :32, 32:] = True
    return masks


def truth_map() -> np.ndarray:
    """The same layout on the Wan token grid: 2 latent frames x 4 x 4 tokens (VAE 4/8, patch 1x2x2)."""
    grid = np.full((2, 4, 4), -1, dtype=np.int64)
    grid[:, :, :2] = 0
    grid[:, :2, 2:] = 1
    return grid


def test_perfect_routing_scores_one():
    result = routing_iou(truth_map(), two_subject_masks())
    assert result["per_subject_iou"] == [1.0, 1.0]
    assert result["mean_iou"] == 1.0 and result["accuracy"] == 1.0 and result["background_iou"] == 1.0


def test_partial_and_swapped_routing():
    partial = truth_map()
    partial[:, :, 1] = -1  # subject 0 keeps only its left token column: 8 of 16 tokens
    result = routing_iou(partial, two_subject_masks())
    assert result["per_subject_iou"] == [pytest.approx(0.5), 1.0]
    assert result["mean_iou"] == pytest.approx(0.75)
    assert result["accuracy"] == pytest.approx(1 - 8 / 32)

    swapped = truth_map()
    swapped[truth_map() == 0], swapped[truth_map() == 1] = 1, 0
    result = routing_iou(torch.from_numpy(swapped), torch.from_numpy(two_subject_masks()))
    assert result["per_subject_iou"] == [0.0, 0.0]


def test_batch_sums_and_reports_per_sample():
    maps = np.stack([truth_map(), np.full((2, 4, 4), -1)])
    masks = np.stack([two_subject_masks()] * 2)
    result = routing_iou(maps, masks)
    assert result["per_sample_mean_iou"] == [1.0, 0.0]
    assert result["per_subject_iou"] == [pytest.approx(16 / 32), pytest.approx(8 / 16)]


def test_absent_subject_is_left_out_of_the_mean():
    masks = np.concatenate([two_subject_masks(), np.zeros((1, 5, 64, 64), bool)])
    result = routing_iou(truth_map(), masks)
    assert result["per_subject_iou"] == [1.0, 1.0, None]
    assert result["mean_iou"] == 1.0


def test_coverage_threshold_decides_the_ground_truth():
    masks = np.zeros((1, 5, 64, 64), np.float32)
    masks[0, :, :16, :16] = 1.0
    masks[0, :, :16, :8] = 0.0  # the top-left token is only half covered
    pred = np.full((2, 4, 4), -1)
    pred[:, 0, 0] = 0
    assert routing_iou(pred, masks, threshold=0.5)["per_subject_iou"] == [1.0]
    assert routing_iou(pred, masks, threshold=0.75)["per_subject_iou"] == [0.0]


@pytest.mark.parametrize(
    ("maps", "masks", "match"),
    [
        (np.zeros((2, 3, 3), np.int64), two_subject_masks(), "token grid"),
        (np.full((2, 4, 4), 5), two_subject_masks(), r"\[-1, 2\)"),
        (np.zeros((2, 4, 4), np.float32), two_subject_masks(), "integer"),
        (np.zeros((4, 4), np.int64), two_subject_masks(), "routing_maps"),
        (np.zeros((2, 4, 4), np.int64), np.zeros((64, 64)), "masks"),
        (np.zeros((3, 2, 4, 4), np.int64), np.stack([two_subject_masks()] * 2), "batch"),
    ],
)
def test_bad_inputs(maps, masks, match):
    with pytest.raises(ValueError, match=match):
        routing_iou(maps, masks)
