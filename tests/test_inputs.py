"""User inputs that must never be read silently wrong: reference images, masks, router inputs and untrusted
router / pipeline checkpoints."""

from __future__ import annotations

import io
import json
import shutil
import signal

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file

from diasr_diffusers import IDRouter
from diasr_diffusers.routing import (
    buckets_from_logits,
    mask_loss,
    masks_to_token_grid,
    normalize_masks,
    routing_cross_entropy,
    routing_labels_from_coverage,
)
from diasr_diffusers.utils.images import letterbox, normalize_subject_images, to_pil_rgb

RS = np.random.RandomState(0)
RGB = (RS.rand(12, 20, 3) * 255).astype(np.uint8)


def pixels(image) -> np.ndarray:
    return np.asarray(to_pil_rgb(image)).astype(int)


# --------------------------------------------------------------------------------------------------------------------
# Reference images


@pytest.mark.parametrize(
    "image",
    [
        RGB.astype(np.float32),  # float in [0, 255]
        torch.from_numpy(RGB).float(),  # (H, W, C) float tensor in [0, 255]
        torch.from_numpy(RGB).permute(2, 0, 1).double(),  # (C, H, W) float tensor in [0, 255]
        RGB.astype(np.uint16) * 257,  # full-range 16-bit
        torch.from_numpy(RGB.astype(np.float32) / 127.5 - 1),  # [-1, 1] as (H, W, C)
        RGB.astype(np.float32) / 127.5 - 1,  # numpy in [-1, 1] (was clipped to [0, 1])
        RGB.astype(np.int64),  # wide integers holding 8-bit values
        torch.from_numpy(RGB).permute(2, 0, 1).bfloat16() / 255,  # bfloat16 has no numpy dtype
    ],
    ids=["np-f32-255", "pt-hwc-255", "pt-chw-255", "np-u16", "pt-hwc-pm1", "np-pm1", "np-i64", "pt-bf16"],
)
def test_value_ranges_and_layouts_read_as_the_uint8_picture(image):
    # bfloat16 keeps 8 mantissa bits: a few levels of rounding; the others are exact up to the last level.
    tol = 4 if isinstance(image, torch.Tensor) and image.dtype == torch.bfloat16 else 1
    assert np.abs(pixels(image) - RGB.astype(int)).max() <= tol


def test_16_bit_pil_images_are_rescaled_not_clipped_to_white():
    gray16 = RGB[..., 0].astype(np.uint16) * 257
    want = np.asarray(PIL.Image.fromarray(RGB[..., 0]).convert("RGB")).astype(int)
    buf = io.BytesIO()
    PIL.Image.fromarray(gray16).save(buf, "PNG")
    buf.seek(0)
    png = PIL.Image.open(buf)
    assert png.mode.startswith("I;16")
    assert np.abs(pixels(png) - want).max() <= 1
    # Older Pillow opens 16-bit PNGs as mode "I": still 16-bit, as PNG stores no more.
    as_i = PIL.Image.fromarray(gray16.astype(np.int32))
    as_i.format = "PNG"
    assert np.abs(pixels(as_i) - want).max() <= 1
    # A float "F" image in [0, 255] (e.g. convert("F")) and an "I" image of 8-bit values keep their picture.
    assert np.abs(pixels(PIL.Image.fromarray(RGB[..., 0]).convert("F")) - want).max() <= 1
    assert np.abs(pixels(PIL.Image.fromarray(RGB[..., 0]).convert("I")) - want).max() <= 1


@pytest.mark.parametrize("shape", [(4, 40, 3), (3, 10, 3), (1, 7, 4)])
def test_ambiguous_tensor_layouts_are_refused(shape):
    with pytest.raises(ValueError, match=r"`ref`: tensor shape .* is ambiguous"):
        to_pil_rgb(torch.rand(shape), "ref")
    # the documented way out: numpy is always channels-last
    assert to_pil_rgb(torch.rand(shape).numpy(), "ref").size == (shape[1], shape[0])


