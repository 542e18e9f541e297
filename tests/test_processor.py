"""SubjectSparseAttnProcessor on Wan: parity with the stock processor when no subject is active, routed self- and
cross-attention against hand-built masked references, routing modes, and the routing state's API."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import WanPipeline
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from diasr_diffusers import (
    IDRouter,
    SubjectRoutingState,
    SubjectSparseAttnProcessor,
    set_subject_sparse_attn_processor,
)
from diasr_diffusers.processors import TextSegments
from diasr_diffusers.routing import buckets_from_logits
from diasr_diffusers.utils.tiny import tiny_wan_components

# Latent grid used throughout: 2 video latent frames of 8x8 latent pixels -> 4x4 = 16 tokens per frame (patch 1x2x2).
TOKENS_PER_FRAME = 16
VIDEO_FRAMES = 2
LV = VIDEO_FRAMES * TOKENS_PER_FRAME
REF_IMAGES = [2, 1]  # subject 0 has two reference images, subject 1 one
REF_LENGTHS = [n * TOKENS_PER_FRAME for n in REF_IMAGES]


@pytest.fixture
def comps():
    return tiny_wan_components(num_layers=2)


@pytest.fixture
def transformer(comps):
    return comps["transformer"]


def transformer_inputs(batch=1, frames=VIDEO_FRAMES, seed=0, text_len=12):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 16, frames, 8, 8, generator=g)
    timestep = torch.tensor([500.0] * batch)
    text = torch.randn(batch, text_len, 32, generator=g)
    return latents, timestep, text


def run(transformer, latents, timestep, text):
    with torch.no_grad():
        return transformer(latents, timestep, text, return_dict=False)[0]


# --------------------------------------------------------------------------------------------------------------------
# Parity with stock Wan while no subject is active


def test_parity_with_stock_transformer(transformer):
    latents, timestep, text = transformer_inputs(batch=2)
    stock = run(transformer, latents, timestep, text)

    transformer.set_attn_processor(SubjectSparseAttnProcessor())
    assert all(isinstance(p, SubjectSparseAttnProcessor) for p in transformer.attn_processors.values())
    assert len(transformer.attn_processors) == 4  # self and cross attention of both blocks
    assert (run(transformer, latents, timestep, text) - stock).abs().max() <= 1e-6

    state = SubjectRoutingState()  # inactive: no subjects
    transformer.set_attn_processor(SubjectSparseAttnProcessor(state))
    assert (run(transformer, latents, timestep, text) - stock).abs().max() <= 1e-6

    state = set_subject_sparse_attn_processor(transformer)
    assert isinstance(state, SubjectRoutingState) and not state.active
    procs = transformer.attn_processors
    assert all(p.state is state for p in procs.values())
    assert {n: p.layer_idx for n, p in procs.items()} == {
        "blocks.0.attn1.processor": 0, "blocks.0.attn2.processor": 0,
        "blocks.1.attn1.processor": 1, "blocks.1.attn2.processor": 1,
    }  # fmt: skip
    assert (run(transformer, latents, timestep, text) - stock).abs().max() <= 1e-6
    # still stock after an active call has finished
    with state.activate(ref_lengths=[TOKENS_PER_FRAME], mode="similarity"):
        run(transformer, torch.cat([latents, latents[:, :, :1]], dim=2), timestep, text)
    assert not state.active
    assert (run(transformer, latents, timestep, text) - stock).abs().max() <= 1e-6


def test_set_subject_sparse_attn_processor_shares_a_given_state(transformer):
    state = SubjectRoutingState(similarity_threshold=0.3)
    assert set_subject_sparse_attn_processor(transformer, state) is state
    assert all(p.state is state for p in transformer.attn_processors.values())


def test_processor_is_weight_free_and_parallel_ready(transformer):
    proc = SubjectSparseAttnProcessor()
    assert not isinstance(proc, torch.nn.Module)
    assert hasattr(SubjectSparseAttnProcessor, "_attention_backend")
    assert hasattr(SubjectSparseAttnProcessor, "_parallel_config")
    set_subject_sparse_attn_processor(transformer)
    keys = set(transformer.state_dict())
    assert not any("processor" in k for k in keys)


def test_pipeline_parity_with_stock_wan():
    kw = dict(prompt="a man and a woman walk in the park", height=32, width=32, num_frames=9, num_inference_steps=2)
    stock = WanPipeline(**tiny_wan_components())(**kw, generator=torch.Generator().manual_seed(0)).frames

    ours = WanPipeline(**tiny_wan_components())
    ours.transformer.set_attn_processor(SubjectSparseAttnProcessor())
    frames = ours(**kw, generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == stock.shape
    assert np.abs(frames - stock).max() <= 1e-6

    ours2 = WanPipeline(**tiny_wan_components())
    set_subject_sparse_attn_processor(ours2.transformer)
    assert np.abs(ours2(**kw, generator=torch.Generator().manual_seed(0)).frames - stock).max() <= 1e-6


# --------------------------------------------------------------------------------------------------------------------
# Hand-built reference for one attention module


def rotary_complex(x, cos, sin):
    """Wan's interleaved rotary as a complex multiplication: pairs (x0, x1) -> (x0 + i x1) * e^{i theta}."""
    xc = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    rot = torch.complex(cos[..., 0::2].double(), sin[..., 1::2].double())
    return torch.view_as_real(xc * rot).flatten(-2)


