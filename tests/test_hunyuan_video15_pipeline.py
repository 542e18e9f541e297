"""DiasRHunyuanVideo15Pipeline on a tiny in-process HunyuanVideo-1.5 (Qwen2.5-VL behind a chat template, ByT5,
16x-style VAE at toy size): stock parity, text routing through the template crop and the transformer's text reorder,
reference frames with their conditioning channels, every routing mode, save/load."""

from __future__ import annotations

import inspect
import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo15, HunyuanVideo15Pipeline
from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import format_text_input
from PIL import Image
from pipeline_tester import SubjectPipelineTesterMixin

from diasr_diffusers import DiasRHunyuanVideo15Pipeline, IDRouter
from diasr_diffusers.processors import HunyuanVideo15SubjectSparseAttnProcessor
from diasr_diffusers.routing import token_grid_factors
from diasr_diffusers.utils.images import letterbox
from diasr_diffusers.utils.latents import encode_latents
from diasr_diffusers.utils.tiny import configure_tiny_hunyuan_video15, tiny_hunyuan_video15_components

PROMPT = "the red star and the blue bottle dance in the park"
PHRASES = ["the red star", "the blue bottle"]
KW = dict(prompt=PROMPT, height=32, width=32, num_frames=5, num_inference_steps=2, max_sequence_length=24)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def shrink(pipe):
    """The toy text lengths (crop at the template's end, as 108 is for Qwen's tokenizer), no progress bars."""
    configure_tiny_hunyuan_video15(pipe).set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return shrink(DiasRHunyuanVideo15Pipeline(**tiny_hunyuan_video15_components()))


@pytest.fixture(scope="module")
def images():
    return [Image.new("RGB", (64, 96), (220, 40, 40)), Image.new("RGB", (80, 40), (40, 90, 230))]


def halves() -> torch.Tensor:
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, :, :16], masks[1, :, 16:] = True, True
    return masks


def test_only_the_transformer_blocks_are_routed(pipe):
    procs = pipe.transformer.attn_processors
    assert all(isinstance(p, HunyuanVideo15SubjectSparseAttnProcessor) for n, p in procs.items() if n.startswith("transformer_blocks."))  # fmt: skip
    refiner = [p for n, p in procs.items() if n.startswith("context_embedder.")]
    assert refiner and not any(isinstance(p, HunyuanVideo15SubjectSparseAttnProcessor) for p in refiner)


@pytest.mark.parametrize("keep_system_tokens", [0, 5])
def test_phrase_tokens_map_through_the_crop_and_the_text_reorder(pipe, keep_system_tokens):
    """Test-only reference: the phrase's token ids searched in the cropped template ids, then the transformer's own
    concatenation ``[image[m3], byt5[m2], qwen[m1], image[~m3], byt5[~m2], qwen[~m1]]`` applied to position labels."""
    crop = pipe.prompt_template_encode_start_idx
    pipe.prompt_template_encode_start_idx = crop - keep_system_tokens
    try:
        prompts = ['the red star meets "OPEN" and the blue bottle', "in the park the blue bottle sees the red star"]
        n_len, image_tokens = KW["max_sequence_length"], pipe.vision_num_semantic_tokens
        qwen = pipe._text_routing(prompts, PHRASES, n_len, 1)
        _, mask, _, mask_2 = pipe.encode_text(prompts, 2, 1, n_len, torch.device("cpu"))
        assert mask_2.sum(1).tolist()[1] == 0 and mask_2.sum(1).tolist()[0] > 0  # glyph text in the first prompt only
        joint = pipe.text_segments(qwen, mask, mask_2, image_tokens)
        for b, prompt in enumerate(prompts):
            chat = format_text_input([prompt], pipe.system_message)
            ids = pipe.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"][0]  # fmt: skip
            ids = ids[pipe.prompt_template_encode_start_idx :][:n_len]
            labels = {"qwen": torch.arange(n_len), "byt5": 1000 + torch.arange(len(mask_2[b]))}
            image = 2000 + torch.arange(image_tokens)
            m1, m2, m3 = mask[b].bool(), mask_2[b].bool(), torch.zeros(image_tokens, dtype=torch.bool)
            reordered = torch.cat([image[m3], labels["byt5"][m2], labels["qwen"][m1], image[~m3], labels["byt5"][~m2],
                                   labels["qwen"][~m1]])  # fmt: skip
            seg = joint[b]
            general = len(seg.order) - sum(seg.lengths)
            assert sorted(seg.order.tolist()) == list(range(image_tokens + len(m2) + n_len))
            for s, phrase in enumerate(PHRASES):
                want = pipe.tokenizer(phrase, add_special_tokens=False).input_ids
                hits = [p for p in range(len(ids)) if ids[p : p + len(want)] == want]
                assert len(hits) == 1
                expected = [int((reordered == hits[0] + j).nonzero()) for j in range(len(want))]
                start = general + sum(seg.lengths[:s])
                assert seg.order[start : start + seg.lengths[s]].tolist() == expected
            # The Qwen segments index prompt_embeds (the router's phrase features) at the same tokens.
            q = qwen[b]
            q_general = len(q.order) - sum(q.lengths)
            want = pipe.tokenizer(PHRASES[0], add_special_tokens=False).input_ids
            assert [ids[p] for p in q.order[q_general : q_general + q.lengths[0]].tolist()] == want
        # The pipeline hands the transformer these joint segments.
        seen = []
        hook = pipe.transformer.register_forward_pre_hook(lambda m, a: seen.append(pipe.routing_state.text_segments))
        try:
            pipe(**{**KW, "prompt": prompts, "num_inference_steps": 1}, subject_images=[Image.new("RGB", (8, 8))] * 2,
                 subject_phrases=PHRASES, guidance_scale=1.0, output_type="latent")  # fmt: skip
        finally:
            hook.remove()
        assert [(x.order.tolist(), x.lengths) for x in seen[0]] == [(x.order.tolist(), x.lengths) for x in joint]
    finally:
        pipe.prompt_template_encode_start_idx = crop


