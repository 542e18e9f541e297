"""DiasRPipeline end to end on a tiny Wan2.1 built in-process: routing modes, outputs, parity with WanPipeline,
reference-image handling, guidance, callbacks, bad inputs, save/load, from_wan and LoRA."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import WanPipeline
from pipeline_tester import SubjectPipelineTesterMixin

from diasr_diffusers import DiasRPipeline, IDRouter
from diasr_diffusers.utils.tiny import tiny_wan_components

PROMPT = "a man and a woman walk in the park with a dog"
PHRASES = ["a man", "a woman", "a dog"]
HEIGHT = WIDTH = 32
NUM_FRAMES = 9
# latent grid: (9 - 1) / 4 + 1 = 3 frames, 32 / 8 / 2 = 2 x 2 tokens
MAP_SHAPE = (3, 2, 2)
BASE = dict(height=HEIGHT, width=WIDTH, num_frames=NUM_FRAMES, num_inference_steps=2, guidance_scale=5.0)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def subject_images(n, seed=0):
    rs = np.random.RandomState(seed)
    shapes = [(40, 20), (20, 30), (33, 33), (16, 48)]
    return [rs.rand(*shapes[i % len(shapes)], 3).astype(np.float32) for i in range(n)]


def side_masks(n, frames=False):
    """Pixel masks (N, H, W): subject 0 left, subject 1 right (2 subjects); top-left, top-right, bottom (3)."""
    m = torch.zeros(n, HEIGHT, WIDTH)
    if n == 2:
        m[0, :, :16] = 1
        m[1, :, 16:] = 1
    else:
        m[0, :16, :16] = 1
        m[1, :16, 16:] = 1
        m[2, 16:, :] = 1
    return m[:, None].expand(-1, NUM_FRAMES, -1, -1).clone() if frames else m


@pytest.fixture(scope="module")
def pipe():
    return DiasRPipeline(**tiny_wan_components())


@pytest.fixture(scope="module")
def router_pipe():
    comps = tiny_wan_components()
    torch.manual_seed(0)
    router = IDRouter.from_transformer(comps["transformer"], router_dim=16, num_identity_queries=4, num_heads=2)
    return DiasRPipeline(**comps, id_router=router)


def call(pipe, n=2, seed=0, **kwargs):
    args = dict(BASE, prompt=PROMPT)
    if n:
        args.update(subject_images=subject_images(n), subject_phrases=PHRASES[:n])
    args.update(kwargs)
    return pipe(**args, generator=gen(seed))


# --------------------------------------------------------------------------------------------------------------------
# Routing modes


def test_router_with_spatial_context_gets_the_token_grid(router_pipe):
    comps = {name: getattr(router_pipe, name) for name in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")}
    torch.manual_seed(0)
    router = IDRouter.from_transformer(comps["transformer"], router_dim=16, num_identity_queries=4, num_heads=2, context_kernel=3)
    seen = []
    local_mean = router._local_mean
    router._local_mean = lambda tokens, grid: seen.append(grid) or local_mean(tokens, grid)
    out = call(DiasRPipeline(**comps, id_router=router), routing="router", return_routing_maps=True)
    assert seen and set(seen) == {MAP_SHAPE}  # (F_lat, H_tok, W_tok), the grid of the routing maps
    assert out.routing_maps.shape == (1, *MAP_SHAPE)


def test_auto_routing_picks_router_masks_or_similarity(pipe, router_pipe):
    lat = dict(output_type="latent")
    # with a router, "auto" == "router"
    assert torch.equal(call(router_pipe, **lat).frames, call(router_pipe, routing="router", **lat).frames)
    # without one, "auto" == "similarity"
    assert torch.equal(call(pipe, **lat).frames, call(pipe, routing="similarity", **lat).frames)
    # with masks, "auto" == "masks"
    masks = side_masks(2)
    assert torch.equal(
        call(pipe, subject_masks=masks, **lat).frames, call(pipe, routing="masks", subject_masks=masks, **lat).frames
    )


def test_routing_modes_change_the_output(pipe):
    lat = dict(output_type="latent")
    outs = {
        "similarity": call(pipe, routing="similarity", **lat).frames,
        "dense": call(pipe, routing="dense", **lat).frames,
        "masks": call(pipe, routing="masks", subject_masks=side_masks(2), **lat).frames,
        "none": call(pipe, n=0, **lat).frames,
    }
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert (outs[a] - outs[b]).abs().max() > 1e-5, f"{a} == {b}"
    # swapping the two masks moves the subjects, which changes the video
    swapped = call(pipe, routing="masks", subject_masks=side_masks(2).flip(0), **lat).frames
    assert (swapped - outs["masks"]).abs().max() > 1e-5


def test_masks_per_frame_equal_static_masks(pipe):
    lat = dict(output_type="latent", routing="masks", return_routing_maps=True)
    static = call(pipe, subject_masks=side_masks(2), **lat)
    per_frame = call(pipe, subject_masks=side_masks(2, frames=True), **lat)
    as_numpy = call(pipe, subject_masks=side_masks(2).numpy(), **lat)
    assert torch.equal(static.frames, per_frame.frames) and torch.equal(static.frames, as_numpy.frames)
    assert torch.equal(static.routing_maps, per_frame.routing_maps)


def test_route_text_changes_output(pipe):
    lat = dict(output_type="latent", routing="masks", subject_masks=side_masks(2))
    routed = call(pipe, route_text=True, **lat).frames
    unrouted = call(pipe, route_text=False, **lat).frames
    assert (routed - unrouted).abs().max() > 1e-6
    # without phrases there is no text routing at all
    no_phrases = call(pipe, subject_phrases=None, **lat).frames
    assert torch.equal(no_phrases, unrouted)


def test_similarity_threshold_routes_everything_to_null(pipe):
    out = call(pipe, routing="similarity", similarity_threshold=2.0, return_routing_maps=True, output_type="latent")
    assert (out.routing_maps == -1).all()


# --------------------------------------------------------------------------------------------------------------------
# Outputs and determinism


def test_same_seed_same_frames_and_different_seed_differs(pipe):
    a = call(pipe, seed=3).frames
    b = call(pipe, seed=3).frames
    c = call(pipe, seed=4).frames
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4


# --------------------------------------------------------------------------------------------------------------------
# Reference images


def test_several_images_per_subject(pipe):
    imgs = subject_images(3)
    single = call(pipe, subject_images=imgs[:2], output_type="latent", return_routing_maps=True)
    multi = call(pipe, subject_images=[[imgs[0], imgs[2]], imgs[1]], output_type="latent", return_routing_maps=True)
    tuple_form = call(pipe, subject_images=[(imgs[0], imgs[2]), [imgs[1]]], output_type="latent")
    assert multi.frames.shape == single.frames.shape and multi.routing_maps.shape == (1, *MAP_SHAPE)
    assert torch.equal(multi.frames, tuple_form.frames)
    assert (multi.frames - single.frames).abs().max() > 1e-6


def test_image_kinds_are_accepted(pipe):
    rs = np.random.RandomState(0)
    rgb = (rs.rand(24, 40, 3) * 255).astype(np.uint8)
    kinds = [
        PIL.Image.fromarray(rgb),
        PIL.Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)]), "RGBA"),
        PIL.Image.fromarray(rgb[..., 0], "L"),
        PIL.Image.fromarray(rgb).convert("P"),
        rgb,  # uint8 array
        rgb.astype(np.float32) / 255.0,  # float array in [0, 1]
        rgb[..., 0],  # grayscale array
        torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0,  # (C, H, W) tensor in [0, 1]
        torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1.0,  # (C, H, W) tensor in [-1, 1]
        torch.from_numpy(rgb[..., 0]),  # (H, W) uint8 tensor
    ]
    for img in kinds:
        out = call(pipe, n=1, subject_images=[img], subject_phrases=["a man"], output_type="latent")
        assert torch.isfinite(out.frames).all()
    # equivalent encodings of the same picture give the same video
    ref = call(pipe, n=1, subject_images=[kinds[0]], subject_phrases=["a man"], output_type="latent").frames
    for same in (kinds[4], kinds[7], kinds[8]):
        got = call(pipe, n=1, subject_images=[same], subject_phrases=["a man"], output_type="latent").frames
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_reference_images_are_letterboxed_on_white():
    from diasr_diffusers.utils import letterbox, to_pil_rgb

    tall = PIL.Image.new("RGB", (10, 40), (255, 0, 0))
    boxed = letterbox(tall, 32, 32)
    a = np.asarray(boxed)
    assert boxed.size == (32, 32)
    assert (a[:, 0] == 255).all() and (a[:, -1] == 255).all()  # white side bars
    assert (a[16, 16] == [255, 0, 0]).all()  # content centred, not stretched
    transparent = PIL.Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert (np.asarray(to_pil_rgb(transparent)) == 255).all()  # transparency composited on white


def test_guidance_scale_ref_three_way(pipe):
    lat = dict(output_type="latent")
    two_way = call(pipe, **lat).frames
    three_way = call(pipe, guidance_scale_ref=3.0, **lat).frames
    other = call(pipe, guidance_scale_ref=1.0, **lat).frames
    assert (two_way - three_way).abs().max() > 1e-5
    assert (three_way - other).abs().max() > 1e-5
    # without CFG there is no guidance at all: guidance_scale_ref is irrelevant
    no_cfg = call(pipe, guidance_scale=1.0, **lat).frames
    no_cfg_ref = call(pipe, guidance_scale=1.0, guidance_scale_ref=3.0, **lat).frames
    assert torch.equal(no_cfg, no_cfg_ref)


def test_three_way_formula(pipe):
    """guidance_scale_ref = guidance_scale reduces Phantom's three-way form to two-way CFG on the full condition."""
    lat = dict(output_type="latent")
    two_way = call(pipe, guidance_scale=4.0, **lat).frames
    three_way = call(pipe, guidance_scale=4.0, guidance_scale_ref=4.0, **lat).frames
    torch.testing.assert_close(three_way, two_way, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------------------------------
# Bad inputs


def test_phrase_count_mismatch(pipe):
    with pytest.raises(ValueError, match="one phrase per subject"):
        call(pipe, subject_phrases=["a man"])
    with pytest.raises(ValueError, match="one phrase per subject"):
        call(pipe, subject_phrases="a man")


def test_phrase_not_in_prompt_names_it(pipe):
    with pytest.raises(ValueError, match="'a robot'"):
        call(pipe, subject_phrases=["a man", "a robot"])


def test_too_many_subjects_for_router():
    comps = tiny_wan_components()
    router = IDRouter.from_transformer(comps["transformer"], router_dim=16, num_identity_queries=4, num_heads=2,
                                       max_subjects=2)  # fmt: skip
    p = DiasRPipeline(**comps, id_router=router)
    assert p.max_subjects == 2
    with pytest.raises(ValueError, match="at most 2"):
        call(p, n=3)
    assert call(p, n=2, output_type="latent").frames.shape[0] == 1


def test_empty_image_list(pipe):
    with pytest.raises(ValueError, match=r"subject_images\[1\]"):
        call(pipe, subject_images=[subject_images(1)[0], []])


def test_masks_of_wrong_shape(pipe):
    for bad in (torch.zeros(3, HEIGHT, WIDTH), torch.zeros(2, HEIGHT, WIDTH + 16), torch.zeros(2, 5, HEIGHT, WIDTH)):
        with pytest.raises(ValueError, match="subject_masks"):
            call(pipe, routing="masks", subject_masks=bad)
    with pytest.raises(ValueError, match="subject_masks"):
        call(pipe, n=0, subject_masks=torch.zeros(1, HEIGHT, WIDTH))


def test_unsupported_image_type(pipe):
    with pytest.raises(TypeError, match="subject_images"):
        call(pipe, subject_images=["man.png", "woman.png"])
    with pytest.raises(TypeError, match="subject_images"):
        call(pipe, subject_images=subject_images(1)[0])  # not a list


def test_routing_errors(pipe):
    with pytest.raises(ValueError, match="id_router"):
        call(pipe, routing="router")
    with pytest.raises(ValueError, match="routing"):
        call(pipe, routing="magic")
    with pytest.raises(ValueError, match="subject_masks"):
        call(pipe, routing="masks")


def test_bad_sizes_and_guidance(pipe):
    with pytest.raises(ValueError, match="divisible by 16"):
        call(pipe, height=40)
    with pytest.raises(ValueError, match="guidance_scale_ref"):
        call(pipe, guidance_scale_ref=-1.0)
    with pytest.raises(ValueError, match="rope_max_seq_len"):
        call(pipe, subject_images=[subject_images(1) * 40, subject_images(1)])


# --------------------------------------------------------------------------------------------------------------------
# Save / load, from_wan


def test_from_wan_object(router_pipe):
    comps = tiny_wan_components()
    wan = WanPipeline(**comps)
    stock = wan(**BASE, prompt=PROMPT, generator=gen(0)).frames
    p = DiasRPipeline.from_wan(wan)
    assert isinstance(p, DiasRPipeline) and p.id_router is None and p.transformer is comps["transformer"]
    assert np.array_equal(p(**BASE, prompt=PROMPT, generator=gen(0)).frames, stock)
    assert call(p, output_type="latent").frames.shape[0] == 1

    p2 = DiasRPipeline.from_wan(WanPipeline(**tiny_wan_components()), id_router=router_pipe.id_router)
    assert p2.id_router is router_pipe.id_router
    assert np.array_equal(call(p2, routing="router").frames, call(router_pipe, routing="router").frames)


def test_from_wan_paths(router_pipe, tmp_path):
    WanPipeline(**tiny_wan_components()).save_pretrained(tmp_path / "wan")
    router_pipe.id_router.save_pretrained(tmp_path / "router")
    p = DiasRPipeline.from_wan(str(tmp_path / "wan"), id_router=str(tmp_path / "router"))
    assert isinstance(p.id_router, IDRouter)
    want = call(router_pipe, routing="router", return_routing_maps=True)
    got = call(p, routing="router", return_routing_maps=True)
    assert np.abs(got.frames - want.frames).max() <= 1e-5  # see test_save_and_load_round_trip
    assert torch.equal(got.routing_maps, want.routing_maps)
    # the result saves and reloads as a DiasR pipeline
    p.save_pretrained(tmp_path / "diasr")
    reloaded = DiasRPipeline.from_pretrained(tmp_path / "diasr")
    assert isinstance(reloaded.id_router, IDRouter)
    assert np.abs(call(reloaded, routing="router").frames - want.frames).max() <= 1e-5


# --------------------------------------------------------------------------------------------------------------------
# LoRA


def test_lora_save_and_load(tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    trained = DiasRPipeline(**tiny_wan_components())
    trained.transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    )
    layers = get_peft_model_state_dict(trained.transformer)
    assert layers and all("lora" in k for k in layers)
    DiasRPipeline.save_lora_weights(tmp_path / "lora", transformer_lora_layers=layers)
    assert list((tmp_path / "lora").glob("*.safetensors"))

    base = DiasRPipeline(**tiny_wan_components())
    without = call(base, output_type="latent").frames
    fresh = DiasRPipeline(**tiny_wan_components())
    fresh.load_lora_weights(tmp_path / "lora", adapter_name="id")
    with_lora = call(fresh, output_type="latent").frames
    assert (with_lora - without).abs().max() > 1e-5
    # the LoRA pipeline equals the pipeline the adapter was trained in
    torch.testing.assert_close(with_lora, call(trained, output_type="latent").frames, atol=1e-5, rtol=1e-5)
    # our processors are still installed and routing still works
    assert all(p.state is fresh.routing_state for p in fresh.transformer.attn_processors.values())
    assert call(fresh, routing="similarity", return_routing_maps=True).routing_maps.shape == (1, *MAP_SHAPE)
    # no subjects with LoRA: still the same as WanPipeline with the same LoRA
    wan = WanPipeline(**tiny_wan_components())
    wan.load_lora_weights(tmp_path / "lora", adapter_name="id")
    np.testing.assert_array_equal(call(fresh, n=0).frames, wan(**BASE, prompt=PROMPT, generator=gen(0)).frames)


@pytest.mark.parametrize("routing", ["router", "similarity"])
def test_batched_prompts_route_each_sample_like_a_single_call(pipe, router_pipe, routing):
    # the phrase "a man" has 4 tokens in the first prompt and 2 in the second: ragged phrase features per sample
    p = router_pipe if routing == "router" else pipe
    prompts = ["a man and a woman and a man walk", "a woman sits with a man"]
    kw = dict(BASE, subject_images=subject_images(2), subject_phrases=["a man", "a woman"], routing=routing,
              return_routing_maps=True, output_type="latent")  # fmt: skip
    both = p(prompt=prompts, **kw, generator=[gen(0), gen(1)])
    for i, prompt in enumerate(prompts):
        alone = p(prompt=prompt, **kw, generator=gen(i))
        torch.testing.assert_close(both.frames[i], alone.frames[0], atol=1e-4, rtol=1e-4)
        assert torch.equal(both.routing_maps[i], alone.routing_maps[0])


class TestWanPipeline(SubjectPipelineTesterMixin):
    """The shared pipeline checks (tests/pipeline_tester.py) on Wan2.1."""

    pipeline_class = DiasRPipeline
    stock_class = WanPipeline
    prompt = PROMPT
    phrases = PHRASES[:2]
    inputs = dict(BASE, max_sequence_length=512)
    default_exceptions = {
        name: "None: the reference style's default (the stock value for reference_style='diasr')"
        for name in ("num_frames", "num_inference_steps", "guidance_scale")
    }

    def get_components(self):
        return tiny_wan_components()