def reference_attention_module(attn, hidden, visible, rotary=None, context=None):
    """Explicit fp64 attention of a WanAttention module: query rows see the keys where ``visible (B, Lq, Lk)``."""
    attn64 = attn  # weights are read in float64 below
    ctx = hidden if context is None else context
    heads = attn.heads

    def lin(layer, x):
        return x.double() @ layer.weight.double().T + layer.bias.double()

    def rms(norm, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.double()

    q = rms(attn64.norm_q, lin(attn.to_q, hidden)).unflatten(-1, (heads, -1))
    k = rms(attn64.norm_k, lin(attn.to_k, ctx)).unflatten(-1, (heads, -1))
    v = lin(attn.to_v, ctx).unflatten(-1, (heads, -1))
    if rotary is not None:
        q, k = rotary_complex(q, *rotary), rotary_complex(k, *rotary)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).flatten(2)
    return lin(attn.to_out[0], out)


def self_attention_visibility(buckets, ref_lengths, ref_attends_video=False):
    """(B, L, L) bool: video token in bucket s sees video + refs of s (null: video only); a reference token sees its
    own subject's references (and the video if asked)."""
    b, lv = buckets.shape
    seg = torch.tensor([-1] * lv + [s for s, n in enumerate(ref_lengths) for _ in range(n)])
    owner = torch.cat([buckets, seg[lv:].expand(b, -1)], dim=1)  # bucket of every query
    is_video_key = seg == -1
    same = seg[None, None, :] == owner[:, :, None]
    video_query = torch.zeros(b, len(seg), dtype=torch.bool)
    video_query[:, :lv] = True
    sees_video = video_query | ref_attends_video
    return (is_video_key[None, None, :] & sees_video[:, :, None]) | (same & ~is_video_key[None, None, :])


