"""Training HunyuanVideo-1.5 (``model_family: hunyuan_video15``) on a tiny in-process model: the training hooks build
exactly the conditional transformer call of ``DiasRHunyuanVideo15Pipeline``, the objective is the one its scheduler
integrates, one step of each stage trains, and the outputs reload."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diasr_diffusers import DiasRHunyuanVideo15Pipeline, IDRouter
from diasr_diffusers.training.families import FAMILIES
from diasr_diffusers.utils.tiny import configure_tiny_hunyuan_video15, tiny_hunyuan_video15_components

PROMPT = "the red star and the blue bottle dance in the park"
PHRASES = ["the red star", "the blue bottle"]
SIZE, FRAMES, TOKENS = 32, 5, 24  # toy VAE 4x / 2x: 3 latent frames of 8 x 8 tokens


def tiny_pipe() -> DiasRHunyuanVideo15Pipeline:
    pipe = configure_tiny_hunyuan_video15(DiasRHunyuanVideo15Pipeline(**tiny_hunyuan_video15_components()))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipe()


def test_training_forward_is_the_pipelines_conditional_call(pipe):
    images = [Image.new("RGB", (SIZE, SIZE), (220, 40, 40)), Image.new("RGB", (SIZE, SIZE), (40, 90, 230))]
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 4, 3, 8, 8, generator=g), torch.randn(1, 4, 3, 8, 8, generator=g)
    sigma = torch.tensor(0.6)
    noisy, t, target = FAMILIES["hunyuan_video15"].noisy_input(pipe, x0, noise, sigma)

    seen, state = [], pipe.routing_state

    def capture(module, args, kwargs):
        seen.append((dict(kwargs), state.text_segments))

    def oracle(module, args, kwargs, output):  # predicts the training target on the video frames
        out = output[0].clone()
        out[:, :, :3] = target
        return (out,)

    hooks = [pipe.transformer.register_forward_pre_hook(capture, with_kwargs=True),
             pipe.transformer.register_forward_hook(oracle, with_kwargs=True)]  # fmt: skip
    masks = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    masks[0, :, :16], masks[1, :, 16:] = True, True
    try:
        out = pipe(prompt=PROMPT, subject_images=images, subject_phrases=PHRASES, height=SIZE, width=SIZE,
                   num_frames=FRAMES, sigmas=[float(sigma)], latents=noisy, routing="masks", subject_masks=masks,
                   guidance_scale=1.0, max_sequence_length=TOKENS, output_type="latent")  # fmt: skip
    finally:
        for h in hooks:
            h.remove()
    # The scheduler integrates the target to x0 in one step: the objective and timestep are the pipeline's.
    torch.testing.assert_close(out.frames, x0, atol=1e-4, rtol=0)
    assert len(seen) == 1  # guidance 1: the conditional call only
    called, segments = seen[0]
    assert abs(float(called["timestep"][0]) - float(t)) < 0.05  # 1000 sigma (the scheduler's shift undone)

    # The trainer's path (DiasRTrainer._encode / _forward) on the same clip.
    pixels = pipe.video_processor.preprocess(images, height=SIZE, width=SIZE)[:, :, None]  # (N, 3, 1, H, W)
    refs = pipe.encode_video_latents(pixels)[:, :, 0].transpose(0, 1)[None]
    embeds, text = pipe.encode_training_prompt(PROMPT, TOKENS, torch.device("cpu"))
    inputs = pipe.denoiser_inputs(noisy, refs, called["timestep"][0], embeds, text)
    assert set(inputs) == {k for k in called if k not in ("attention_kwargs", "return_dict")}
    for k, v in inputs.items():
        assert torch.equal(v, called[k]), k
    routing = pipe.prepare_routing(
        images_per_subject=[1, 1], phrases=PHRASES, prompts=[PROMPT], prompt_embeds=embeds, latents=x0,
        num_frames=FRAMES, max_sequence_length=TOKENS, routing="similarity",
    )  # fmt: skip
    mapped = pipe.drop_padding_tokens(routing["text_segments"], text)
    assert [s.lengths for s in mapped] == [s.lengths for s in segments] == [[3, 3]]
    assert all(torch.equal(a.order, b.order) for a, b in zip(mapped, segments))
    assert inputs["hidden_states"][:, 8, 3:].eq(1).all() and inputs["hidden_states"][:, 4:, :3].eq(0).all()
    pred = torch.arange(2 * 4 * 5.0).view(2, 4, 5, 1, 1)
    assert torch.equal(pipe.video_prediction(pred, noisy.shape), pred[:, :, :3])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from diasr_diffusers.data import make_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic(out, num_clips=3, seed=0, subjects=(2, 2), num_frames=FRAMES, height=SIZE, width=SIZE)
    return out


def config(data_dir: Path, **overrides):
    from diasr_diffusers.training import TrainConfig

    return TrainConfig.from_dict({
        "stage": "align", "allow_scratch": True, "train_data": str(data_dir), "model_family": "hunyuan_video15",
        "tiny_model": {}, "height": SIZE, "width": SIZE, "num_frames": FRAMES, "max_steps": 1,
        "max_sequence_length": TOKENS, "learning_rate": 1e-2, "lora_rank": 2, "lora_alpha": 2,
        "router": {"router_dim": 16, "num_identity_queries": 2, "num_heads": 2}, "eval_fraction": 0.34,
        "eval_sigmas": [0.5], **overrides,
    })  # fmt: skip


@pytest.mark.parametrize("stage", ["align", "route", "dense"])
def test_training_step_of_each_stage(data_dir, tmp_path, stage):
    from diasr_diffusers.training import DiasRTrainer

    # No condition dropout: the one logged sample must have every loss of its stage (dropout: test_training_dropout.py).
    trainer = DiasRTrainer(config(data_dir, stage=stage, caption_dropout=0.0, reference_dropout=0.0), tmp_path)
    trainer.setup()
    assert isinstance(trainer.pipe, DiasRHunyuanVideo15Pipeline)
    assert trainer.pipe.prompt_template_encode_start_idx < 108  # the toy's crop (configure_tiny_hunyuan_video15)
    router_before = {k: v.clone() for k, v in trainer.router.state_dict().items()}
    result = trainer.train()
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    expected = {"align": {"diffusion", "mask", "align"}, "route": {"diffusion", "route"}, "dense": {"diffusion"}}
    assert expected[stage] <= set(record) and all(math.isfinite(record[k]) for k in expected[stage])
    assert math.isfinite(result["diffusion_loss"]) and result["num_eval_clips"] == 1
    router_moved = any(not torch.equal(v, trainer.router.state_dict()[k]) for k, v in router_before.items())
    assert router_moved == (stage != "dense")
    # Outputs reload: the router, and the LoRA into a fresh pipeline (Diffusers' HunyuanVideo LoRA loader).
    router = IDRouter.from_pretrained(tmp_path / "router")
    assert all(torch.equal(v, trainer.router.state_dict()[k]) for k, v in router.state_dict().items())
    if stage == "align":
        fresh = tiny_pipe()
        fresh.load_lora_weights(tmp_path)
        trained = dict(trainer.transformer.named_parameters())
        lora = {k.replace(".default_0.", ".default."): v for k, v in fresh.transformer.named_parameters() if "lora_B" in k}  # fmt: skip
        assert lora and all(torch.equal(v, trained[k]) for k, v in lora.items())
        assert any(v.abs().max() > 0 for v in lora.values())  # trained away from its zero init


def test_full_transformer_outputs_reload_and_serve_as_model(data_dir, tmp_path):
    from diasr_diffusers.training import DiasRTrainer

    trainer = DiasRTrainer(config(data_dir, stage="dense", train_lora=False, train_transformer=True), tmp_path)
    trainer.train()
    loaded = DiasRHunyuanVideo15Pipeline.from_pretrained(tmp_path / "pipeline")
    assert loaded.id_router is None  # the dense baseline saves no router
    sd = trainer.transformer.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in loaded.transformer.state_dict().items())
    # The saved folder is a valid `model:` of the family (checked, then loaded as the trainer does).
    cfg = config(data_dir, tiny_model=None, model=str(tmp_path / "pipeline"))
    assert isinstance(FAMILIES["hunyuan_video15"].load(cfg.model), DiasRHunyuanVideo15Pipeline)


def test_config_checks_the_family(data_dir, tmp_path):
    from diasr_diffusers.training import ConfigError

    with pytest.raises(ConfigError, match=r"`num_frames` must be 1 \+ 4k .*hunyuan_video15"):
        config(data_dir, num_frames=7)  # 1 + 2k: the toy VAE takes it, HunyuanVideo-1.5's 4x VAE does not
    with pytest.raises(ConfigError, match="multiples of 16"):
        config(data_dir, height=40)
    with pytest.raises(ConfigError, match=r"unknown `tiny_model` key\(s\) \['guidance_scale'\]"):
        config(data_dir, tiny_model={"guidance_scale": 5.0})
    wrong = tmp_path / "ltx"
    wrong.mkdir()
    (wrong / "model_index.json").write_text(json.dumps({"_class_name": "LTXPipeline"}))
    with pytest.raises(ConfigError, match="expected a HunyuanVideo15Pipeline or DiasRHunyuanVideo15Pipeline"):
        config(data_dir, tiny_model=None, model=str(wrong))
    assert np.isclose(config(data_dir, tiny_model={"num_layers": 1}).transformer_config()["num_layers"], 1)
