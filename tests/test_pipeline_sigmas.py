"""DiasRPipeline(sigmas=...): explicit noise levels, so a call can start from a partially noised latent.

The contract: the loop steps through exactly the given sigmas (the pipeline undoes the scheduler's shift), so
``latents = (1 - s) * x0 + s * noise`` with ``sigmas[0] = s`` is a consistent starting point.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diasr_diffusers import DiasRPipeline
from diasr_diffusers.utils.tiny import tiny_wan_components

PROMPT = "the red star and the blue bottle"
BASE = dict(prompt=PROMPT, height=32, width=32, num_frames=9, guidance_scale=1.0, output_type="latent")
LATENT_SHAPE = (1, 16, 3, 4, 4)  # tiny VAE: 8x spatial, 4x temporal


@pytest.fixture(scope="module")
def pipe():
    return DiasRPipeline(**tiny_wan_components())


def _partial_start(s: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(LATENT_SHAPE, generator=gen)
    noise = torch.randn(LATENT_SHAPE, generator=gen)
    return x0, noise, (1 - s) * x0 + s * noise


class _OracleVelocity:
    """Stands in for the transformer's forward: the exact flow-matching velocity ``noise - x0`` for the video frames
    (and records the timesteps it was called at)."""

    def __init__(self, x0: torch.Tensor, noise: torch.Tensor):
        self.velocity = noise - x0
        self.timesteps: list[float] = []

    def __call__(self, hidden_states, timestep, *args, **kwargs):
        self.timesteps.append(float(timestep[0]))
        out = torch.zeros_like(hidden_states)
        out[:, :, : self.velocity.shape[2]] = self.velocity
        return (out,)


@pytest.mark.parametrize("s", [0.6, 0.95])
def test_partial_noise_start_takes_exactly_the_given_sigmas(pipe, monkeypatch, s):
    steps = 4
    sigmas = np.linspace(s, 0, steps + 1)[:-1]
    x0, noise, start = _partial_start(s)
    oracle = _OracleVelocity(x0, noise)
    monkeypatch.setattr(pipe.transformer, "forward", oracle)
    stepped = []
    step = pipe.scheduler.step

    def spy_step(model_output, timestep, sample, **kwargs):
        stepped.append(float(pipe.scheduler.sigmas[pipe.scheduler.step_index or 0]))
        return step(model_output, timestep, sample, **kwargs)

    monkeypatch.setattr(pipe.scheduler, "step", spy_step)
    out = pipe(**BASE, latents=start.clone(), sigmas=sigmas.tolist())  # num_inference_steps from len(sigmas)

    assert pipe.scheduler.config.shift == 7.0  # the tiny model's scheduler does shift: the pipeline undid it
    np.testing.assert_allclose(pipe.scheduler.sigmas.numpy(), [*sigmas, 0.0], atol=1e-6)
    np.testing.assert_allclose(stepped, sigmas, atol=1e-6)
    np.testing.assert_allclose(oracle.timesteps, sigmas * 1000, rtol=1e-5)
    assert math.isclose(oracle.timesteps[0], s * 1000, rel_tol=1e-6)
    # Euler steps along the exact velocity land on x0 only if the first sigma used is the latent's noise level.
    torch.testing.assert_close(out.frames, x0, atol=1e-5, rtol=0)


def test_shifted_sigmas_would_miss_x0(pipe, monkeypatch):
    """The check above has teeth: forwarding the same sigmas unshifted to the scheduler (Diffusers' convention)
    starts at a higher noise level than the latents have, and the exact velocity overshoots x0."""
    s, steps = 0.6, 4
    x0, noise, start = _partial_start(s)
    monkeypatch.setattr(pipe.transformer, "forward", _OracleVelocity(x0, noise))
    sigmas = np.linspace(s, 0, steps + 1)[:-1]
    shift = pipe.scheduler.config.shift
    shifted = shift * sigmas / (1 + (shift - 1) * sigmas)  # what set_timesteps(sigmas=...) alone would run
    out = pipe(**BASE, latents=start.clone(), sigmas=shifted.tolist())
    assert (out.frames - x0).abs().max() > 0.1


def test_num_inference_steps_must_agree(pipe):
    with pytest.raises(ValueError, match=r"`sigmas` has 3 entries but `num_inference_steps` is 2"):
        pipe(**BASE, num_inference_steps=2, sigmas=[0.9, 0.5, 0.2])


@pytest.mark.parametrize(
    "sigmas, error, match",
    [
        ([0.8, math.nan], ValueError, "finite"),
        ([math.inf, 0.5], ValueError, "finite"),
        ([0.5, 0.8], ValueError, "strictly decreasing"),
        ([0.5, 0.5], ValueError, "strictly decreasing"),
        ([1.2, 0.5], ValueError, r"\(0, 1\]"),
        ([0.5, 0.0], ValueError, r"\(0, 1\]"),
        ([0.5, -0.1], ValueError, r"\(0, 1\]"),
        ([], ValueError, "at least one"),
        (np.ones((2, 2)) * 0.5, ValueError, "one-dimensional"),
        ("0.5", TypeError, "list of floats"),
        (0.5, TypeError, "list of floats"),
        ([0.5, "0.2"], TypeError, r"`sigmas\[1\]` must be a number"),
        ([True], TypeError, r"`sigmas\[0\]` must be a number"),
    ],
)
def test_bad_sigmas_are_refused_before_encoding(pipe, monkeypatch, sigmas, error, match):
    def encode_prompt(*args, **kwargs):  # reaching the text encoder means the check was missed
        raise AssertionError("encoded before refusing `sigmas`")

    monkeypatch.setattr(pipe, "encode_prompt", encode_prompt)
    with pytest.raises(error, match=match):
        pipe(**BASE, sigmas=sigmas)


@pytest.mark.parametrize(
    "scheduler, match",
    [
        (FlowMatchEulerDiscreteScheduler(shift=3.0, use_karras_sigmas=True), "remaps explicit sigmas"),
        (FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), "use_dynamic_shifting"),
    ],
)
def test_scheduler_that_cannot_reproduce_sigmas_is_refused(scheduler, match):
    pipe = DiasRPipeline(**{**tiny_wan_components(), "scheduler": scheduler})
    with pytest.raises(ValueError, match=match):
        pipe(**BASE, sigmas=[0.9, 0.5, 0.2])


def test_explicit_sigmas_win_over_the_reference_style():
    """Phantom's style sets its own sigmas (from 0.999, through UniPC's flow_shift 5) and 50 steps: explicit sigmas
    replace both."""
    phantom = DiasRPipeline(**tiny_wan_components())
    phantom.set_reference_style("phantom")
    sigmas = [0.8, 0.55, 0.3, 0.1]
    phantom(**BASE, sigmas=sigmas)
    np.testing.assert_allclose(phantom.scheduler.sigmas.numpy(), [*sigmas, 0.0], atol=1e-6)
    assert len(phantom.scheduler.timesteps) == 4
    phantom.set_reference_style_timesteps(4, "cpu")  # without them, the style's schedule as before
    assert phantom.scheduler.sigmas[0] > 0.999 - 1e-6


def test_default_schedule_passed_back_gives_the_same_video(pipe):
    """Composability: the scheduler's own sigmas, given explicitly, reproduce a call without them."""
    gen = dict(generator=torch.Generator().manual_seed(0))
    ref = pipe(**BASE, num_inference_steps=3, **gen).frames
    used = pipe.scheduler.sigmas[:-1].tolist()
    again = pipe(**BASE, sigmas=used, generator=torch.Generator().manual_seed(0)).frames
    torch.testing.assert_close(again, ref, atol=1e-4, rtol=0)