def module_inputs(transformer, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = LV + sum(REF_LENGTHS)
    hidden = torch.randn(batch, total, 24, generator=g)
    frames = VIDEO_FRAMES + sum(REF_IMAGES)
    rotary = transformer.rope(torch.zeros(1, 16, frames, 8, 8))
    return hidden, rotary


def random_buckets(batch, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, n, (batch, LV), generator=g)


@pytest.mark.parametrize("ref_attends_video", [False, True])
def test_masks_mode_self_attention_matches_masked_reference(transformer, ref_attends_video):
    attn = transformer.blocks[0].attn1
    hidden, rotary = module_inputs(transformer)
    buckets = random_buckets(2, 2)
    assert not torch.equal(buckets[0], buckets[1])
    state = SubjectRoutingState()
    proc = SubjectSparseAttnProcessor(state, layer_idx=0)
    with (
        torch.no_grad(),
        state.activate(
            ref_lengths=REF_LENGTHS, mode="masks", mask_buckets=buckets, ref_attends_video=ref_attends_video
        ),
    ):
        out = proc(attn, hidden, None, None, rotary)
        assert torch.equal(state.buckets[0], buckets) and torch.equal(state.current_buckets, buckets)
        want = reference_attention_module(
            attn, hidden, self_attention_visibility(buckets, REF_LENGTHS, ref_attends_video), rotary
        )
    assert out.shape == hidden.shape
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    # the routing matters: the dense (unmasked) output is different
    dense = reference_attention_module(
        attn, hidden, torch.ones(2, hidden.shape[1], hidden.shape[1], dtype=torch.bool), rotary
    )
    assert (out.double() - dense).abs().max() > 1e-3


def test_stock_processor_matches_reference_helper(transformer):
    # sanity of the hand-built reference itself: all-visible == stock WanAttnProcessor
    attn = transformer.blocks[0].attn1
    hidden, rotary = module_inputs(transformer)
    with torch.no_grad():
        stock = WanAttnProcessor()(attn, hidden, None, None, rotary)
    visible = torch.ones(2, hidden.shape[1], hidden.shape[1], dtype=torch.bool)
    torch.testing.assert_close(
        stock.double(), reference_attention_module(attn, hidden, visible, rotary), atol=1e-5, rtol=1e-5
    )


def test_dense_mode_equals_stock_attention(transformer):
    attn = transformer.blocks[1].attn1
    hidden, rotary = module_inputs(transformer)
    state = SubjectRoutingState()
    proc = SubjectSparseAttnProcessor(state, layer_idx=1)
    with torch.no_grad(), state.activate(ref_lengths=REF_LENGTHS, mode="dense"):
        out = proc(attn, hidden, None, None, rotary)
    with torch.no_grad():
        stock = WanAttnProcessor()(attn, hidden, None, None, rotary)
    assert (out - stock).abs().max() <= 1e-6


def test_similarity_mode_routes_by_cosine_to_mean_reference_key(transformer):
    attn = transformer.blocks[0].attn1
    hidden, rotary = module_inputs(transformer, seed=3)
    state = SubjectRoutingState()
    proc = SubjectSparseAttnProcessor(state, layer_idx=0)
    threshold = 0.05
    with torch.no_grad(), state.activate(ref_lengths=REF_LENGTHS, mode="similarity", similarity_threshold=threshold):
        out = proc(attn, hidden, None, None, rotary)
        buckets = state.buckets[0]
        # independent computation of the training-free routing (pre-rotary queries/keys)
        q = attn.norm_q(attn.to_q(hidden)).unflatten(-1, (attn.heads, -1))[:, :LV]
        k = attn.norm_k(attn.to_k(hidden)).unflatten(-1, (attn.heads, -1))
        refs = k[:, LV:].split(REF_LENGTHS, dim=1)
        scores = []
        for r in refs:
            mean = r.mean(dim=1)  # (B, H, D)
            cos = torch.nn.functional.cosine_similarity(q, mean[:, None], dim=-1)  # (B, Lv, H)
            scores.append(cos.mean(-1))
        scores = torch.stack(scores, -1)
        best, idx = scores.max(-1)
        expected = torch.where(best >= threshold, idx, torch.full_like(idx, -1))
        want = reference_attention_module(attn, hidden, self_attention_visibility(buckets, REF_LENGTHS), rotary)
    assert torch.equal(buckets, expected)
    assert (buckets >= 0).any() and buckets.shape == (2, LV)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    # a threshold above every cosine routes everything to null
    with torch.no_grad(), state.activate(ref_lengths=REF_LENGTHS, mode="similarity", similarity_threshold=1.5):
        proc(attn, hidden, None, None, rotary)
        assert (state.buckets[0] == -1).all()


def test_router_mode_uses_router_argmax(transformer):
    attn = transformer.blocks[1].attn1
    hidden, rotary = module_inputs(transformer, seed=4)
    torch.manual_seed(0)
    router = IDRouter.from_transformer(transformer, router_dim=16, num_identity_queries=4, num_heads=2)
    phrases = [torch.randn(2, 3, 32), torch.randn(2, 2, 32)]
    state = SubjectRoutingState()
    proc = SubjectSparseAttnProcessor(state, layer_idx=1)
    with (
        torch.no_grad(),
        state.activate(ref_lengths=REF_LENGTHS, mode="router", router=router, phrase_features=phrases, record=True),
    ):
        out = proc(attn, hidden, None, None, rotary)
        anchors = router.encode_anchors(list(hidden[:, LV:].split(REF_LENGTHS, dim=1)), phrases)
        logits = router(hidden[:, :LV], anchors, 1)
        torch.testing.assert_close(state.logits[1], logits)
        assert torch.equal(state.buckets[1], buckets_from_logits(logits))
        want = reference_attention_module(
            attn, hidden, self_attention_visibility(state.buckets[1], REF_LENGTHS), rotary
        )
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_router_mode_without_layer_idx_raises(transformer):
    router = IDRouter.from_transformer(transformer, router_dim=16, num_identity_queries=4, num_heads=2)
    state = SubjectRoutingState()
    transformer.set_attn_processor(SubjectSparseAttnProcessor(state))  # one shared instance: no layer index
    latents, timestep, text = transformer_inputs(frames=VIDEO_FRAMES + 1)
    with state.activate(ref_lengths=[TOKENS_PER_FRAME], mode="router", router=router):
        with pytest.raises(ValueError, match="set_subject_sparse_attn_processor"):
            run(transformer, latents, timestep, text)


def test_declaring_more_reference_tokens_than_the_sequence_raises(transformer):
    attn = transformer.blocks[0].attn1
    hidden, rotary = module_inputs(transformer)
    state = SubjectRoutingState()
    proc = SubjectSparseAttnProcessor(state, layer_idx=0)
    with (
        state.activate(ref_lengths=[hidden.shape[1]], mode="similarity"),
        pytest.raises(ValueError, match="reference"),
    ):
        proc(attn, hidden, None, None, rotary)


def test_masks_mode_wrong_bucket_shape_raises(transformer):
    attn = transformer.blocks[0].attn1
    hidden, rotary = module_inputs(transformer)
    state = SubjectRoutingState()
    proc = SubjectSparseAttnProcessor(state, layer_idx=0)
    with state.activate(ref_lengths=REF_LENGTHS, mode="masks", mask_buckets=torch.zeros(2, LV + 1, dtype=torch.long)):
        with pytest.raises(ValueError, match="mask_buckets"):
            proc(attn, hidden, None, None, rotary)


# --------------------------------------------------------------------------------------------------------------------
# Text routing in cross-attention

TEXT_LEN = 12
PHRASES = [[2, 3], [6, 7, 8]]  # token positions of subject 0's and subject 1's phrases


def text_segments(batch):
    general = [t for t in range(TEXT_LEN) if t not in PHRASES[0] + PHRASES[1]]
    order = torch.tensor(general + PHRASES[0] + PHRASES[1])
    return [TextSegments(order=order, lengths=[len(p) for p in PHRASES]) for _ in range(batch)]


def cross_visibility(buckets):
    b = buckets.shape[0]
    owner = torch.cat(
        [buckets, torch.tensor([s for s, n in enumerate(REF_LENGTHS) for _ in range(n)]).expand(b, -1)], 1
    )
    key_owner = torch.full((TEXT_LEN,), -1)
    for s, pos in enumerate(PHRASES):
        key_owner[pos] = s
    return (key_owner[None, None, :] == -1) | (key_owner[None, None, :] == owner[:, :, None])


def test_text_routing_in_cross_attention(transformer):
    attn = transformer.blocks[0].attn2
    assert attn.is_cross_attention
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, LV + sum(REF_LENGTHS), 24, generator=g)
    text = torch.randn(2, TEXT_LEN, 24, generator=g)  # after the condition embedder the text has the model width
    buckets = random_buckets(2, 2, seed=6)
    state = SubjectRoutingState()
    proc = SubjectSparseAttnProcessor(state, layer_idx=0)

    def call(txt):
        with torch.no_grad(), state.activate(ref_lengths=REF_LENGTHS, mode="masks", mask_buckets=buckets,
                                             text_segments=text_segments(2)):  # fmt: skip
            state.current_buckets = buckets  # what the self-attention of this block would have set
            return proc(attn, hidden, txt, None, None)

    out = call(text)
    want = reference_attention_module(attn, hidden, cross_visibility(buckets), context=text)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)

    perturbed = text.clone()
    perturbed[:, PHRASES[1]] += torch.randn(2, len(PHRASES[1]), 24, generator=g) * 3
    out2 = call(perturbed)
    owner = torch.cat(
        [buckets, torch.tensor([s for s, n in enumerate(REF_LENGTHS) for _ in range(n)]).expand(2, -1)], 1
    )
    diff = (out2 - out).abs().amax(-1)
    assert (diff[owner == 1] > 1e-4).all()  # tokens routed to subject 1 see its phrase...
    assert (diff[owner != 1] == 0).all()  # ...nobody else does (subject 0, null, subject 0's references)

    # with no text routing the cross-attention is stock: everyone sees the whole prompt
    with torch.no_grad(), state.activate(ref_lengths=REF_LENGTHS, mode="masks", mask_buckets=buckets):
        state.current_buckets = buckets
        plain = proc(attn, hidden, text, None, None)
        stock = WanAttnProcessor()(attn, hidden, text, None, None)
    assert (plain - stock).abs().max() <= 1e-6


