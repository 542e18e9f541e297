"""LTX-Video on a tiny in-process model: the LTXSubjectSparseAttnProcessor adapter against stock attention,
DiasRLTXPipeline (parity with LTXPipeline without subjects, every routing mode, save/load), the token grid of LTX's
VAE (8x temporal, 32x spatial, patch 1) and IDRouter sizing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import LTXPipeline
from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor
from pipeline_tester import SubjectPipelineTesterMixin

from diasr_diffusers import IDRouter
from diasr_diffusers.pipelines import DiasRLTXPipeline
from diasr_diffusers.processors import SubjectRoutingState, TextSegments
from diasr_diffusers.processors.ltx import LTXSubjectSparseAttnProcessor, set_ltx_subject_sparse_attn_processor
from diasr_diffusers.routing import masks_to_token_grid, token_grid_factors
from diasr_diffusers.utils.tiny import tiny_ltx_components

PROMPT = "a man and a woman walk in the park"
PHRASES = ["a man", "a woman"]
# 64 px / 32 = 2 x 2 tokens per latent frame; 9 frames -> (9 - 1) / 8 + 1 = 2 latent frames.
BASE = dict(
    prompt=PROMPT, height=64, width=64, num_frames=9, num_inference_steps=2, guidance_scale=3.0, output_type="np"
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def images(n=2):
    rs = np.random.RandomState(0)
    return [rs.rand(20 + 10 * i, 24, 3).astype(np.float32) for i in range(n)]


@pytest.fixture(scope="module")
def comps():
    return tiny_ltx_components()


@pytest.fixture(scope="module")
def pipe(comps):
    torch.manual_seed(0)
    router = IDRouter.from_transformer(comps["transformer"], router_dim=16, num_identity_queries=2, num_heads=2)
    return DiasRLTXPipeline(**comps, id_router=router)


def test_router_and_token_grid_are_sized_for_ltx(comps):
    router = IDRouter.from_transformer(comps["transformer"])
    assert (router.config.hidden_dim, router.config.text_dim, router.config.num_layers) == (24, 32, 2)
    factors = token_grid_factors(comps["transformer"], comps["vae"])
    assert factors == {"temporal_compression": 8, "spatial_compression": 32, "patch_size": (1, 1, 1)}
    masks = torch.zeros(1, 17, 64, 64)
    masks[0, 1:9, :32, :] = 1  # the first 8-frame chunk's upper half: latent frame 1, top row of tokens
    cov = masks_to_token_grid(masks, transformer=comps["transformer"], vae=comps["vae"])
    assert cov.shape == (1, 3, 2, 2)
    expected = torch.zeros(3, 2, 2)
    expected[1, 0] = 1
    assert torch.equal(cov[0], expected)


# --------------------------------------------------------------------------------------------------------------------
# The adapter against stock attention


def _joint_inputs(transformer, num_refs=2):
    f, h, w = 2, 2, 2
    torch.manual_seed(1)
    video = torch.randn(1, f * h * w, 8)
    refs = torch.randn(1, num_refs * h * w, 8)
    text = torch.randn(1, 6, 32)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    return video, refs, text, mask, (f, h, w)


def test_all_null_routing_sees_exactly_the_video(comps):
    """Every video token routed to null attends to the video only: the video part of the joint forward equals the
    stock transformer on the video alone (rotary positions, norms, projections and timesteps agree)."""
    transformer = comps["transformer"]
    video, refs, text, mask, (f, h, w) = _joint_inputs(transformer)
    t = torch.tensor([500.0])
    transformer.set_attn_processor(LTXVideoAttnProcessor())
    with torch.no_grad():
        want = transformer(video, text, t, mask, num_frames=f, height=h, width=w, return_dict=False)[0]
        state = set_ltx_subject_sparse_attn_processor(transformer)
        t_joint = torch.cat([t.expand(1, video.shape[1]), torch.zeros(1, refs.shape[1])], dim=1)
        with state.activate(ref_lengths=[h * w, h * w], mode="similarity", similarity_threshold=2.0, record=True):
            joint = torch.cat([video, refs], dim=1)
            got = transformer(joint, text, t_joint, mask, num_frames=f + 2, height=h, width=w, return_dict=False)[0]
            assert all((b == -1).all() for b in state.buckets.values()) and len(state.buckets) == 2
    torch.testing.assert_close(got[:, : video.shape[1]], want, rtol=1e-5, atol=1e-5)


def test_routed_cross_attention_is_masked_attention_over_its_phrase(comps):
    """A video token routed to subject 0 sees the valid general tokens and phrase 0: the same as stock attention with
    a mask hiding phrase 1 and the padding."""
    attn = comps["transformer"].transformer_blocks[0].attn2
    torch.manual_seed(2)
    hidden = torch.randn(1, 4 + 4, 24)  # 4 video tokens + one 4-token reference frame of subject 0
    text = torch.randn(1, 6, 24)
    # text positions: 0, 1 general; 2 phrase 0; 3 phrase 1; 4, 5 padding
    state = SubjectRoutingState()
    proc = LTXSubjectSparseAttnProcessor(state, 0)
    segments = [TextSegments(order=torch.tensor([0, 1, 2, 3]), lengths=[1, 1])]  # padding left out
    video_buckets = torch.tensor([[0, 0, 1, 1]])
    with (
        torch.no_grad(),
        state.activate(ref_lengths=[2, 2], mode="masks", mask_buckets=video_buckets, text_segments=segments),
    ):
        state.current_buckets = video_buckets
        got = proc(attn, hidden, text)
        for tokens, visible in ((slice(0, 2), [1, 1, 1, 0, 0, 0]), (slice(2, 4), [1, 1, 0, 1, 0, 0]),
                                (slice(4, 6), [1, 1, 1, 0, 0, 0]), (slice(6, 8), [1, 1, 0, 1, 0, 0])):  # fmt: skip
            bias = (1 - torch.tensor([visible]).float())[:, None] * -10000.0
            want = LTXVideoAttnProcessor()(attn, hidden[:, tokens], text, bias)
            torch.testing.assert_close(got[:, tokens], want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# Pipeline


def test_bad_inputs(pipe):
    with pytest.raises(ValueError, match="`frame_rate` must be > 0"):
        pipe(**BASE, frame_rate=0)  # was a ZeroDivisionError in the rotary scale
    with pytest.raises(ValueError, match="divisible by 32"):
        pipe(**{**BASE, "height": 48})
    with pytest.raises(ValueError, match=r"1 \+ 8 \* k"):
        pipe(**{**BASE, "num_frames": 13})
    with pytest.raises(ValueError, match="`sigmas`"):
        pipe(**BASE, sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="one phrase per subject"):
        pipe(**BASE, subject_images=images(), subject_phrases=["a man"])


# --------------------------------------------------------------------------------------------------------------------
# Training


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from diasr_diffusers.data import make_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic(out, num_clips=3, seed=0, subjects=(2, 2), num_frames=9, height=64, width=64)
    return out


@pytest.mark.parametrize("stage", ["align", "route", "dense"])
def test_one_training_step_of_each_stage(data_dir, tmp_path, stage):
    from diasr_diffusers.training import DiasRTrainer, TrainConfig

    config = TrainConfig.from_dict({
        "stage": stage, "allow_scratch": True, "train_data": str(data_dir), "model_family": "ltx", "tiny_model": {},
        "height": 64, "width": 64, "num_frames": 9, "batch_size": 1, "max_steps": 1, "learning_rate": 1e-2,
        "router": {"routed_layers": "all", "router_dim": 16, "num_identity_queries": 2, "num_heads": 2},
        "lora_rank": 2, "lora_alpha": 2, "checkpointing_steps": 1, "eval_fraction": 0.34, "eval_sigmas": [0.5],
        "max_sequence_length": 32,
    })  # fmt: skip
    trainer = DiasRTrainer(config, tmp_path / "out")
    trainer.setup()
    assert isinstance(trainer.pipe, DiasRLTXPipeline)
    lora = {k: v.clone() for k, v in trainer.transformer.named_parameters() if v.requires_grad}
    router = {k: v.clone() for k, v in trainer.router.state_dict().items()}
    result = trainer.train()
    assert np.isfinite(result["diffusion_loss"]) and result["num_eval_clips"] == 1
    params = dict(trainer.transformer.named_parameters())
    assert any(not torch.equal(v, params[k]) for k, v in lora.items())
    assert any(not torch.equal(v, trainer.router.state_dict()[k]) for k, v in router.items()) == (stage != "dense")
    if stage != "dense":  # routing was scored on LTX's token grid: 2 latent frames x 2 x 2 tokens
        assert "routing_iou_mean" in result
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


def test_training_config_checks_ltx_sizes_and_toy_arguments(data_dir):
    from diasr_diffusers.training import TrainConfig
    from diasr_diffusers.training.config import ConfigError

    base = {"stage": "align", "allow_scratch": True, "train_data": str(data_dir), "model_family": "ltx",
            "tiny_model": {}, "height": 64, "width": 64, "num_frames": 9}  # fmt: skip
    TrainConfig.from_dict(base)
    with pytest.raises(ConfigError, match=r"`num_frames` must be 1 \+ 8k"):
        TrainConfig.from_dict({**base, "num_frames": 13})  # 1 + 4k: fine for Wan, not for LTX's VAE
    with pytest.raises(ConfigError, match="multiples of 32"):
        TrainConfig.from_dict({**base, "height": 48})
    with pytest.raises(ConfigError, match=r"unknown `tiny_model` key\(s\) \['wan22'\]"):
        TrainConfig.from_dict({**base, "tiny_model": {"wan22": "a14b"}})


def test_from_ltx_takes_a_stock_pipeline(comps):
    from_ltx = DiasRLTXPipeline.from_ltx(LTXPipeline(**comps))
    assert from_ltx.id_router is None and from_ltx.transformer is comps["transformer"]


def test_guidance_rescale_and_timesteps_are_honoured(pipe):
    """LTXPipeline's `guidance_rescale` (Diffusers' rescale_noise_cfg) and custom `timesteps` reach the loop."""
    kw = dict(BASE, output_type="latent")
    plain = pipe(**kw, generator=gen()).frames
    assert (pipe(**kw, guidance_rescale=0.7, generator=gen()).frames - plain).abs().max() > 1e-6
    pipe(**{**kw, "num_inference_steps": None}, timesteps=[999, 500], generator=gen())
    assert pipe.num_timesteps == 2


class TestLTXPipeline(SubjectPipelineTesterMixin):
    """The shared pipeline checks (tests/pipeline_tester.py) on LTX-Video."""

    pipeline_class = DiasRLTXPipeline
    stock_class = LTXPipeline
    prompt = PROMPT
    phrases = PHRASES
    inputs = {k: v for k, v in BASE.items() if k not in ("prompt", "output_type")}

    def get_components(self):
        return tiny_ltx_components()

    def encode_prompt_inputs(self, pipe, prompt, negative_prompt):
        embeds, mask, negative, negative_mask = pipe.encode_prompt(prompt, negative_prompt, True)
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask, "negative_prompt_embeds": negative,
                "negative_prompt_attention_mask": negative_mask}  # fmt: skip