def test_unambiguous_tensor_layouts():
    chw = torch.from_numpy(RGB).permute(2, 0, 1)
    assert np.array_equal(pixels(chw), RGB) and np.array_equal(pixels(chw.permute(1, 2, 0)), RGB)
    with pytest.raises(ValueError, match=r"looks channels-first"):
        to_pil_rgb(np.ascontiguousarray(RGB.transpose(2, 0, 1)), "ref")


@pytest.mark.parametrize(
    "image",
    [np.zeros((0, 5, 3), np.uint8), torch.zeros(3, 0, 5), np.zeros((5, 0)), PIL.Image.new("RGB", (0, 4))],
)
def test_empty_images_are_refused(image):
    with pytest.raises(ValueError, match=r"`subject_images\[1\]` is an empty image"):
        normalize_subject_images([RGB, image])


def test_letterbox_refuses_empty_inputs():
    with pytest.raises(ValueError, match="empty image"):
        letterbox(PIL.Image.new("RGB", (0, 3)), 16, 16)
    with pytest.raises(ValueError, match="height"):
        letterbox(PIL.Image.new("RGB", (3, 3)), 0, 16)


@pytest.mark.parametrize(
    "image, match",
    [
        (np.full((4, 4, 3), np.nan, np.float32), "NaN or infinite"),
        (torch.full((8, 8, 3), float("inf")), "NaN or infinite"),
        (np.full((4, 4, 3), 1.5, np.float32), r"span \[1.5, 1.5\]"),  # overshooting [0, 1] or a black [0, 255]?
        (np.linspace(-1.2, 1.0, 48, dtype=np.float32).reshape(4, 4, 3), "none of the accepted ranges"),
        (np.full((4, 4, 3), 300.0), "none of the accepted ranges"),
        ((RS.rand(4, 4) * 1000).astype(np.int32), r"int32 image must hold 8-bit values"),
        (np.full((4, 4, 3), -1, np.int16), r"8-bit values"),
        (np.zeros((4, 4, 5), np.uint8), r"\(H, W\) or \(H, W, C\) with C in 1-4"),
        (torch.zeros(1, 3, 8, 8), "one image per entry"),
    ],
)
def test_bad_values_and_shapes_are_refused(image, match):
    with pytest.raises(ValueError, match=match):
        to_pil_rgb(image, "ref")


@pytest.mark.parametrize("image", [np.zeros((4, 4, 3), np.complex64), np.zeros((4, 4), object), "ref.png"])
def test_unsupported_types_are_type_errors(image):
    with pytest.raises(TypeError, match="`ref`"):
        to_pil_rgb(image, "ref")


def test_small_modes_and_channel_counts():
    assert pixels(np.ones((1, 1), bool)).tolist() == [[[255, 255, 255]]]  # one pixel, bool is black/white
    assert pixels(np.array([[True, False]])).tolist() == [[[255] * 3, [0] * 3]]
    gray_alpha = np.zeros((2, 2, 2), np.uint8)  # 2 channels: gray + alpha, transparent -> white
    gray_alpha[0, 0] = (10, 255)
    assert pixels(gray_alpha)[..., 0].tolist() == [[10, 255], [255, 255]]
    palette = PIL.Image.fromarray(RGB).convert("P")
    assert np.array_equal(pixels(palette), np.asarray(palette.convert("RGB")))
    la = PIL.Image.fromarray(np.dstack([RGB[..., 0], np.zeros_like(RGB[..., 0])]))
    assert la.mode == "LA" and (pixels(la) == 255).all()
    assert (pixels(PIL.Image.new("RGBa", (3, 3))) == 255).all()  # premultiplied, fully transparent


def test_truncated_file_is_a_clear_error():
    buf = io.BytesIO()
    PIL.Image.fromarray(RGB).save(buf, "PNG")
    broken = PIL.Image.open(io.BytesIO(buf.getvalue()[:60]))
    with pytest.raises(ValueError, match=r"`ref`: the image could not be decoded"):
        to_pil_rgb(broken, "ref")


# --------------------------------------------------------------------------------------------------------------------
# Masks and routing losses

GRID = dict(temporal_compression=4, spatial_compression=2, patch_size=(1, 2, 2))


