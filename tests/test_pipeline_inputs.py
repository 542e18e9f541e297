"""DiasRPipeline argument checking: every bad number, string or shape is refused by name before anything is
encoded, and arguments the chosen mode ignores are reported. No test here runs the denoising loop except the LoRA
scale one (one step)."""

from __future__ import annotations

import io
import logging
import math

import numpy as np
import pytest
import torch
from diffusers import WanPipeline

import diasr_diffusers.pipelines.pipeline_diasr_wan as pipeline_module
import diasr_diffusers.pipelines.subjects as subjects_module
from diasr_diffusers import DiasRPipeline
from diasr_diffusers.utils.tiny import tiny_wan_components

PROMPT = "a man and a woman walk in the park"
BASE = dict(prompt=PROMPT, height=32, width=32, num_frames=9, num_inference_steps=2)
SUBJECTS = dict(subject_images=[np.zeros((8, 8, 3), np.float32)] * 2, subject_phrases=["a man", "a woman"])


class Encoded(Exception):
    """Raised in place of the text encoder: the checks are over."""


@pytest.fixture(scope="module")
def pipe():
    return DiasRPipeline(**tiny_wan_components())


@pytest.fixture
def checked(pipe, monkeypatch):
    """``checked(**kwargs)`` runs a call up to the text encoder and returns what the pipeline logged."""

    def encode_prompt(*args, **kwargs):
        raise Encoded

    monkeypatch.setattr(pipe, "encode_prompt", encode_prompt)

    def run(**kwargs):
        # diffusers' loggers do not propagate to the root logger (so not to caplog): listen to ours directly (the
        # pipeline's and the shared subject handling's).
        log = io.StringIO()
        handler = logging.StreamHandler(log)
        for logger in (pipeline_module.logger, subjects_module.logger):
            logger.addHandler(handler)
        try:
            with pytest.raises(Encoded):
                pipe(**{**BASE, **kwargs})
        finally:
            for logger in (pipeline_module.logger, subjects_module.logger):
                logger.removeHandler(handler)
        return log.getvalue()

    return run


NAN, INF = math.nan, math.inf
BAD = [
    ("guidance_scale", NAN, ValueError, "finite"),
    ("guidance_scale", INF, ValueError, "finite"),
    ("guidance_scale", -2.0, ValueError, ">= 0"),
    ("guidance_scale", "5", TypeError, "number"),
    ("guidance_scale_ref", NAN, ValueError, "finite"),
    ("guidance_scale_ref", -1.0, ValueError, ">= 0"),
    ("similarity_threshold", NAN, ValueError, "finite"),
    ("num_frames", -7, ValueError, ">= 1"),
    ("num_frames", 0, ValueError, ">= 1"),
    ("num_frames", 9.0, TypeError, "integer"),
    ("num_frames", True, TypeError, "integer"),
    ("num_inference_steps", -1, ValueError, ">= 1"),
    ("num_inference_steps", 0, ValueError, ">= 1"),
    ("num_inference_steps", 2.5, TypeError, "integer"),
    ("height", 0, ValueError, ">= 1"),
    ("height", -32, ValueError, ">= 1"),
    ("height", 40, ValueError, "divisible by 16"),
    ("width", 32.0, TypeError, "integer"),
    ("num_videos_per_prompt", 0, ValueError, ">= 1"),
    ("max_sequence_length", 0, ValueError, ">= 1"),
    ("routing", "magic", ValueError, "'auto' or one of"),
    ("routing", None, ValueError, "'auto' or one of"),
    ("output_type", "mp4", ValueError, "'np', 'pil', 'pt', 'latent'"),
    ("prompt", [], ValueError, "non-empty list"),
    ("prompt", ["a man", 3], ValueError, "non-empty list"),
    ("negative_prompt", ["ugly", "blurry"], ValueError, "1 prompts"),
    ("generator", [torch.Generator()] * 2, ValueError, "one torch.Generator per video"),
    ("generator", 0, TypeError, "torch.Generator"),
    ("latents", torch.zeros(1, 4, 3, 4, 4), ValueError, r"\(1, 16, 3, 4, 4\)"),  # tiny Wan: 16 channels
    ("latents", torch.full((1, 16, 3, 4, 4), NAN), ValueError, "finite"),
    ("attention_kwargs", {"scale": NAN}, ValueError, "finite"),
    ("attention_kwargs", {"lora_scale": 1.0}, ValueError, "only hold 'scale'"),
    ("route_text", "no", TypeError, "bool"),
    ("return_routing_maps", 1, TypeError, "bool"),
    ("callback_on_step_end", 5, TypeError, "callable"),
    ("callback_on_step_end_tensor_inputs", "latents", ValueError, r"list of names, e.g. \['latents'\]"),
]