def test_crop_and_length_errors(pipe, images):
    crop = pipe.prompt_template_encode_start_idx
    pipe.prompt_template_encode_start_idx = crop + 2  # the crop eats "the red" of the prompt
    try:
        with pytest.raises(ValueError, match=r"crop \(crop_start=\d+\) cuts into the prompt"):
            pipe(**KW, subject_images=images, subject_phrases=PHRASES)
    finally:
        pipe.prompt_template_encode_start_idx = crop
    with pytest.raises(ValueError, match="subject 1: phrase 'the blue bottle' lies past"):
        pipe(**{**KW, "max_sequence_length": 6}, subject_images=images, subject_phrases=PHRASES)


def test_references_carry_their_conditioning_channels(pipe, images):
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["hidden_states"].clone()), with_kwargs=True)  # fmt: skip
    try:
        pipe(**{**KW, "num_inference_steps": 1}, subject_images=[images[0], [images[1], images[1]]],
             output_type="latent", guidance_scale_ref=3.0)  # fmt: skip
    finally:
        hook.remove()
    # cond (3 video + 3 reference frames), uncond (video only), reference-only pass of three-way guidance.
    assert [tuple(x.shape) for x in seen] == [(1, 9, 6, 8, 8), (1, 9, 3, 8, 8), (1, 9, 6, 8, 8)]
    video, refs = seen[0][:, :, :3], seen[0][:, :, 3:]
    assert video[:, 4:].eq(0).all()  # text-to-video: zero condition latents and mask, as stock
    pixels = pipe.video_processor.preprocess(letterbox(images[0], 32, 32), height=32, width=32)  # onto white
    expected = encode_latents(pipe.vae, pixels[:, :, None])[:, :, 0]
    torch.testing.assert_close(refs[:, :4, 0], expected)  # clean latent ...
    torch.testing.assert_close(refs[:, 4:8, 0], expected)  # ... repeated as the condition latent ...
    assert refs[:, 8].eq(1).all()  # ... with condition mask 1
    torch.testing.assert_close(refs[:, :, 1], refs[:, :, 2])
    assert not torch.allclose(refs[:, :4, 0], refs[:, :4, 1])


def test_token_grid_reads_the_hunyuan_vae(pipe):
    assert token_grid_factors(pipe.transformer, pipe.vae) == {"temporal_compression": 2, "spatial_compression": 4, "patch_size": (1, 1, 1)}  # fmt: skip
    defaults = {k: p.default for k, p in inspect.signature(AutoencoderKLHunyuanVideo15.__init__).parameters.items()}
    real = SimpleNamespace(config=SimpleNamespace(**{k: v for k, v in defaults.items() if k != "self"}))
    assert token_grid_factors(pipe.transformer, real)["spatial_compression"] == 16  # not 2 ** (5 - 1) by accident
    assert token_grid_factors(pipe.transformer, real)["temporal_compression"] == 4


def test_text_routing_changes_the_routed_tokens(pipe, images):
    common = dict(KW, subject_images=images, subject_phrases=PHRASES, output_type="latent", routing="similarity")
    routed, plain = pipe(**common, generator=gen()), pipe(**common, route_text=False, generator=gen())
    assert (plain.frames - routed.frames).abs().max() > 1e-6