def test_text_routing_batch_size_mismatch_raises(transformer):
    attn = transformer.blocks[0].attn2
    hidden = torch.randn(2, LV + sum(REF_LENGTHS), 24)
    state = SubjectRoutingState()
    proc = SubjectSparseAttnProcessor(state, layer_idx=0)
    buckets = random_buckets(2, 2)
    with state.activate(ref_lengths=REF_LENGTHS, mode="masks", mask_buckets=buckets, text_segments=text_segments(1)):
        state.current_buckets = buckets
        with pytest.raises(ValueError, match="text_segments"):
            proc(attn, hidden, torch.randn(2, TEXT_LEN, 24), None, None)


# --------------------------------------------------------------------------------------------------------------------
# Whole transformer with subjects active


def test_all_null_routing_equals_video_only_transformer(transformer):
    state = set_subject_sparse_attn_processor(transformer)
    latents, timestep, text = transformer_inputs(batch=2, seed=7)
    refs = torch.randn(2, 16, sum(REF_IMAGES), 8, 8, generator=torch.Generator().manual_seed(8))
    video_only = run(transformer, latents, timestep, text)
    with state.activate(ref_lengths=REF_LENGTHS, mode="masks", mask_buckets=torch.full((2, LV), -1)):
        out = run(transformer, torch.cat([latents, refs], dim=2), timestep, text)
    assert out.shape == (2, 16, VIDEO_FRAMES + sum(REF_IMAGES), 8, 8)
    torch.testing.assert_close(out[:, :, :VIDEO_FRAMES], video_only, atol=1e-5, rtol=1e-5)

    # routing video tokens to subjects changes their output
    with state.activate(ref_lengths=REF_LENGTHS, mode="masks", mask_buckets=random_buckets(2, 2)):
        routed = run(transformer, torch.cat([latents, refs], dim=2), timestep, text)
    assert (routed[:, :, :VIDEO_FRAMES] - video_only).abs().max() > 1e-4

    # references do not see the video (default): their outputs ignore the video latents
    with state.activate(ref_lengths=REF_LENGTHS, mode="masks", mask_buckets=random_buckets(2, 2)):
        other = run(transformer, torch.cat([latents + 1.0, refs], dim=2), timestep, text)
    torch.testing.assert_close(other[:, :, VIDEO_FRAMES:], routed[:, :, VIDEO_FRAMES:], atol=1e-5, rtol=1e-5)
    assert not state.active


