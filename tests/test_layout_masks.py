"""Issue 25, masks mode: overlapping and empty layout masks follow one documented rule (routing/masks.py), in the
library, the pipeline and the page, instead of silently removing a subject."""

from __future__ import annotations

import logging

import pytest
import torch
from test_pipeline import BASE, PHRASES, PROMPT, gen, subject_images

from diasr_diffusers import DiasRPipeline
from diasr_diffusers.routing import check_layout_masks, layout_labels, routing_labels_from_coverage
from diasr_diffusers.utils.tiny import tiny_wan_components


@pytest.fixture(scope="module")
def pipe():
    return DiasRPipeline(**tiny_wan_components())


def test_overlap_ties_go_to_the_smaller_mask_and_warn(caplog):
    # Subject 0: the whole frame (a body); subject 1: the left half (drawn over it).
    coverage = torch.zeros(1, 2, 1, 2, 2)
    coverage[0, 0] = 1.0
    coverage[0, 1, :, :, 0] = 1.0
    assert (routing_labels_from_coverage(coverage) == 0).all()  # the old rule: subject 1 vanished
    with caplog.at_level(logging.WARNING):
        labels = layout_labels(coverage)
    assert labels.tolist() == [[1, 0, 1, 0]]
    assert "overlap on 2 video token(s)" in caplog.text and "2 tie(s)" in caplog.text
    # The larger share still wins where shares differ.
    coverage[0, 0, :, 0, 0] = 0.6
    coverage[0, 1, :, 0, 0] = 0.9
    assert layout_labels(coverage)[0, 0] == 1


def test_identical_masks_are_refused_for_the_hidden_subject():
    coverage = torch.ones(1, 2, 1, 2, 2)
    with pytest.raises(ValueError, match=r"`subject_masks\[1\]` gets no video token: every token it covers"):
        layout_labels(coverage)


def test_mask_too_small_for_any_token():
    coverage = torch.zeros(1, 2, 1, 2, 2)
    coverage[0, 0] = 1.0
    coverage[0, 1, 0, 0, 0] = 0.2
    coverage[0, 0, 0, 0, 0] = 0.8
    with pytest.raises(ValueError, match=r"`subject_masks\[1\]` gets no video token: it covers less than 50%"):
        layout_labels(coverage)


def test_empty_mask_is_refused():
    masks = torch.zeros(2, 32, 32)
    masks[0, :, :16] = 1
    with pytest.raises(ValueError, match=r"`subject_masks\[1\]` is empty"):
        check_layout_masks(masks)


def _call(pipe, masks, **kwargs):
    return pipe(**BASE, prompt=PROMPT, subject_images=subject_images(2), subject_phrases=PHRASES[:2],
                routing="masks", subject_masks=masks, return_routing_maps=True, generator=gen(), **kwargs)  # fmt: skip


def test_pipeline_overlapping_masks_keep_both_subjects(pipe, caplog):
    masks = torch.zeros(2, 32, 32)
    masks[0] = 1.0  # everywhere
    masks[1, :, :16] = 1.0  # the left half, over subject 0
    with caplog.at_level(logging.WARNING):
        out = _call(pipe, masks)
    shares = [(out.routing_maps == i).float().mean().item() for i in (0, 1)]
    assert shares == [0.5, 0.5]  # was [1.0, 0.0]: subject 1 vanished without a word
    assert "overlap" in caplog.text


def test_pipeline_empty_mask_is_refused_before_any_work(pipe, monkeypatch):
    masks = torch.zeros(2, 32, 32)
    masks[0, :, :16] = 1.0
    monkeypatch.setattr(pipe, "encode_prompt", lambda *a, **k: pytest.fail("encoded before the check"))
    with pytest.raises(ValueError, match=r"`subject_masks\[1\]` is empty"):
        _call(pipe, masks)


def test_layout_labels_refuses_other_shapes_and_types():
    # Found by the second hostile round: a list was an AttributeError, 4-D coverage "too many values to unpack".
    with pytest.raises(TypeError, match="`coverage` must be a torch.Tensor"):
        layout_labels([[[1.0]]])
    with pytest.raises(ValueError, match=r"`coverage` must be \(B, N, L\) or \(B, N, F, H, W\)"):
        layout_labels(torch.ones(2, 1, 2, 2))
