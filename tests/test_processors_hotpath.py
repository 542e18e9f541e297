"""The routed processors' hot path: batched text routing (one op call per query kind for a whole batch, whatever each
prompt's phrase layout or padding) exact against per-sample calls and against a float64 masked reference, forward
and backward; no device-to-host read in a whole routed Wan transformer forward in any routing mode; and
``torch.compile(fullgraph=True)`` of the whole transformer in every mode, equal to eager.
"""

from __future__ import annotations

import pytest
import torch
from _host_reads import HostReads

from diasr_diffusers import IDRouter, set_subject_sparse_attn_processor
from diasr_diffusers.ops import _torch_backend as torch_backend_module
from diasr_diffusers.processors import SubjectRoutingState, TextSegments
from diasr_diffusers.processors.core import routed_cross_attention, routed_joint_attention
from diasr_diffusers.utils.tiny import tiny_wan_components

HEADS, DIM = 2, 8
REF_LENGTHS = [5, 3]
LT = 10
# Three prompts, three phrase layouts: sample 1 drops two padding tokens (its order lists 8 of the 10 positions),
# sample 2 has an empty phrase for subject 1, samples 0 and 3 share a layout (their key sets share slots).
LAYOUTS = [
    ([0, 1, 4, 5, 9], [[2, 3], [6, 7, 8]]),
    ([0, 3, 4], [[1, 2], [5, 6, 7]]),
    ([0, 1, 2, 3, 4, 5, 6, 8], [[7, 9], []]),
    ([0, 1, 4, 5, 9], [[2, 3], [6, 7, 8]]),
]
TEXT_MASK = torch.tensor([[True] * 10, [True] * 8 + [False] * 2, [True] * 9 + [False], [True] * 7 + [False] * 3])


def segments(layouts=LAYOUTS):
    return [TextSegments(torch.tensor(g + [p for ph in phrases for p in ph]), [len(p) for p in phrases])
            for g, phrases in layouts]  # fmt: skip


def randn(*shape, seed, grad=True):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).requires_grad_(grad)


def owner_of_text(layouts, text_mask=None):
    """``(B, Lt)`` owner of each text token: -1 general, s subject s's phrase, -2 nobody (dropped or padding)."""
    owner = torch.full((len(layouts), LT), -2)
    for b, (general, phrases) in enumerate(layouts):
        owner[b, general] = -1
        for s, p in enumerate(phrases):
            owner[b, p] = s
    if text_mask is not None:
        owner[~text_mask] = -2
    return owner