@pytest.mark.parametrize("mode", ["similarity", "router", "dense"])
def test_transformer_runs_and_records_per_layer_buckets(transformer, mode):
    state = set_subject_sparse_attn_processor(transformer)
    latents, timestep, text = transformer_inputs(batch=2, frames=VIDEO_FRAMES + sum(REF_IMAGES))
    kwargs = {}
    if mode == "router":
        kwargs["router"] = IDRouter.from_transformer(transformer, routed_layers=[0], router_dim=16,
                                                     num_identity_queries=4, num_heads=2)  # fmt: skip
    with state.activate(ref_lengths=REF_LENGTHS, mode=mode, record=True, **kwargs):
        out = run(transformer, latents, timestep, text)
        recorded = dict(state.buckets)
        last = state.current_buckets  # the buckets the last self-attention (layer 1) used
    assert torch.isfinite(out).all()
    if mode == "dense":
        assert recorded == {}
        stock = SubjectRoutingState()
        transformer.set_attn_processor(SubjectSparseAttnProcessor(stock))
        assert (run(transformer, latents, timestep, text) - out).abs().max() <= 1e-6
    else:
        # every routed layer records its buckets (layer 1 is not routed by this router: it reuses layer 0's)
        assert sorted(recorded) == ([0] if mode == "router" else [0, 1])
        for b in recorded.values():
            assert b.shape == (2, LV) and b.min() >= -1 and b.max() < 2
    if mode == "router":
        assert torch.equal(last, recorded[0])


