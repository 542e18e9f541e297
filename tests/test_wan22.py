"""Wan2.2 in DiasRPipeline and the trainer, on tiny in-process models: A14B's two experts (switched at
``boundary_ratio``, ``guidance_scale_2``, one router for both) and TI2V-5B (48-channel VAE with 16x spatial
compression, per-token timesteps with the references at 0). Parity with WanPipeline, routing modes, save/load,
``from_wan`` and one training step of each stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanPipeline
from pipeline_tester import SubjectPipelineTesterMixin

from diasr_diffusers import DiasRPipeline, IDRouter, SubjectSparseAttnProcessor
from diasr_diffusers.data import make_synthetic
from diasr_diffusers.routing import masks_to_token_grid
from diasr_diffusers.training import ConfigError, DiasRTrainer, TrainConfig
from diasr_diffusers.utils.tiny import tiny_wan22_components, tiny_wan_components

PROMPT = "a man and a woman walk in the park"
PHRASES = ["a man", "a woman"]
SIZE = {"a14b": 32, "ti2v": 64}  # multiples of 16 (VAE 8 x patch 2) and 32 (VAE 16 x patch 2)
# 4 steps with the tiny scheduler's shift 7: two run on the high-noise expert, two on the low-noise one.
STEPS = 4


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def images(n=2):
    rs = np.random.RandomState(0)
    return [rs.rand(20 + 10 * i, 24, 3).astype(np.float32) for i in range(n)]


def base(kind, **kwargs):
    s = SIZE[kind]
    args = dict(prompt=PROMPT, height=s, width=s, num_frames=9, num_inference_steps=STEPS, guidance_scale=5.0)
    return {**args, **kwargs}


def router_for(transformer):
    torch.manual_seed(0)
    return IDRouter.from_transformer(transformer, router_dim=16, num_identity_queries=2, num_heads=2)


@pytest.fixture(scope="module")
def a14b():
    comps = tiny_wan22_components("a14b")
    return DiasRPipeline(**comps, id_router=router_for(comps["transformer"]))


@pytest.fixture(scope="module")
def ti2v():
    comps = tiny_wan22_components("ti2v")
    return DiasRPipeline(**comps, id_router=router_for(comps["transformer"]))


def count_calls(module):
    calls = []

    def hook(module, args, kwargs):  # the pipeline passes the timestep by position, the trainer by name
        calls.append(args[1] if len(args) > 1 else kwargs["timestep"])

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    return calls, handle


# --------------------------------------------------------------------------------------------------------------------
# Parity with Diffusers' WanPipeline without subjects


@pytest.mark.parametrize("kind", ["ti2v"])  # a14b: TestWan22Pipeline
def test_no_subjects_is_exactly_wan_pipeline(kind):
    comps = tiny_wan22_components(kind)
    ours, stock = DiasRPipeline(**comps), WanPipeline(**comps)
    extra = {"guidance_scale_2": 2.0} if kind == "a14b" else {}
    a = ours(**base(kind), **extra, generator=gen()).frames
    b = stock(**base(kind), **extra, generator=gen()).frames
    np.testing.assert_array_equal(a, b)
    assert ours.config.expand_timesteps == (kind == "ti2v")


def test_a14b_switches_experts_at_the_boundary(a14b):
    high, h1 = count_calls(a14b.transformer)
    low, h2 = count_calls(a14b.transformer_2)
    try:
        a14b(**base("a14b"), subject_images=images(), subject_phrases=PHRASES, routing="similarity", generator=gen())
    finally:
        h1.remove(), h2.remove()
    boundary = a14b.config.boundary_ratio * 1000
    # Each expert runs its steps' conditional and unconditional branches, and only timesteps of its own range.
    n_high = int((a14b.scheduler.timesteps >= boundary).sum())
    assert 0 < n_high < STEPS and len(high) == 2 * n_high and len(low) == 2 * (STEPS - n_high)
    assert all(float(t[0]) >= boundary for t in high) and all(float(t[0]) < boundary for t in low)


def test_guidance_scale_2_guides_the_low_noise_expert(a14b):
    args = base("a14b", subject_images=images(), subject_phrases=PHRASES, routing="similarity")
    same = a14b(**args, generator=gen()).frames
    np.testing.assert_array_equal(same, a14b(**args, guidance_scale_2=5.0, generator=gen()).frames)
    assert not np.allclose(same, a14b(**args, guidance_scale_2=1.5, generator=gen()).frames)


# --------------------------------------------------------------------------------------------------------------------
# Routing


@pytest.mark.parametrize("kind", ["ti2v"])  # a14b: TestWan22Pipeline
@pytest.mark.parametrize("routing", ["similarity", "router", "masks", "dense"])
def test_routing_modes(a14b, ti2v, kind, routing):
    pipe = a14b if kind == "a14b" else ti2v
    s = SIZE[kind]
    masks = torch.zeros(2, s, s)
    masks[0, :, : s // 2], masks[1, :, s // 2 :] = 1, 1
    extra = {"subject_masks": masks} if routing == "masks" else {}
    out = pipe(**base(kind), subject_images=images(), subject_phrases=PHRASES, routing=routing,
               return_routing_maps=routing != "dense", generator=gen(), **extra)  # fmt: skip
    plain = pipe(**base(kind), generator=gen()).frames
    assert out.frames.shape == (1, 9, s, s, 3) and np.isfinite(out.frames).all()
    assert not np.allclose(out.frames, plain)  # the references reached the model
    for expert in pipe.experts:  # processors on both experts, one state
        procs = expert.attn_processors.values()
        assert all(isinstance(p, SubjectSparseAttnProcessor) and p.state is pipe.routing_state for p in procs)
    if routing == "dense":
        assert out.routing_maps is None
        return
    # The maps come from the last step, which the low-noise expert runs for A14B: it was routed too.
    assert out.routing_maps.shape == (1, 3, 2, 2)
    if routing == "masks":
        assert (out.routing_maps[..., 0] == 0).all() and (out.routing_maps[..., 1] == 1).all()


def test_ti2v_reference_tokens_get_timestep_zero(ti2v):
    seen, handle = count_calls(ti2v.transformer)
    try:
        ti2v(**base("ti2v", guidance_scale=1.0, num_inference_steps=1), subject_images=images(), routing="similarity",
             generator=gen())  # fmt: skip
    finally:
        handle.remove()
    (timestep,) = seen
    # (B, tokens): 3 latent video frames + 2 reference frames, 2 x 2 tokens each (64 px / 16 / 2).
    assert timestep.shape == (1, 5 * 4)
    assert (timestep[:, :12] == 1000).all() and (timestep[:, 12:] == 0).all()


def test_ti2v_mask_grid_and_sizes(ti2v):
    masks = torch.zeros(1, 9, 64, 64)
    masks[0, :, :, :32] = 1
    cov = masks_to_token_grid(masks, transformer=ti2v.transformer, vae=ti2v.vae)  # 16x VAE x patch 2 = 32 px/token
    assert cov.shape == (1, 3, 2, 2)
    assert (cov[0, :, :, 0] == 1).all() and (cov[0, :, :, 1] == 0).all()
    with pytest.raises(ValueError, match="divisible by 32"):
        ti2v(**{**base("ti2v"), "height": 48})


# --------------------------------------------------------------------------------------------------------------------
# Loading


def test_save_and_load_keep_both_experts_and_the_router(a14b, ti2v, tmp_path):
    for name, pipe in (("a14b", a14b), ("ti2v", ti2v)):
        pipe.save_pretrained(tmp_path / name)
        index = json.loads((tmp_path / name / "model_index.json").read_text())
        loaded = DiasRPipeline.from_pretrained(tmp_path / name)
        assert loaded.config.boundary_ratio == pipe.config.boundary_ratio
        assert loaded.config.expand_timesteps == pipe.config.expand_timesteps
        assert (loaded.transformer_2 is not None) == (name == "a14b") == (index["transformer_2"][0] is not None)
        for part in ("transformer", "transformer_2", "id_router", "vae"):
            a, b = getattr(pipe, part), getattr(loaded, part)
            assert (a is None) == (b is None)
            if a is not None:
                sa, sb = a.state_dict(), b.state_dict()
                assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), part
        args = base(name, subject_images=images(), subject_phrases=PHRASES, routing="router")
        # Bit-identical weights; safetensors-loaded tensors take other CPU GEMM paths (~1e-7, see test_pipeline).
        want, got = pipe(**args, generator=gen()).frames, loaded(**args, generator=gen()).frames
        assert np.abs(want - got).max() <= 1e-5


def test_only_the_low_noise_expert_runs_and_saves_like_stock(tmp_path):
    """Wan2.2 with only `transformer_2` (`transformer=None`, `boundary_ratio=1.0`), which WanPipeline runs and
    Diffusers' tests use: it denoises every step, and the saved folder loads back the same way."""
    # Diffusers' own test set-up: with UniPC's flow sigmas no timestep reaches 1000 = boundary_ratio * 1000, where
    # WanPipeline would pick the missing `transformer` (Euler's first timestep is 1000: stock fails there, DiasR
    # gives every step to `transformer_2`).
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    comps = {**tiny_wan22_components("a14b"), "transformer": None, "boundary_ratio": 1.0, "scheduler": scheduler}
    ours, stock = DiasRPipeline(**comps), WanPipeline(**comps)
    args = base("a14b", output_type="latent")
    torch.testing.assert_close(ours(**args, generator=gen()).frames, stock(**args, generator=gen()).frames, rtol=0, atol=0)
    routed = base("a14b", output_type="latent", subject_images=images(), subject_phrases=PHRASES, routing="similarity")
    want = ours(**routed, generator=gen()).frames
    ours.save_pretrained(tmp_path / "low")
    assert json.loads((tmp_path / "low" / "model_index.json").read_text())["transformer"] == [None, None]
    loaded = DiasRPipeline.from_pretrained(tmp_path / "low")
    assert loaded.transformer is None and loaded.experts == [loaded.transformer_2]
    torch.testing.assert_close(loaded(**routed, generator=gen()).frames, want, rtol=1e-5, atol=1e-5)