def masked_reference(q, k, v, visible, bias=None, biased=None):
    """float64 softmax attention over exactly the visible keys (rows that see nothing: zeros)."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    if bias is not None:
        scores = scores + (bias[:, :, None] * biased)[:, None]
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.nan_to_num(scores.softmax(-1), nan=0.0)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def grads_of(out, inputs, seed):
    g = randn(*out.shape, seed=seed, grad=False)
    return torch.autograd.grad(out, inputs, g, allow_unused=True, retain_graph=True)


def assert_all_close(got, want, tol=1e-10):
    for a, b in zip(got, want):
        if a is None and b is None:
            continue
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


# --------------------------------------------------------------------------------------------------------------------
# Batched text routing = per-sample calls = masked reference


@pytest.mark.parametrize("query_range", [None, (3, 17)])
def test_batched_cross_attention_is_exact_per_sample(query_range):
    batch, lv = len(LAYOUTS), 12
    lq = lv + sum(REF_LENGTHS)
    q, k, v = (
        randn(batch, lq, HEADS, DIM, seed=0),
        randn(batch, LT, HEADS, DIM, seed=1),
        randn(batch, LT, HEADS, DIM, seed=2),
    )
    buckets = torch.randint(-1, 2, (batch, lv), generator=torch.Generator().manual_seed(3))
    rows = slice(*query_range) if query_range else slice(None)
    state = SubjectRoutingState()
    with state.activate(ref_lengths=REF_LENGTHS, mode="masks", mask_buckets=buckets, text_segments=segments()):
        out = routed_cross_attention(q[:, rows], k, v, state, buckets, query_range)
    per_sample = []
    for b in range(batch):
        with state.activate(ref_lengths=REF_LENGTHS, mode="masks", mask_buckets=buckets[b : b + 1],
                            text_segments=segments()[b : b + 1]):  # fmt: skip
            per_sample.append(routed_cross_attention(q[b : b + 1, rows], k[b : b + 1], v[b : b + 1], state,
                                                     buckets[b : b + 1], query_range))  # fmt: skip
    per_sample = torch.cat(per_sample)
    torch.testing.assert_close(out, per_sample, atol=1e-12, rtol=1e-12)
    assert_all_close(grads_of(out, (q, k, v), 4), grads_of(per_sample, (q, k, v), 4))

    subject = torch.tensor([s for s, n in enumerate(REF_LENGTHS) for _ in range(n)])
    owner = torch.cat([buckets, subject.expand(batch, -1)], 1)[:, rows]
    key_owner = owner_of_text(LAYOUTS)
    visible = (key_owner[:, None] == -1) | (key_owner[:, None] == owner[:, :, None])
    want = masked_reference(q[:, rows], k, v, visible)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)
    assert_all_close(grads_of(out, (q, k, v), 5), grads_of(want, (q, k, v), 5))


def joint_reference(buckets, layouts, text_mask, bias, ref_attends_video, tq, tk, tv, vq, vk, vv, rq, rk, rv):
    """Video and reference outputs of the joint attention from one explicit (B, Lq, Lt + Lv + R) visibility mask."""
    batch, lv = buckets.shape
    owner = owner_of_text(layouts, text_mask)
    subject = torch.tensor([s for s, n in enumerate(REF_LENGTHS) for _ in range(n)]).expand(batch, -1)
    key_owner = torch.cat([owner, torch.full((batch, lv), -1), subject], 1)  # video keys: everyone's
    is_ref = torch.cat([torch.zeros(batch, LT + lv, dtype=torch.bool), torch.ones_like(subject, dtype=torch.bool)], 1)
    k, v = torch.cat([tk, vk, rk], 1), torch.cat([tv, vv, rv], 1)
    video_visible = (key_owner[:, None] == -1) | (key_owner[:, None] == buckets[:, :, None])
    video_visible &= ~is_ref[:, None] | (buckets[:, :, None] >= 0)  # a null token sees no reference
    biased = ((key_owner[:, None] == buckets[:, :, None]) & (buckets[:, :, None] >= 0)).double()
    video = masked_reference(vq, k, v, video_visible, bias, biased if bias is not None else None)
    ref_visible = (key_owner[:, None] == -1) | (key_owner[:, None] == subject[:, :, None])
    if not ref_attends_video:
        ref_visible[:, :, LT : LT + lv] = False
    return video, masked_reference(rq, k, v, ref_visible)


@pytest.mark.parametrize(
    "text_routing,text_mask,bias,ref_attends_video",
    [(True, False, False, False), (True, True, True, False), (True, False, True, True), (False, True, False, True),
     (False, True, True, False)],
)  # fmt: skip
def test_batched_joint_attention_is_exact_per_sample(text_routing, text_mask, bias, ref_attends_video):
    batch, lv = len(LAYOUTS), 12
    parts = [randn(batch, n, HEADS, DIM, seed=10 * i + j) for i, n in enumerate([LT, lv, sum(REF_LENGTHS)]) for j in range(3)]  # fmt: skip
    buckets = torch.randint(-1, 2, (batch, lv), generator=torch.Generator().manual_seed(3))
    seg_bias = randn(batch, lv, seed=40) if bias else None
    mask = TEXT_MASK if text_mask else None
    state = SubjectRoutingState()

    def run(rows):
        inputs = {"ref_lengths": REF_LENGTHS, "mode": "masks", "mask_buckets": buckets[rows],
                  "ref_attends_video": ref_attends_video,
                  "text_segments": segments()[rows] if text_routing else None}  # fmt: skip
        with state.activate(**inputs):
            triples = [tuple(t[rows] for t in parts[i : i + 3]) for i in (0, 3, 6)]
            _, video, refs = routed_joint_attention(
                state, buckets[rows], *triples, None if seg_bias is None else seg_bias[rows],
                None if mask is None else mask[rows],
            )  # fmt: skip
        return video, refs

    video, refs = run(slice(None))
    singles = [run(slice(b, b + 1)) for b in range(batch)]
    per_video, per_refs = torch.cat([s[0] for s in singles]), torch.cat([s[1] for s in singles])
    torch.testing.assert_close(video, per_video, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(refs, per_refs, atol=1e-12, rtol=1e-12)
    inputs = (*parts, *([seg_bias] if bias else []))
    assert_all_close(grads_of(video, inputs, 1), grads_of(per_video, inputs, 1))
    assert_all_close(grads_of(refs, inputs, 2), grads_of(per_refs, inputs, 2))

    layouts = LAYOUTS if text_routing else [(list(range(LT)), [[], []])] * batch
    want_video, want_refs = joint_reference(buckets, layouts, mask, seg_bias, ref_attends_video, *parts)
    torch.testing.assert_close(video, want_video, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(refs, want_refs, atol=1e-12, rtol=1e-12)
    assert_all_close(grads_of(video, inputs, 3), grads_of(want_video, inputs, 3))
    assert_all_close(grads_of(refs, inputs, 4), grads_of(want_refs, inputs, 4))


def test_text_segments_are_checked_once_at_activate():
    state = SubjectRoutingState()
    bad = [TextSegments(torch.tensor([0, 1, 1, 2]), [1, 1])]
    with pytest.raises(ValueError, match="distinct"):
        with state.activate(ref_lengths=[2, 2], text_segments=bad):
            pass
    with pytest.raises(ValueError, match="orders only"):
        with state.activate(ref_lengths=[2, 2], text_segments=[TextSegments(torch.tensor([0, 1]), [2, 1])]):
            pass
    with pytest.raises(ValueError, match=r"mask_buckets.*\[-1, 2\)"):
        with state.activate(ref_lengths=[2, 2], mode="masks", mask_buckets=torch.tensor([[0, 2]])):
            pass


# --------------------------------------------------------------------------------------------------------------------
# A whole routed Wan transformer: no host read, and torch.compile(fullgraph=True)

FRAMES, REF_IMAGES, TOKENS_PER_FRAME, TEXT_TOKENS = 2, [1, 1], 4, 8
LV = FRAMES * TOKENS_PER_FRAME
WAN_REFS = [n * TOKENS_PER_FRAME for n in REF_IMAGES]
MODES = ["similarity", "router", "router_context", "masks", "text", "dense"]


@pytest.fixture(scope="module")
def wan():
    transformer = tiny_wan_components(num_layers=2)["transformer"].eval()
    state = set_subject_sparse_attn_processor(transformer)
    g = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn(2, 16, FRAMES + sum(REF_IMAGES), 4, 4, generator=g),
        torch.tensor([500.0, 500.0]),
        torch.randn(2, TEXT_TOKENS, 32, generator=g),
    )
    return transformer, state, inputs


def routing_inputs(transformer, mode):
    """State inputs of each mode; batch 2 with two different phrase layouts for text routing."""
    inputs = {"ref_lengths": WAN_REFS, "mode": mode}
    if mode.startswith("router"):
        context = 3 if mode == "router_context" else 1
        torch.manual_seed(0)
        router = IDRouter.from_transformer(transformer, routed_layers=[0], router_dim=16, num_identity_queries=4,
                                           num_heads=2, context_kernel=context)  # fmt: skip
        phrases = [torch.randn(2, 3, 32), torch.randn(2, 2, 32)]
        inputs.update(mode="router", router=router, video_grid=(FRAMES, 2, 2), phrase_features=phrases,
                      phrase_masks=[torch.tensor([[True, True, False]] * 2), torch.ones(2, 2, dtype=torch.bool)])  # fmt: skip
    if mode in ("masks", "text"):
        inputs.update(mode="masks", mask_buckets=torch.tensor([[0, 1, -1, 0, 1, 1, -1, 0]] * 2))
    if mode == "text":
        inputs["text_segments"] = [TextSegments(torch.tensor([0, 1, 4, 5, 6, 7, 2, 3]), [1, 1]),
                                   TextSegments(torch.tensor([0, 3, 4, 5, 1, 2, 6]), [2, 1])]  # fmt: skip
    return inputs


def forward(transformer, inputs):
    return transformer(*inputs, return_dict=False)[0]


@pytest.mark.parametrize("mode", MODES)
def test_no_host_read_in_a_routed_transformer_forward(wan, mode, monkeypatch):
    transformer, state, inputs = wan
    # The accelerator path: on CPU the torch backend's grouped routes read group sizes (no device sync there); off.
    monkeypatch.setattr(torch_backend_module, "HOST_READS_ON_CPU", False)
    routing = routing_inputs(transformer, mode)
    with torch.no_grad(), state.activate(**routing):  # setup (checks, text positions): once per step, outside
        with HostReads(monkeypatch) as rec:
            out = forward(transformer, inputs)
            again = forward(transformer, inputs)  # a second step with the same state
        assert mode == "dense" or state.buckets  # routed layers ran
    assert rec.reads == []
    assert torch.isfinite(out).all() and torch.equal(out, again)

    # the recorder sees this forward's reads: the grouped CPU route reads its group sizes
    monkeypatch.setattr(torch_backend_module, "HOST_READS_ON_CPU", True)
    with torch.no_grad(), state.activate(**routing), HostReads(monkeypatch) as rec:
        grouped = forward(transformer, inputs)
    assert (rec.reads != []) == (mode != "dense")
    torch.testing.assert_close(grouped, out, atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # about 4 s of CPU per mode (Dynamo tracing the whole transformer), in the default run
@pytest.mark.parametrize("mode", MODES)
def test_whole_transformer_compiles_without_graph_breaks(wan, mode):
    transformer, state, inputs = wan
    torch._dynamo.reset()  # one mode per compiled graph, far from the recompile limit
    # aot_eager: Dynamo's graph (fullgraph: any graph break raises) through AOT autograd's functionalized tracing,
    # what Inductor compiles, without Inductor's C++ build (minutes on this CPU).
    compiled = torch.compile(transformer, fullgraph=True, backend="aot_eager", dynamic=False)
    routing = routing_inputs(transformer, mode)
    with torch.no_grad(), state.activate(**routing):
        eager = forward(transformer, inputs)
        eager_buckets = dict(state.buckets)
    with torch.no_grad(), state.activate(**routing):
        out = forward(compiled, inputs)
        assert sorted(state.buckets) == sorted(eager_buckets)  # the graph replays the state's recorded buckets
        for layer, b in eager_buckets.items():
            assert torch.equal(state.buckets[layer], b), layer
        assert mode == "dense" or state.buckets
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_no_host_read_in_routed_joint_attention_with_text_routing(bias, monkeypatch):
    """The joint-attention families (CogVideoX here) too: text routing with a different phrase layout per sample."""
    from diasr_diffusers.processors import CogVideoXSubjectSparseAttnProcessor
    from diasr_diffusers.utils.tiny import tiny_cogvideox_components

    monkeypatch.setattr(torch_backend_module, "HOST_READS_ON_CPU", False)
    attn = tiny_cogvideox_components()["transformer"].transformer_blocks[0].attn1
    g = torch.Generator().manual_seed(0)
    hidden, text = torch.randn(2, 8 + 12, 32, generator=g), torch.randn(2, 6, 32, generator=g)
    rope = (torch.randn(20, 16, generator=g), torch.randn(20, 16, generator=g))
    segments = [
        TextSegments(torch.tensor([0, 3, 5, 1, 2, 4]), [2, 1]),
        TextSegments(torch.tensor([0, 1, 2, 3, 4]), [1, 2]),
    ]
    state = SubjectRoutingState()
    proc = CogVideoXSubjectSparseAttnProcessor(state, layer_idx=0)
    routing = {"ref_lengths": [4, 8], "mode": "masks", "mask_buckets": torch.tensor([[0, 1, -1, 0, 1, 1, -1, 0]] * 2),
               "text_segments": segments}  # fmt: skip
    if bias:  # the router's straight-through carrier (value 0) as the segment bias: the extra-channel route
        # with autograd the "torch" backend reads its group sizes (the GPU path is "triton"): the dense reference here
        routing.update(mode="router", mask_buckets=None, router_gradient="straight_through", backend="dense",
                       router=IDRouter(hidden_dim=32, text_dim=32, num_layers=1, router_dim=16,
                                       num_identity_queries=4, num_heads=2))  # fmt: skip
    with torch.set_grad_enabled(bias), state.activate(**routing):
        with HostReads(monkeypatch) as rec:
            video, txt = proc(attn, hidden, text, None, rope)
    assert rec.reads == []
    assert torch.isfinite(video).all() and torch.isfinite(txt).all()