def test_straight_through_gradient_reaches_router_through_the_transformer(transformer):
    router = IDRouter.from_transformer(transformer, router_dim=16, num_identity_queries=4, num_heads=2)
    state = set_subject_sparse_attn_processor(transformer)
    latents, timestep, text = transformer_inputs(batch=1, frames=VIDEO_FRAMES + sum(REF_IMAGES))
    with state.activate(ref_lengths=REF_LENGTHS, mode="router", router=router, router_gradient="none"):
        with torch.no_grad():
            hard = transformer(latents, timestep, text, return_dict=False)[0]
    with state.activate(ref_lengths=REF_LENGTHS, mode="router", router=router, router_gradient="straight_through"):
        out = transformer(latents, timestep, text, return_dict=False)[0]
        buckets = state.buckets[0]
    assert (buckets >= 0).any()
    torch.testing.assert_close(out.detach(), hard, atol=1e-5, rtol=1e-5)  # forward unchanged
    out.square().mean().backward()
    # the routing head of layer 0 (which routed tokens to subjects) receives gradient
    head0 = [p.grad for n, p in router.named_parameters() if n.startswith("to_token.0.")]
    assert head0 and all(g is not None and g.abs().sum() > 0 for g in head0)
    assert router.identity_queries.grad is not None and router.identity_queries.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------------------------
# SubjectRoutingState


def test_activate_restores_previous_inputs_and_clears_outputs():
    state = SubjectRoutingState(similarity_threshold=0.2)
    state.buckets[3] = torch.zeros(1, 2)
    with state.activate(ref_lengths=[4, 5], mode="dense", similarity_threshold=0.7) as s:
        assert s is state and state.active and state.num_subjects == 2
        assert state.mode == "dense" and state.similarity_threshold == 0.7
        assert state.buckets == {} and state.current_buckets is None  # outputs cleared
        state.buckets[0] = torch.ones(1, 2)
    assert not state.active and state.ref_lengths == [] and state.mode == "similarity"
    assert state.similarity_threshold == 0.2
    assert 0 in state.buckets  # outputs stay readable after the block
    # restored even if the body raises
    with pytest.raises(RuntimeError), state.activate(ref_lengths=[1], mode="dense"):
        raise RuntimeError("boom")
    assert not state.active and state.mode == "similarity"
    # nested activations restore in order
    with state.activate(ref_lengths=[1]):
        with state.activate(ref_lengths=[2, 2], mode="dense"):
            assert state.ref_lengths == [2, 2]
        assert state.ref_lengths == [1] and state.mode == "similarity"
    state.reset()
    assert state.similarity_threshold == 0.0 and state.buckets == {}


def test_activate_rejects_bad_inputs():
    state = SubjectRoutingState()
    with pytest.raises(ValueError, match="unknown"), state.activate(ref_lengths=[1], bogus=3):
        pass
    with pytest.raises(ValueError, match="mode"), state.activate(ref_lengths=[1], mode="magic"):
        pass
    with pytest.raises(ValueError, match="router"), state.activate(ref_lengths=[1], mode="router"):
        pass
    with pytest.raises(ValueError, match="mask_buckets"), state.activate(ref_lengths=[1], mode="masks"):
        pass
    assert not state.active and state.mode == "similarity"  # nothing was applied