def block_masks() -> torch.Tensor:
    """(1, 2, 5, 8, 8) bool: subject 0 left half, subject 1 top-right quarter."""
    m = torch.zeros(1, 2, 5, 8, 8, dtype=torch.bool)
    m[:, 0, :, :, :4] = True
    m[:, 1, :, :4, 4:] = True
    return m


def test_8_bit_masks_give_the_same_coverage_as_bool_masks():
    want = masks_to_token_grid(block_masks(), **GRID)
    for masks in (block_masks().to(torch.uint8) * 255, block_masks().numpy().astype(np.uint8) * 255):
        got = masks_to_token_grid(masks, **GRID)
        assert torch.equal(got, want) and float(got.max()) == 1.0
    m = block_masks().float().flatten(2)
    assert mask_loss(m, m.to(torch.uint8) * 255).item() == 0.0  # was ~65000: coverage 255


@pytest.mark.parametrize(
    "masks, match",
    [
        (block_masks().float() * 255, r"float masks must be in \[0, 1\].*divide by 255"),
        (block_masks().to(torch.int64) * 3, r"binary \(0/1\) or 8-bit.*label map"),
        (torch.full((1, 1, 5, 8, 8), float("nan")), "NaN"),
        (block_masks().float() - 1, r"must be in \[0, 1\]"),
    ],
)
def test_mask_values_that_would_be_misread_are_refused(masks, match):
    with pytest.raises(ValueError, match=match):
        masks_to_token_grid(masks, **GRID)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temporal_compression": 0}, "`temporal_compression` must be a positive integer"),
        ({"spatial_compression": -8}, "`spatial_compression` must be a positive integer"),
        ({"patch_size": (1, 0, 2)}, "`patch_size` must be a positive integer"),
        ({"patch_size": (2, 2)}, r"`patch_size` must be three positive integers"),
        ({"temporal_compression": 2.0}, "`temporal_compression` must be a positive integer"),
    ],
)
def test_token_grid_factors_are_validated_not_defaulted(kwargs, match):
    with pytest.raises(ValueError, match=match):
        masks_to_token_grid(block_masks(), **{**GRID, **kwargs})


def test_subject_valid_must_be_b_by_n():
    sim = torch.rand(2, 3, 16)
    masks = (torch.rand(2, 3, 16) > 0.5).float()
    for bad in (torch.ones(2, 3, 1, dtype=torch.bool), torch.ones(3, dtype=torch.bool), torch.ones(2, 4)):
        with pytest.raises(ValueError, match=r"`subject_valid` must be \(B, N\) = \(2, 3\)"):
            mask_loss(sim, masks, subject_valid=bad)
    with pytest.raises(ValueError, match="bool"):
        mask_loss(sim, masks, subject_valid=torch.full((2, 3), 0.5))
    valid = torch.tensor([[True, True, False], [True, False, False]])
    as_int = mask_loss(sim, masks, subject_valid=valid.long())
    assert torch.equal(as_int, mask_loss(sim, masks, subject_valid=valid))


def test_routing_labels_threshold_and_coverage_are_checked():
    coverage = torch.tensor([[[0.0, 0.6], [0.0, 0.3]]])  # (B=1, N=2, L=2): token 0 uncovered
    assert routing_labels_from_coverage(coverage).tolist() == [[-1, 0]]
    for threshold in (0, 0.0, -0.5, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="`threshold` must be a number in"):
            routing_labels_from_coverage(coverage, threshold=threshold)
    with pytest.raises(ValueError, match="`coverage`"):
        routing_labels_from_coverage(coverage * 255)


def test_routing_cross_entropy_checks_labels_and_balance_early():
    logits = torch.randn(1, 4, 3)
    with pytest.raises(ValueError, match=r"`labels` must be in \[0, 3\)"):
        routing_cross_entropy(logits, torch.tensor([[0, 1, 3, -1]]))
    with pytest.raises(ValueError, match=r"`labels` must be in \[0, 3\)"):
        routing_cross_entropy(logits, torch.tensor([[0, -2, 1, -1]]))
    with pytest.raises(TypeError, match="integer class indices"):
        routing_cross_entropy(logits, torch.zeros(1, 4))
    # `balanced` is checked even when every label is ignored (the loss is 0 then)
    for bad in (2.0, -1, "yes", float("nan")):
        with pytest.raises(ValueError, match="`balanced`"):
            routing_cross_entropy(logits, torch.full((1, 4), -1), balanced=bad)