@pytest.mark.parametrize("name, value, error, message", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_arguments_are_refused_by_name_before_encoding(checked, name, value, error, message):
    with pytest.raises(error, match=message) as info:
        checked(**SUBJECTS, **{name: value})
    assert name in str(info.value)


def test_bad_arguments_are_refused_without_subjects_too(checked):
    for name, value in (("routing", "magic"), ("guidance_scale_ref", NAN), ("num_frames", -7)):
        with pytest.raises(ValueError, match=name):
            checked(**{name: value})


def test_bad_prompt_embeds(checked):
    base = dict(prompt=None, prompt_embeds=torch.zeros(1, 512, 32))  # tiny Wan: text_dim 32
    for kwargs, message in (
        (
            dict(prompt_embeds=torch.zeros(1, 512, 7)),
            r"`prompt_embeds` must be a tensor of shape \(batch, tokens, 32\)",
        ),
        (dict(prompt_embeds=torch.full((1, 512, 32), NAN)), "`prompt_embeds` must be a finite"),
        (dict(negative_prompt_embeds=torch.zeros(2, 512, 32)), "`negative_prompt_embeds` has batch 2"),
        (dict(negative_prompt_embeds=torch.zeros(512, 32)), "`negative_prompt_embeds` must be a tensor of shape"),
    ):
        with pytest.raises(ValueError, match=message):
            checked(**{**base, **kwargs})
    assert checked(**base, negative_prompt_embeds=torch.zeros(1, 512, 32)) == ""


def test_from_wan_checks_its_arguments():
    with pytest.raises(TypeError, match="wan_pipeline_or_path"):
        DiasRPipeline.from_wan(123)
    with pytest.raises(TypeError, match="id_router"):
        DiasRPipeline.from_wan(WanPipeline(**tiny_wan_components()), id_router=42)


def test_good_arguments_pass(checked):
    assert checked(**SUBJECTS, generator=[torch.Generator()] * 2, num_videos_per_prompt=2, guidance_scale=0) == ""
    assert checked(latents=torch.zeros(1, 16, 3, 4, 4), attention_kwargs={"scale": 0.5}, height=np.int64(32)) == ""


def test_num_frames_is_rounded_with_the_value_used(checked):
    assert "num_frames=12, generating 9 frames" in checked(num_frames=12)


@pytest.mark.parametrize(
    "kwargs, ignored",
    [
        (dict(SUBJECTS, routing="similarity", subject_masks=torch.ones(2, 32, 32)), "`subject_masks` (routing='similarity'"),
        (dict(SUBJECTS, routing="dense", similarity_threshold=0.3), "`similarity_threshold` (routing='dense'"),
        (dict(SUBJECTS, routing="masks", subject_masks=torch.ones(2, 32, 32), similarity_threshold=0.3),
         "`similarity_threshold` (routing='masks'"),
        (dict(guidance_scale_ref=5.0), "`guidance_scale_ref` (no `subject_images`)"),
        (dict(SUBJECTS, guidance_scale=1.0, guidance_scale_ref=5.0), "`guidance_scale_ref` (guidance is off"),
        (dict(SUBJECTS, routing="dense", return_routing_maps=True), "`return_routing_maps` (routing='dense'"),
        (dict(return_routing_maps=True), "`return_routing_maps` (routing='none'"),
        (dict(routing="dense"), "`routing='dense'`: no `subject_images`"),
    ],
)  # fmt: skip
def test_arguments_the_mode_ignores_are_reported(checked, kwargs, ignored):
    assert ignored in checked(**kwargs)


def test_arguments_the_mode_uses_are_not_reported(checked):
    assert checked(**SUBJECTS, routing="similarity", similarity_threshold=0.3, guidance_scale_ref=5.0) == ""
    assert checked(**SUBJECTS, subject_masks=torch.ones(2, 32, 32), return_routing_maps=True) == ""


def test_lora_scale_reaches_the_transformer():
    from peft import LoraConfig

    base = DiasRPipeline(**tiny_wan_components())
    lora = DiasRPipeline(**tiny_wan_components())
    lora.transformer.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_v"], init_lora_weights=False))
    kw = dict(BASE, num_inference_steps=1, output_type="latent")
    without = base(**kw, generator=torch.Generator().manual_seed(0)).frames
    off = lora(**kw, attention_kwargs={"scale": 0.0}, generator=torch.Generator().manual_seed(0)).frames
    on = lora(**kw, generator=torch.Generator().manual_seed(0)).frames
    torch.testing.assert_close(off, without)
    assert (on - without).abs().max() > 1e-4