def test_sigmas_are_the_levels_used(pipe, images):
    call = {k: v for k, v in KW.items() if k != "num_inference_steps"}
    pipe(**call, subject_images=images, sigmas=[0.9, 0.4], output_type="latent", generator=gen())
    torch.testing.assert_close(pipe.scheduler.sigmas, torch.tensor([0.9, 0.4, 0.0]), rtol=0, atol=1e-5)
    pipe(**KW, output_type="latent", generator=gen())  # default: stock linspace(1, 0) shifted by the scheduler
    shift = pipe.scheduler.config.shift
    torch.testing.assert_close(pipe.scheduler.sigmas[1], torch.tensor(shift * 0.5 / (1 + (shift - 1) * 0.5)))
    with pytest.raises(ValueError, match="`sigmas` must be strictly decreasing"):
        pipe(**call, sigmas=[0.4, 0.9])


def test_a_stock_folder_loads_without_a_router(pipe, images, tmp_path):
    HunyuanVideo15Pipeline(**tiny_hunyuan_video15_components()).save_pretrained(tmp_path / "stock")
    plain = shrink(DiasRHunyuanVideo15Pipeline.from_pretrained(tmp_path / "stock"))
    assert plain.id_router is None and "guider" in json.loads((tmp_path / "stock" / "model_index.json").read_text())
    call = dict(KW, subject_images=images, routing="similarity", output_type="latent")
    torch.testing.assert_close(plain(**call, generator=gen()).frames, pipe(**call, generator=gen()).frames)


def test_bad_inputs(pipe, images):
    with pytest.raises(ValueError, match="Give both `height` and `width`"):
        pipe(**{**KW, "height": None})
    with pytest.raises(ValueError, match=r"`latents` must be a tensor of shape \(videos, latent channels"):
        pipe(**KW, latents=torch.zeros(1, 9, 3, 8, 8))
    with pytest.raises(ValueError, match="`prompt_embeds_mask` also have to be passed"):
        pipe(**{**KW, "prompt": None}, prompt_embeds=torch.zeros(1, 4, 16))
    with pytest.raises(ValueError, match="does not fit this HunyuanVideo15Transformer3DModel"):
        DiasRHunyuanVideo15Pipeline(**{**pipe.components, "id_router": IDRouter(hidden_dim=8, text_dim=16, num_layers=2)})  # fmt: skip
    with pytest.raises(ValueError, match="`height` and `width` have to be divisible by 4"):
        pipe(**{**KW, "height": 30}, subject_images=images)


def test_readme_hunyuan_video15_example_runs(capsys):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "tiny_hunyuan_video15_components" in b)  # fmt: skip
    namespace: dict = {}
    exec(compile(block, "README HunyuanVideo-1.5 example", "exec"), namespace)  # noqa: S102 - the README's own example
    assert namespace["out"].frames[0].shape == (5, 32, 32, 3)
    assert "(5, 32, 32, 3) (3, 8, 8)" in capsys.readouterr().out


class TestHunyuanVideo15Pipeline(SubjectPipelineTesterMixin):
    """The shared pipeline checks (tests/pipeline_tester.py) on HunyuanVideo-1.5 (its stock pipeline has no
    callbacks, no `guidance_scale` and reads `tokenizer_max_length`: those are DiasR's keyword-only extras)."""

    pipeline_class = DiasRHunyuanVideo15Pipeline
    stock_class = HunyuanVideo15Pipeline
    prompt = PROMPT
    phrases = PHRASES
    inputs = {k: v for k, v in KW.items() if k != "prompt"}
    diasr_only_inputs = ("max_sequence_length",)
    default_exceptions = {"num_inference_steps": "None: 50, or len(sigmas) when `sigmas` are given"}

    def get_components(self):
        return tiny_hunyuan_video15_components()

    def configure(self, pipe):
        shrink(pipe).tokenizer_max_length = KW["max_sequence_length"]  # the stock pipeline's text length
        return pipe

    def encode_prompt_inputs(self, pipe, prompt, negative_prompt):
        n = KW["max_sequence_length"]
        names = ("prompt_embeds", "prompt_embeds_mask", "prompt_embeds_2", "prompt_embeds_mask_2")
        positive = pipe.encode_text([prompt], 1, 1, n, torch.device("cpu"))
        negative = pipe.encode_text([negative_prompt], 1, 1, n, torch.device("cpu"))
        return {**dict(zip(names, positive)), **{f"negative_{k}": v for k, v in zip(names, negative)}}