def test_nan_logits_route_to_null_not_subject_zero():
    logits = torch.tensor([[[float("nan"), 0.0, 0.0], [0.0, float("nan"), 5.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0]]])
    assert buckets_from_logits(logits).tolist() == [[-1, -1, 0, -1]]
    with pytest.raises(ValueError, match="null logit last"):
        buckets_from_logits(torch.zeros(2, 0))


def test_normalize_masks_types():
    assert normalize_masks(np.array([[0, 255]], np.uint8)).tolist() == [[0.0, 1.0]]
    with pytest.raises(TypeError, match="`m`"):
        normalize_masks([[0, 1]], "m")
    with pytest.raises(TypeError, match="`m`"):
        normalize_masks(np.array([["a"]]), "m")


# --------------------------------------------------------------------------------------------------------------------
# Where images and masks enter the pipeline


@pytest.fixture(scope="module")
def tiny_pipe():
    from diasr_diffusers import DiasRPipeline
    from diasr_diffusers.utils.tiny import tiny_wan_components

    return DiasRPipeline(**tiny_wan_components())


def generate(pipe, **kwargs):
    args = dict(prompt="a man and a woman walk", subject_phrases=["a man", "a woman"], height=32, width=32)
    args.update(num_frames=1, num_inference_steps=1, guidance_scale=1.0, output_type="latent")
    args.update(generator=torch.Generator().manual_seed(0))
    return pipe(**{**args, **kwargs}).frames


def test_pipeline_reads_8_bit_masks_like_bool_masks(tiny_pipe):
    images = [RGB, RGB[::-1]]
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    # Subject 0 covers a quarter of the top-right token: null for a [0, 1] mask, subject 0 when read as coverage 64.
    masks[0, :16, :20], masks[1, 16:, 20:] = True, True
    want = generate(tiny_pipe, subject_images=images, subject_masks=masks)
    got = generate(tiny_pipe, subject_images=images, subject_masks=masks.numpy().astype(np.uint8) * 255)
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"subject_masks": np.arange(2 * 32 * 32).reshape(2, 32, 32) % 3}, r"`subject_masks`: integer masks"),
        ({"subject_masks": np.full((2, 32, 32), np.nan, np.float32)}, r"`subject_masks` has NaN"),
        ({"subject_images": [RGB, np.zeros((0, 4, 3), np.uint8)]}, r"`subject_images\[1\]` is an empty image"),
        ({"subject_images": [RGB, torch.rand(4, 40, 3)]}, r"`subject_images\[1\]`: tensor shape .* ambiguous"),
    ],
)
def test_pipeline_refuses_bad_images_and_masks_before_any_work(tiny_pipe, monkeypatch, kwargs, match):
    def no_work(*args, **kw):
        raise AssertionError("the prompt was encoded before the inputs were checked")

    monkeypatch.setattr(tiny_pipe, "encode_prompt", no_work)
    with pytest.raises(ValueError, match=match):
        generate(tiny_pipe, **{"subject_images": [RGB, RGB], **kwargs})


# --------------------------------------------------------------------------------------------------------------------
# The router: untrusted checkpoints, constructor and forward inputs


ROUTER_CFG = dict(hidden_dim=24, text_dim=32, num_layers=3, router_dim=16, num_identity_queries=4, num_heads=2)
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture
def saved_router(tmp_path):
    torch.manual_seed(0)
    IDRouter(**ROUTER_CFG).save_pretrained(tmp_path / "router")
    return tmp_path / "router"