def test_from_wan_accepts_wan22(tmp_path):
    comps = tiny_wan22_components("a14b")
    stock = WanPipeline(**comps)
    pipe = DiasRPipeline.from_wan(stock)
    assert pipe.transformer_2 is stock.transformer_2 and pipe.config.boundary_ratio == 0.875
    stock.save_pretrained(tmp_path / "a14b")
    pipe = DiasRPipeline.from_wan(tmp_path / "a14b")
    assert pipe.transformer_2 is not None and pipe.config.boundary_ratio == 0.875
    want, got = stock(**base("a14b"), generator=gen()).frames, pipe(**base("a14b"), generator=gen()).frames
    assert np.abs(want - got).max() <= 1e-5
    WanPipeline(**tiny_wan22_components("ti2v")).save_pretrained(tmp_path / "ti2v")
    assert DiasRPipeline.from_wan(tmp_path / "ti2v").config.expand_timesteps is True


def test_bad_expert_setups_are_refused():
    comps = tiny_wan22_components("a14b")
    with pytest.raises(ValueError, match="needs `boundary_ratio`"):
        DiasRPipeline(**{**comps, "boundary_ratio": None})
    with pytest.raises(ValueError, match="`transformer_2` is None"):
        DiasRPipeline(**{**comps, "transformer_2": None})
    with pytest.raises(ValueError, match="`boundary_ratio` must be"):
        DiasRPipeline(**{**comps, "boundary_ratio": 1.5})
    with pytest.raises(ValueError, match="differ in num_layers"):
        DiasRPipeline(**{**comps, "transformer_2": tiny_wan_components(num_layers=1)["transformer"]})
    with pytest.raises(ValueError, match="`guidance_scale_2`"):
        DiasRPipeline(**tiny_wan_components())(**base("a14b"), guidance_scale_2=3.0)


