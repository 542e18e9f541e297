"""IDRouter (sizes, routed layers, logits, anchors, save/load, straight-through gradients), routing losses and the
mask -> token-grid helpers."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from diasr_diffusers import IDRouter, bucketed_attention
from diasr_diffusers.routing import (
    buckets_from_logits,
    chosen_log_prob,
    mask_loss,
    masks_to_token_grid,
    resolve_routed_layers,
    routing_cross_entropy,
    routing_labels_from_coverage,
    token_grid_factors,
)
from diasr_diffusers.utils.tiny import tiny_wan_components


@pytest.fixture(scope="module")
def components():
    return tiny_wan_components(num_layers=3)


@pytest.fixture(scope="module")
def transformer(components):
    return components["transformer"]


def small_router(**kwargs):
    torch.manual_seed(0)
    cfg = dict(hidden_dim=24, text_dim=32, num_layers=4, router_dim=16, num_identity_queries=4, num_heads=2)
    cfg.update(kwargs)
    return IDRouter(**cfg)


def anchor_inputs(batch=2, n=2, seed=0, ref_tokens=(6, 9), text_tokens=(3, 5)):
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(batch, ref_tokens[s % len(ref_tokens)], 24, generator=g) for s in range(n)]
    texts = [torch.randn(batch, text_tokens[s % len(text_tokens)], 32, generator=g) for s in range(n)]
    return images, texts


# --------------------------------------------------------------------------------------------------------------------
# Construction


def test_from_transformer_reads_sizes(transformer):
    router = IDRouter.from_transformer(transformer)
    cfg = transformer.config
    assert router.config.hidden_dim == cfg.num_attention_heads * cfg.attention_head_dim == 24
    assert router.config.text_dim == cfg.text_dim == 32
    assert router.config.num_layers == cfg.num_layers == 3
    assert router.routed_layer_indices == [0, 1, 2]
    assert len(router.to_token) == 3
    # it accepts the transformer's token width and the text encoder's width, and nothing else
    images = [torch.randn(1, 4, 24)]
    anchors = router.encode_anchors(images, [torch.randn(1, 3, 32)])
    assert router(torch.randn(1, 5, 24), anchors, layer_idx=2).shape == (1, 5, 2)
    with pytest.raises(ValueError, match=r"`image_tokens\[0\]` must be \(B, R >= 1, 24\)"):
        router.encode_anchors([torch.randn(1, 4, 25)])
    with pytest.raises(ValueError, match=r"`text_tokens\[0\]` must be \(1, T, 32\)"):
        router.encode_anchors(images, [torch.randn(1, 3, 31)])
    # kwargs are forwarded
    router2 = IDRouter.from_transformer(transformer, routed_layers=[2], router_dim=8, max_subjects=3)
    assert router2.routed_layer_indices == [2] and router2.config.router_dim == 8 and router2.config.max_subjects == 3


def test_from_transformer_without_text_width_raises():
    class Cfg:
        num_attention_heads, attention_head_dim, num_layers = 2, 4, 2

    class Fake:
        config = Cfg()

    with pytest.raises(ValueError, match="text_dim"):
        IDRouter.from_transformer(Fake())


@pytest.mark.parametrize(
    "spec, expected",
    [("all", [0, 1, 2, 3, 4, 5, 6]), (1, [0, 1, 2, 3, 4, 5, 6]), (2, [0, 2, 4, 6]), (3, [0, 3, 6]), (7, [0]),
     ([5, 1, 1, 3], [1, 3, 5]), ((0, 6), [0, 6])],
)  # fmt: skip
def test_routed_layers_specs(spec, expected):
    assert resolve_routed_layers(spec, 7) == expected
    router = small_router(num_layers=7, routed_layers=spec)
    assert router.routed_layer_indices == expected
    assert len(router.to_token) == len(router.to_anchor) == len(expected)


@pytest.mark.parametrize("spec", [0, -2, [], [7], [-1, 2], "some", 2.5, True, None])
def test_bad_routed_layers(spec):
    with pytest.raises(ValueError, match="routed_layers"):
        small_router(num_layers=7, routed_layers=spec)


def test_unrouted_layers_reuse_the_last_routed_head():
    router = small_router(num_layers=7, routed_layers=[2, 5])
    assert [router.head_index(i) for i in range(7)] == [0, 0, 0, 0, 0, 1, 1]
    assert router.is_routed(2) and router.is_routed(5) and not router.is_routed(3) and not router.is_routed(6)
    video = torch.randn(1, 10, 24)
    images, texts = anchor_inputs(batch=1)
    anchors = router.encode_anchors(images, texts)
    torch.testing.assert_close(router(video, anchors, layer_idx=3), router(video, anchors, layer_idx=2))
    torch.testing.assert_close(router(video, anchors, layer_idx=6), router(video, anchors, layer_idx=5))
    assert (router(video, anchors, layer_idx=5) - router(video, anchors, layer_idx=2)).abs().max() > 1e-6


# --------------------------------------------------------------------------------------------------------------------
# Anchors and logits


@pytest.mark.parametrize("n", [1, 2, 3])
def test_logits_shape_and_buckets(n):
    router = small_router()
    images, texts = anchor_inputs(batch=2, n=n)
    anchors = router.encode_anchors(images, texts)
    assert anchors.shape == (2, n, 16)
    logits = router(torch.randn(2, 13, 24), anchors, layer_idx=1)
    assert logits.shape == (2, 13, n + 1) and torch.isfinite(logits).all()
    buckets = router.buckets(logits)
    assert buckets.shape == (2, 13) and buckets.dtype == torch.int64
    assert buckets.min() >= -1 and buckets.max() < n
    argmax = logits.argmax(-1)
    torch.testing.assert_close(buckets, torch.where(argmax == n, -1, argmax))


def test_context_kernel_adds_the_frame_neighbourhood_mean():
    router = small_router(context_kernel=3)
    anchors = router.encode_anchors(*anchor_inputs(batch=1, n=2))
    grid = (2, 3, 4)  # F, H, W: 24 tokens in F-H-W order
    tokens = torch.randn(1, 24, 24)
    normed = router.token_norm(tokens).view(2, 3, 4, 24)
    # Direct: mean over the in-frame 3x3 window clipped at the border.
    want = torch.stack([
        normed[f, max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2].mean(dim=(0, 1))
        for f in range(2) for i in range(3) for j in range(4)
    ])[None]  # fmt: skip
    torch.testing.assert_close(router._local_mean(router.token_norm(tokens), grid), want)
    logits = router(tokens, anchors, 0, grid=grid)
    # A token's logits depend on its in-frame 3x3 neighbours only: change token (f=1, h=0, w=0).
    changed = tokens.clone()
    changed[0, 12] += 5.0
    moved = (router(changed, anchors, 0, grid=grid) - logits).abs().sum(-1)[0].view(2, 3, 4)
    assert (moved[1, :2, :2] > 0).all()
    assert moved[0].abs().max() == 0 and moved[1, 2].abs().max() == 0 and moved[1, :, 2:].abs().max() == 0


def test_context_kernel_errors():
    for bad in (2, 0, 3.0, True):
        with pytest.raises(ValueError, match="`context_kernel` must be an odd integer"):
            small_router(context_kernel=bad)
    router = small_router(context_kernel=3)
    anchors = router.encode_anchors(*anchor_inputs(batch=1, n=1))
    for grid in (None, (1, 3, 3)):
        with pytest.raises(ValueError, match="needs `grid=\\(F, H, W\\)`"):
            router(torch.randn(1, 10, 24), anchors, 0, grid=grid)


def test_buckets_from_logits_null_is_minus_one():
    logits = torch.tensor([[[5.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 1.0, 9.0], [2.0, 2.0, 2.5]]])
    assert buckets_from_logits(logits).tolist() == [[0, 1, -1, -1]]
    logp = chosen_log_prob(logits, buckets_from_logits(logits))
    torch.testing.assert_close(logp, F.log_softmax(logits, -1)[0, [0, 1, 2, 3], [0, 1, 2, 2]][None])


def test_null_logit_is_logsumexp_of_null_anchors():
    router = small_router(num_null_anchors=3)
    images, texts = anchor_inputs(batch=1)
    anchors = router.encode_anchors(images, texts)
    video = torch.randn(1, 7, 24)
    logits = router(video, anchors, 0)
    tokens = router.to_token[0](router.token_norm(video))
    nulls = router.to_anchor[0](router.null_anchors)
    sim = tokens @ nulls.T / 16**0.5
    torch.testing.assert_close(logits[..., -1], sim.logsumexp(-1))


def test_encode_anchors_with_and_without_text():
    router = small_router()
    images, texts = anchor_inputs(batch=2, n=2)
    image_only = router.encode_anchors(images)
    both, img, txt = router.encode_anchors(images, texts, return_modalities=True)
    assert image_only.shape == both.shape == img.shape == txt.shape == (2, 2, 16)
    assert (image_only - both).abs().max() > 1e-4  # the text anchor contributes
    torch.testing.assert_close(image_only, router.anchor_norm(img))
    torch.testing.assert_close(both, router.anchor_norm(img + txt))
    _, _, none = router.encode_anchors(images, return_modalities=True)
    assert none is None
    # one subject without a phrase: its anchor is image-only, the other's is not
    mixed = router.encode_anchors(images, [texts[0], None])
    torch.testing.assert_close(mixed[:, 1], image_only[:, 1])
    torch.testing.assert_close(mixed[:, 0], both[:, 0])


def test_text_masks_hide_padding():
    router = small_router()
    images, texts = anchor_inputs(batch=2, n=2)
    masks = [torch.ones(2, t.shape[1], dtype=torch.bool) for t in texts]
    masks[1][:, 3:] = False
    base = router.encode_anchors(images, texts, masks)
    texts2 = [texts[0], texts[1].clone()]
    texts2[1][:, 3:] = 100.0  # padding changes...
    torch.testing.assert_close(router.encode_anchors(images, texts2, masks), base)  # ...nothing
    texts2[1][:, 0] = 100.0  # a valid token changes the anchor
    assert (router.encode_anchors(images, texts2, masks)[:, 1] - base[:, 1]).abs().max() > 1e-4


def test_anchors_are_per_sample():
    router = small_router()
    images, texts = anchor_inputs(batch=2, n=2)
    both = router.encode_anchors(images, texts)
    first = router.encode_anchors([t[:1] for t in images], [t[:1] for t in texts])
    torch.testing.assert_close(both[:1], first, atol=1e-6, rtol=1e-6)


def test_anchor_input_errors():
    router = small_router(max_subjects=2)
    images, texts = anchor_inputs(batch=1, n=3)
    with pytest.raises(ValueError, match="at most 2"):
        router.encode_anchors(images, texts)
    with pytest.raises(ValueError, match="at least one subject"):
        router.encode_anchors([])
    with pytest.raises(ValueError, match="one entry per subject"):
        router.encode_anchors(images[:2], texts[:1])


# --------------------------------------------------------------------------------------------------------------------
# Save / load


def test_save_pretrained_round_trip(tmp_path):
    router = small_router(routed_layers=[1, 3], max_subjects=3)
    with torch.no_grad():
        for p in router.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # make sure nothing is re-initialised on load
    router.save_pretrained(tmp_path / "router")
    files = sorted(p.name for p in (tmp_path / "router").iterdir())
    assert any(f.endswith(".safetensors") for f in files), files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")) for f in files), files
    cfg = json.loads((tmp_path / "router" / "config.json").read_text())
    assert cfg["_class_name"] == "IDRouter" and cfg["routed_layers"] == [1, 3] and cfg["max_subjects"] == 3

    loaded = IDRouter.from_pretrained(tmp_path / "router")
    assert loaded.routed_layer_indices == [1, 3]
    images, texts = anchor_inputs(batch=2, n=3)
    video = torch.randn(2, 11, 24)
    for layer in range(4):
        want = router(video, router.encode_anchors(images, texts), layer)
        got = loaded(video, loaded.encode_anchors(images, texts), layer)
        torch.testing.assert_close(got, want, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# Gradients through hard routing


def test_straight_through_gradient_reaches_router():
    router = small_router()
    images, texts = anchor_inputs(batch=2, n=2, ref_tokens=(5, 7))
    g = torch.Generator().manual_seed(3)
    video_hidden = torch.randn(2, 20, 24, generator=g)
    q = torch.randn(2, 20, 2, 8, generator=g)
    lengths = [5, 7]
    k = torch.randn(2, 20 + 12, 2, 8, generator=g)
    v = torch.randn(2, 20 + 12, 2, 8, generator=g)

    logits = router(video_hidden, router.encode_anchors(images, texts), layer_idx=0)
    buckets = buckets_from_logits(logits)
    assert (buckets >= 0).any()
    logp = chosen_log_prob(logits, buckets)
    bias = logp - logp.detach()
    out = bucketed_attention(q, k, v, buckets, lengths, segment_bias=bias)
    hard = bucketed_attention(q, k, v, buckets.detach(), lengths)
    torch.testing.assert_close(out, hard, atol=1e-6, rtol=0)  # forward unchanged

    out.square().mean().backward()

    def reached(prefix):
        return any(
            p.grad is not None and p.grad.abs().sum() > 0 for n, p in router.named_parameters() if n.startswith(prefix)
        )

    # the token and anchor projections, the identity queries and both modality poolers all get gradient
    for prefix in ("to_token.0.", "to_anchor.0.", "identity_queries", "image_pooler.", "text_pooler."):
        assert reached(prefix), prefix
    # without the bias, nothing reaches the router
    router.zero_grad(set_to_none=True)
    hard = bucketed_attention(q.requires_grad_(), k, v, buckets, lengths)
    hard.square().mean().backward()
    assert all(p.grad is None for p in router.parameters())


# --------------------------------------------------------------------------------------------------------------------
# Losses


def test_routing_cross_entropy_ignores_background():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 15, 4, generator=g, requires_grad=True)
    labels = torch.randint(-1, 3, (2, 15), generator=g)
    labels[0, 0] = -1
    loss = routing_cross_entropy(logits, labels)
    keep = labels >= 0
    want = F.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(loss, want)
    # background logits do not matter
    logits2 = logits.detach().clone()
    logits2[~keep] = torch.randn_like(logits2[~keep]) * 10
    torch.testing.assert_close(routing_cross_entropy(logits2, labels), loss.detach())
    loss.backward()
    assert (logits.grad[~keep] == 0).all() and logits.grad[keep].abs().sum() > 0


def test_routing_cross_entropy_all_background_is_zero_with_grad_path():
    logits = torch.randn(1, 5, 3, requires_grad=True)
    loss = routing_cross_entropy(logits, torch.full((1, 5), -1))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert (logits.grad == 0).all()


def test_routing_cross_entropy_custom_ignore_index_teaches_null():
    logits = torch.randn(1, 6, 3)
    labels = torch.tensor([[0, 1, 2, 2, -100, 0]])
    keep = labels != -100
    torch.testing.assert_close(
        routing_cross_entropy(logits, labels, ignore_index=-100), F.cross_entropy(logits[keep], labels[keep])
    )


def test_routing_cross_entropy_shape_errors():
    with pytest.raises(ValueError, match="logits"):
        routing_cross_entropy(torch.randn(2, 5, 3), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="logits"):
        routing_cross_entropy(torch.randn(10, 3), torch.zeros(10, dtype=torch.long))


def test_mask_loss_matches_formula():
    g = torch.Generator().manual_seed(1)
    b, n, l_ = 3, 2, 10
    s = torch.rand(b, n, l_, generator=g)
    a = torch.rand(b, n, l_, generator=g)
    m = (torch.rand(b, n, l_, generator=g) > 0.5).float()
    want = (
        sum(((s[i, j] - m[i, j]) ** 2).mean() + ((a[i, j] - m[i, j]) ** 2).mean() for i in range(b) for j in range(n))
        / b
    )
    torch.testing.assert_close(mask_loss(s, m, a), want)
    want_s = sum(((s[i, j] - m[i, j]) ** 2).mean() for i in range(b) for j in range(n)) / b
    torch.testing.assert_close(mask_loss(s, m), want_s)
    valid = torch.tensor([[True, False], [True, True], [False, False]])
    want_v = sum(
        ((s[i, j] - m[i, j]) ** 2).mean() + ((a[i, j] - m[i, j]) ** 2).mean()
        for i in range(b) for j in range(n) if valid[i, j]
    ) / b  # fmt: skip
    torch.testing.assert_close(mask_loss(s, m, a, subject_valid=valid), want_v)
    # bool masks work the same as float ones
    torch.testing.assert_close(mask_loss(s, m.bool(), a), want)


def test_mask_loss_zero_for_perfect_maps_and_differentiable():
    m = (torch.rand(2, 3, 8) > 0.5).float()
    assert mask_loss(m.clone(), m, m.clone()).item() == 0.0
    s = torch.full((2, 3, 8), 0.5, requires_grad=True)
    loss = mask_loss(s, m)
    assert loss.item() > 0
    loss.backward()
    assert s.grad.abs().sum() > 0


def test_mask_loss_shape_errors():
    with pytest.raises(ValueError, match="similarity_maps"):
        mask_loss(torch.rand(2, 3, 8), torch.rand(2, 3, 7))
    with pytest.raises(ValueError, match="attention_maps"):
        mask_loss(torch.rand(2, 3, 8), torch.rand(2, 3, 8), torch.rand(2, 2, 8))


# --------------------------------------------------------------------------------------------------------------------
# Masks on the token grid


def test_masks_to_token_grid_hand_built(components):
    # 9 frames of 32x32 -> Wan: 3 latent frames (frame 0 | frames 1-4 | frames 5-8), 2x2 tokens of 16x16 pixels.
    m = torch.zeros(9, 32, 32)
    m[0, :16, :16] = 1  # latent 0: top-left token fully covered
    m[1:3, :16, 16:] = 1  # latent 1: top-right covered in 2 of 4 frames -> 0.5
    m[5:9, 16:, :8] = 1  # latent 2: bottom-left, left half of the token in every frame -> 0.5
    m[5, 16:, 16:] = 1  # latent 2: bottom-right in 1 of 4 frames -> 0.25
    m[8, :4, :16] = 1  # latent 2: top-left, a quarter of the rows in 1 of 4 frames -> 1/16
    expected = torch.zeros(3, 2, 2)
    expected[0, 0, 0] = 1.0
    expected[1, 0, 1] = 0.5
    expected[2, 1, 0] = 0.5
    expected[2, 1, 1] = 0.25
    expected[2, 0, 0] = 1 / 16
    got = masks_to_token_grid(m, transformer=components["transformer"], vae=components["vae"])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)
    # explicit factors, bool input, and leading dims (B, N, F, H, W)
    stacked = torch.stack([m, 1 - m])[None].bool()
    got2 = masks_to_token_grid(stacked, temporal_compression=4, spatial_compression=8, patch_size=(1, 2, 2))
    assert got2.shape == (1, 2, 3, 2, 2)
    torch.testing.assert_close(got2[0, 0], expected)
    torch.testing.assert_close(got2[0, 1], 1 - expected)
    # without transformer/vae the Wan2.1 defaults apply
    torch.testing.assert_close(masks_to_token_grid(m), expected)


def test_masks_to_token_grid_other_factors():
    # temporal compression 2, spatial 4, patch (1, 1, 1): 5 frames of 8x8 -> 3 latent frames of 2x2
    m = torch.zeros(5, 8, 8)
    m[1, :4, :4] = 1  # latent 1 <- frames 1, 2: top-left cell half the time
    m[3:5, 4:, 4:] = 1  # latent 2 <- frames 3, 4: bottom-right always
    got = masks_to_token_grid(m, temporal_compression=2, spatial_compression=4, patch_size=(1, 1, 1))
    expected = torch.zeros(3, 2, 2)
    expected[1, 0, 0] = 0.5
    expected[2, 1, 1] = 1.0
    torch.testing.assert_close(got, expected)


def test_token_grid_factors(components):
    assert token_grid_factors() == {"temporal_compression": 4, "spatial_compression": 8, "patch_size": (1, 2, 2)}
    f = token_grid_factors(components["transformer"], components["vae"])
    assert f["patch_size"] == tuple(components["transformer"].config.patch_size)
    assert f["temporal_compression"] == components["vae"].config.scale_factor_temporal


@pytest.mark.parametrize(
    "masks, match",
    [
        (torch.zeros(10, 32, 32), "10 frames"),
        (torch.zeros(9, 24, 32), "divisible by 16"),
        (torch.zeros(9, 32, 40), "divisible by 16"),
        (torch.zeros(32, 32), "masks"),
        ("not a tensor", "masks"),
    ],
)
def test_masks_to_token_grid_errors(masks, match):
    with pytest.raises(ValueError, match=match):
        masks_to_token_grid(masks)


def test_routing_labels_from_coverage():
    cov = torch.tensor([[[0.9, 0.2, 0.4, 0.6], [0.05, 0.7, 0.3, 0.6]]])  # (B=1, N=2, L=4)
    assert routing_labels_from_coverage(cov).tolist() == [[0, 1, -1, 0]]
    assert routing_labels_from_coverage(cov, threshold=0.8).tolist() == [[0, -1, -1, -1]]
    assert routing_labels_from_coverage(cov.view(1, 2, 1, 2, 2)).tolist() == [[0, 1, -1, 0]]
    assert routing_labels_from_coverage(torch.zeros(2, 0, 5)).tolist() == [[-1] * 5] * 2
    with pytest.raises(ValueError, match="coverage"):
        routing_labels_from_coverage(torch.zeros(2, 5))


@pytest.mark.parametrize("balanced, power", [(True, 1.0), (0.5, 0.5), (False, 0.0), (0.0, 0.0)])
def test_routing_cross_entropy_balancing_weights_classes_by_count_power(balanced, power):
    torch.manual_seed(0)
    logits = torch.randn(1, 10, 3)
    labels = torch.tensor([[2, 2, 2, 2, 2, 2, 0, 0, 1, -100]])  # null (2) outnumbers the subjects
    keep = labels[0] != -100
    lg, lb = logits[0][keep], labels[0][keep]
    counts = torch.bincount(lb, minlength=3).float()
    per_token = F.cross_entropy(lg, lb, reduction="none")
    w = counts[lb] ** -power
    expected = (w * per_token).sum() / w.sum()
    torch.testing.assert_close(routing_cross_entropy(logits, labels, ignore_index=-100, balanced=balanced), expected)


def test_routing_cross_entropy_rejects_bad_balance():
    with pytest.raises(ValueError, match="`balanced` must be"):
        routing_cross_entropy(torch.randn(1, 4, 3), torch.zeros(1, 4, dtype=torch.long), balanced=1.5)