def edit(folder, config=None, drop=(), add=None, reshape=None):
    """Change a saved router's config.json and/or its tensors in place."""
    if config:
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, **config}))
    if drop or add or reshape:
        tensors = load_file(folder / WEIGHTS)
        for k in drop:
            tensors.pop(k)
        tensors.update(add or {})
        for k, shape in (reshape or {}).items():
            tensors[k] = torch.zeros(shape)
        save_file(tensors, folder / WEIGHTS)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(drop=["null_anchors"]), r"missing 1 tensor\(s\): null_anchors"),
        (dict(add={"backdoor": torch.zeros(2)}), r"unexpected 1 tensor\(s\): backdoor"),
        (dict(reshape={"to_token.1.0.weight": (16, 48)}), r"to_token.1.0.weight expected \[16, 24\], got \[16, 48\]"),
        (
            dict(config={"hidden_dim": 48}),
            r": 6 shape mismatch\(es\): image_pooler.norm.bias expected \[48\], got \[24\], ",
        ),
        (dict(config={"num_layers": 5}), r"missing 14 tensor\(s\): to_anchor.3.0.bias, .* and 10 more"),
        (dict(config={"num_heads": 3}), r"`num_heads` \(3\) must divide `router_dim` \(16\)"),
        (dict(config={"router_dim": 16.0}), r"`router_dim` must be an integer >= 1"),
    ],
)
def test_router_checkpoint_that_does_not_match_its_config_is_refused(saved_router, change, match):
    edit(saved_router, **change)
    with pytest.raises(ValueError, match=match):
        IDRouter.from_pretrained(saved_router)


def test_router_checkpoint_pickle_and_garbage_are_refused(saved_router):
    (saved_router / WEIGHTS).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        IDRouter.from_pretrained(saved_router)
    (saved_router / WEIGHTS).unlink()
    torch.save(IDRouter(**ROUTER_CFG).state_dict(), saved_router / "diffusion_pytorch_model.bin")  # a pickle
    with pytest.raises(OSError, match="safetensors"):
        IDRouter.from_pretrained(saved_router)
    with pytest.raises(ValueError, match="safetensors only"):
        IDRouter.from_pretrained(saved_router, use_safetensors=False)


