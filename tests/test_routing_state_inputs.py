"""SubjectRoutingState.activate, the processor, its installer and the op refuse inputs that used to be truncated,
ignored or fail deep inside the transformer: each by name, before any forward."""

from __future__ import annotations

import math

import pytest
import torch

from diasr_diffusers import SubjectRoutingState, SubjectSparseAttnProcessor, set_subject_sparse_attn_processor
from diasr_diffusers.ops import bucketed_attention
from diasr_diffusers.processors import TextSegments

SEGMENTS = [TextSegments(order=torch.arange(6), lengths=[1, 2])]
BAD_STATE = [
    (dict(ref_lengths=[2.7, 2.2]), "ref_lengths"),
    (dict(ref_lengths=[True, 4]), "ref_lengths"),
    (dict(ref_lengths=[4, 0]), "ref_lengths"),
    (dict(ref_lengths=[-4]), "ref_lengths"),
    (dict(ref_lengths=4), "ref_lengths"),
    (dict(ref_lengths=[4], similarity_threshold=math.nan), "similarity_threshold"),
    (dict(ref_lengths=[4], similarity_threshold="0.1"), "similarity_threshold"),
    (dict(ref_lengths=[4], video_grid=(1, 2.5, 2)), "video_grid"),
    (dict(ref_lengths=[4], video_grid=(1, 2)), "video_grid"),
    (dict(ref_lengths=[4], router_gradient="straight-through"), "router_gradient"),
    (dict(ref_lengths=[4], mode="masks", mask_buckets=torch.zeros(1, 8)), "mask_buckets"),
    (dict(ref_lengths=[4], mode="masks", mask_buckets=[[0, 1]]), "mask_buckets"),
    (dict(ref_lengths=[4, 4, 4], text_segments=SEGMENTS), r"text_segments\[0\].lengths"),
    (dict(ref_lengths=[4, 4], text_segments=SEGMENTS[0]), "text_segments"),
    (dict(ref_lengths=[4, 4, 4], phrase_features=[None, None]), "phrase_features"),
]


@pytest.mark.parametrize("inputs, name", BAD_STATE, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD_STATE)])
def test_activate_refuses_bad_inputs_and_keeps_the_state(inputs, name):
    state = SubjectRoutingState()
    with pytest.raises(ValueError, match=name), state.activate(**inputs):
        pass
    assert state == SubjectRoutingState()


def test_activate_refuses_non_bool_flags():
    with pytest.raises(TypeError, match="record"), SubjectRoutingState().activate(ref_lengths=[4], record="yes"):
        pass


def test_activate_accepts_good_inputs():
    state = SubjectRoutingState()
    with state.activate(ref_lengths=(4, 4), video_grid=[1, 2, 2], text_segments=SEGMENTS, similarity_threshold=2):
        assert state.num_subjects == 2
    assert not state.active


def test_processor_and_installer_check_their_arguments():
    with pytest.raises(TypeError, match="state"):
        SubjectSparseAttnProcessor(state={"ref_lengths": [4]})
    with pytest.raises(ValueError, match="layer_idx"):
        SubjectSparseAttnProcessor(layer_idx=-1)
    with pytest.raises(TypeError, match="transformer"):
        set_subject_sparse_attn_processor("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    with pytest.raises(TypeError, match="state"):
        set_subject_sparse_attn_processor(torch.nn.Linear(2, 2), state=object())


@pytest.mark.parametrize("backend", ["torch", "dense"])
def test_op_refuses_a_non_finite_scale_and_fractional_lengths(backend):
    q = torch.randn(1, 6, 2, 8)
    k = v = torch.randn(1, 7, 2, 8)
    buckets = torch.tensor([[0, 1, -1, 0, 1, 1]])
    for scale in (math.nan, math.inf, 0.0, -1.0):
        with pytest.raises(ValueError, match="scale"):
            bucketed_attention(q, k, v, buckets, [2, 1], scale=scale, backend=backend)
    with pytest.raises(TypeError, match="scale"):
        bucketed_attention(q, k, v, buckets, [2, 1], scale=True, backend=backend)
    for lengths in ([2.7, 2.2], [2, True], 3):
        with pytest.raises(ValueError, match="segment_lengths"):
            bucketed_attention(q, k, v, buckets, lengths, backend=backend)
    out = bucketed_attention(q, k, v, buckets, [torch.tensor(2), 1], scale=0.5, backend=backend)
    torch.testing.assert_close(out, bucketed_attention(q, k, v, buckets, [2, 1], scale=0.5, backend="dense"))