# --------------------------------------------------------------------------------------------------------------------
# Training


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic(out, num_clips=3, seed=0, subjects=(2, 2), num_frames=5, height=32, width=32)
    return out


def _config(data_dir, kind, stage):
    return TrainConfig.from_dict({
        "stage": stage, "allow_scratch": True, "train_data": str(data_dir),
        "tiny_model": {"wan22": kind, "num_layers": 2, "attention_head_dim": 8, "ffn_dim": 16},
        "height": 32, "width": 32, "num_frames": 5, "batch_size": 1, "max_steps": 1, "learning_rate": 1e-2,
        "router": {"routed_layers": "all", "router_dim": 16, "num_identity_queries": 2, "num_heads": 2},
        "lora_rank": 2, "lora_alpha": 2, "checkpointing_steps": 1, "eval_fraction": 0.34, "eval_sigmas": [0.95, 0.3],
    })  # fmt: skip


@pytest.mark.parametrize("kind", ["a14b", "ti2v"])
@pytest.mark.parametrize("stage", ["align", "route", "dense"])
def test_one_training_step_of_each_stage(data_dir, tmp_path, kind, stage):
    trainer = DiasRTrainer(_config(data_dir, kind, stage), tmp_path / "out")
    trainer.setup()
    before = {id(e): {k: v.clone() for k, v in e.named_parameters() if v.requires_grad} for e in trainer.experts}
    router_before = {k: v.clone() for k, v in trainer.router.state_dict().items()}
    calls = [count_calls(e) for e in trainer.experts]
    result = trainer.train()
    for _, handle in calls:
        handle.remove()
    assert np.isfinite(result["diffusion_loss"])
    # Evaluation at sigma 0.95 and 0.3: A14B sends them to the high- and the low-noise expert.
    if kind == "a14b":
        assert all(len(seen) >= 1 for seen, _ in calls)
    else:
        # Per-token timesteps: 2 latent video frames then 2 reference frames, one token each (32 px / 16 / 2).
        assert all(t.shape == (1, 4) and (t[:, :2] > 0).all() and (t[:, 2:] == 0).all() for t in calls[0][0])
    # The trained parts moved: the expert that ran has new LoRA weights; the router unless the stage is dense.
    moved = [
        any(not torch.equal(v, dict(e.named_parameters())[k]) for k, v in before[id(e)].items())
        for e in trainer.experts
    ]
    assert any(moved)
    router_moved = any(not torch.equal(v, trainer.router.state_dict()[k]) for k, v in router_before.items())
    assert router_moved == (stage != "dense")
    out = tmp_path / "out"
    assert (out / "pytorch_lora_weights_2.safetensors").is_file() == (kind == "a14b")
    assert (out / "checkpoint-1" / "pytorch_lora_weights_2.safetensors").is_file() == (kind == "a14b")
    if kind == "a14b" and stage == "dense":  # `diasr generate --lora <out>` loads each expert's own LoRA
        from peft.utils import get_peft_model_state_dict

        from diasr_diffusers.commands.generate import load_lora

        pipe = DiasRPipeline(**tiny_wan22_components("a14b", num_layers=2, attention_head_dim=8, ffn_dim=16))
        load_lora(pipe, str(out))
        for loaded, trained in zip(pipe.experts, trainer.experts):
            want = get_peft_model_state_dict(trained)
            got = get_peft_model_state_dict(loaded, adapter_name=next(iter(loaded.peft_config)))
            assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_tiny_wan22_config_errors(data_dir):
    cfg = _config(data_dir, "a14b", "route").to_dict()
    with pytest.raises(ConfigError, match="`tiny_model.wan22` must be one of"):
        TrainConfig.from_dict({**cfg, "tiny_model": {"wan22": "a5b"}})
    with pytest.raises(ConfigError, match="fixes"):
        TrainConfig.from_dict({**cfg, "tiny_model": {"wan22": "ti2v", "patch_size": [1, 1, 1]}})


class TestWan22Pipeline(SubjectPipelineTesterMixin):
    """The shared pipeline checks (tests/pipeline_tester.py) on Wan2.2 A14B: two experts (4 steps, two each), one
    router for both, `guidance_scale_2` for the low-noise one."""

    pipeline_class = DiasRPipeline
    stock_class = WanPipeline
    prompt = PROMPT
    phrases = PHRASES
    inputs = {**{k: v for k, v in base("a14b").items() if k != "prompt"}, "guidance_scale_2": 3.0}
    default_exceptions = {
        name: "None: the reference style's default (the stock value for reference_style='diasr')"
        for name in ("num_frames", "num_inference_steps", "guidance_scale")
    }
    fast_steps = None  # every check runs both experts

    def get_components(self):
        return tiny_wan22_components("a14b")

    def test_routing_reaches_both_experts(self, router_pipe):
        for expert in router_pipe.experts:  # processors on both experts, one state
            procs = expert.attn_processors.values()
            assert all(isinstance(p, SubjectSparseAttnProcessor) and p.state is router_pipe.routing_state for p in procs)