@pytest.mark.parametrize(
    "config, match",
    [
        ({"num_layers": 2_000_000}, r"`num_layers` must be an integer >= 1 and <= 4096"),
        ({"hidden_dim": 2**24, "router_dim": 4096, "num_heads": 4}, "would allocate"),
        ({"num_identity_queries": 2**40}, "would allocate"),
    ],
)
def test_huge_router_configs_fail_at_once(saved_router, config, match):
    edit(saved_router, config=config)

    def hung(*args):
        raise TimeoutError("IDRouter.from_pretrained still running after 20 s: an untrusted config hangs it")

    # A hang must fail this test, not stall the suite.
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        with pytest.raises(ValueError, match=match):
            IDRouter.from_pretrained(saved_router)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_router_constructor_and_forward_inputs_are_checked():
    for bad, match in [
        (dict(hidden_dim=0), "`hidden_dim` must be an integer >= 1"),
        (dict(num_null_anchors=0), "`num_null_anchors`"),
        (dict(max_subjects=True), "`max_subjects`"),
        (dict(num_heads=32), r"`num_heads` \(32\) must divide"),
        (dict(routed_layers=[0, 1.5]), "integer layer indices"),
        (dict(routed_layers=[True]), "integer layer indices"),
        (dict(context_kernel=10**6 + 1), r"`context_kernel` must be an odd integer in \[1, 63\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            IDRouter(**{**ROUTER_CFG, **bad})
    router = IDRouter(**ROUTER_CFG, context_kernel=3)
    images = [torch.randn(2, 4, 24), torch.randn(2, 3, 24)]
    anchors = router.encode_anchors(images, [torch.randn(2, 3, 32), None])
    video = torch.randn(2, 6, 24)
    assert router(video, anchors, 2, grid=(1, 2, 3)).shape == (2, 6, 3)
    assert router(video, anchors[:, :0], 0, grid=(1, 2, 3)).shape == (2, 6, 1)  # zero subjects: null only
    for args, kwargs, match in [
        ((video, anchors, 3), {}, r"`layer_idx` must be an integer in \[0, 3\)"),
        ((video, anchors, -1), {}, "`layer_idx`"),
        ((video[..., :20], anchors, 0), {}, r"`video_tokens` must be \(B, Lv, 24\)"),
        ((video, anchors[:1], 0), {}, r"`anchors` must be \(2, N, 16\)"),
        ((video, anchors, 0), {"grid": (-1, -2, 3)}, "needs `grid=\\(F, H, W\\)`"),
    ]:
        with pytest.raises(ValueError, match=match):
            router(*args, **{"grid": (1, 2, 3), **kwargs})
    with pytest.raises(ValueError, match=r"`image_tokens\[1\]` has batch 1"):
        router.encode_anchors([images[0], images[1][:1]])
    with pytest.raises(ValueError, match=r"`image_tokens\[0\]` must be \(B, R >= 1, 24\)"):
        router.encode_anchors([torch.randn(2, 0, 24)])
    no_phrase = torch.tensor([[True, True, False], [False, False, False]])
    with pytest.raises(ValueError, match=r"`text_masks\[0\]` has a sample with no valid phrase token"):
        router.encode_anchors(images[:1], [torch.randn(2, 3, 32)], [no_phrase])
    # a half-precision caller gets the router's dtype, not a LayerNorm dtype error
    assert router.encode_anchors([images[0].half()]).dtype == torch.float32


def test_pipeline_refuses_a_router_for_another_model():
    from diasr_diffusers import DiasRPipeline
    from diasr_diffusers.utils.tiny import tiny_wan_components

    comps = tiny_wan_components()
    with pytest.raises(ValueError, match=r"does not fit this WanTransformer3DModel: it has hidden_dim 48 \(.* 24\)"):
        DiasRPipeline(**comps, id_router=IDRouter(**{**ROUTER_CFG, "hidden_dim": 48, "num_layers": 2}))


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    from diasr_diffusers import DiasRPipeline
    from diasr_diffusers.utils.tiny import tiny_wan_components

    folder = tmp_path_factory.mktemp("pipeline") / "pipe"
    DiasRPipeline(**tiny_wan_components()).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "config, match",
    [
        ({"num_layers": 2_000_000}, r"says num_layers=2000000 but the weights hold 2 blocks"),
        ({"num_attention_heads": 100_000}, r"do not match their config.json: .*shape mismatch"),
        ({"ffn_dim": 10**12}, r"blocks.0.ffn.net.0.proj.weight expected \[1000000000000, 24\], got \[\d+, 24\]"),
    ],
)
def test_hostile_transformer_config_fails_fast_when_loading_a_pipeline_folder(saved_pipeline, tmp_path, config, match):
    from diasr_diffusers import DiasRPipeline

    folder = tmp_path / "pipe"
    shutil.copytree(saved_pipeline, folder)
    cfg_path = folder / "transformer" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **config}))

    def hung(*args):
        raise TimeoutError("loading still running after 20 s: an untrusted transformer config hangs it")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        for load in (DiasRPipeline.from_pretrained, DiasRPipeline.from_wan):
            with pytest.raises(ValueError, match=match):
                load(folder)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_pixels_to_token_grid_is_each_tokens_mean_colour():
    """Pixel values in [-1, 1] pool like masks (frame 0 alone, then groups of 2 frames, 4x4 pixels); other ranges
    are refused (the example and benchmark scripts once passed pixels to masks_to_token_grid, which rightly refused)."""
    from diasr_diffusers.routing import pixels_to_token_grid

    x = torch.rand(3, 5, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    grid = pixels_to_token_grid(x, temporal_compression=2, spatial_compression=4, patch_size=(1, 1, 1))
    assert grid.shape == (3, 3, 2, 2)
    assert torch.allclose(grid[:, 0, 1, 0], x[:, 0, 4:8, 0:4].mean(dim=(-1, -2)), atol=1e-6)
    assert torch.allclose(grid[:, 2, 0, 1], x[:, 3:5, 0:4, 4:8].mean(dim=(-1, -2, -3)), atol=1e-6)
    with pytest.raises(ValueError, match="masks"):
        pixels_to_token_grid(x * 3, temporal_compression=2, spatial_compression=4, patch_size=(1, 1, 1))
