"""The toy model's VAEs: latent statistics calibration, and the shipped sprite VAE that keeps appearance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diasr_diffusers.data import MuSADataset, make_synthetic
from diasr_diffusers.routing import token_grid_factors
from diasr_diffusers.utils.latents import calibrate_latent_statistics, encode_latents
from diasr_diffusers.utils.tiny import tiny_wan_components


@pytest.fixture(scope="module")
def sprite_clips(tmp_path_factory):
    out = tmp_path_factory.mktemp("sprites")
    # A seed neither the shipped VAE (seed 1000) nor the documented routing run (seed 1) uses.
    make_synthetic(out, num_clips=6, seed=77, subjects=(2, 2), num_frames=9, height=64, width=64)
    return out


def test_calibration_makes_latents_unit_variance():
    vae = tiny_wan_components()["vae"]
    x = torch.rand(2, 3, 5, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    before = encode_latents(vae, x)
    assert before.flatten(2).std(-1).mean() < 0.2  # Wan's statistics do not fit random toy weights
    mean, std = calibrate_latent_statistics(vae, [x[:1], x[1:]])
    assert len(mean) == len(std) == 16 and vae.config.latents_std == std
    z = encode_latents(vae, x).transpose(0, 1).flatten(1)
    torch.testing.assert_close(z.mean(1), torch.zeros(16), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(1), torch.ones(16), atol=1e-3, rtol=0)


def test_calibration_rejects_bad_pixels():
    vae = tiny_wan_components()["vae"]
    with pytest.raises(ValueError, match="`pixels` must be"):
        calibrate_latent_statistics(vae, torch.zeros(3, 5, 32, 32))
    with pytest.raises(ValueError, match="`pixels` must be"):
        calibrate_latent_statistics(vae, [])


def test_tiny_components_reject_an_unknown_vae(tmp_path):
    with pytest.raises(ValueError, match="`vae` must be None, 'sprites' or a saved AutoencoderKLWan folder"):
        tiny_wan_components(vae=tmp_path / "missing")


def _appearance_accuracy(vae, data_dir) -> tuple[float, float]:
    """(reconstruction MSE, nearest-reference accuracy): each video token well inside one sprite goes to the
    subject whose reference's sprite latents have the nearest mean, on clean latents."""
    grid = token_grid_factors(vae=vae)
    ds = MuSADataset(
        data_dir / "manifest.jsonl", num_frames=9, height=64, width=64, patch_size=(1, 1, 1), clip_sampling="start",
        crop="center", temporal_compression=grid["temporal_compression"], spatial_compression=grid["spatial_compression"],
    )  # fmt: skip
    hits = total = 0
    errors = []
    for i in range(len(ds)):
        item = ds[i]
        video = item["video"][None]
        with torch.no_grad():
            errors.append(float(F.mse_loss(vae.decode(vae.encode(video).latent_dist.mode()).sample, video)))
        z = encode_latents(vae, video)[0].flatten(1).T  # (L, C)
        refs = torch.stack(list(item["ref_images"]))[:, :, None]  # (N, 3, 1, H, W)
        zr = encode_latents(vae, refs)[:, :, 0]  # (N, C, h, w)
        cs = grid["spatial_compression"]
        sprite = F.avg_pool2d((refs[:, :, 0] < 0.9).any(1, keepdim=True).float(), cs)[:, 0] > 0.9  # (N, h, w)
        centroids = torch.stack([zr[n][:, sprite[n]].mean(1) for n in range(len(zr))])
        coverage = item["token_masks"].flatten(1)  # (N, L)
        inside = coverage.max(0).values > 0.9
        pred = torch.cdist(z[inside], centroids).argmin(-1)
        hits += int((pred == coverage[:, inside].argmax(0)).sum())
        total += int(inside.sum())
    return sum(errors) / len(errors), hits / total


def test_shipped_sprite_vae_reconstructs_and_keeps_appearance(sprite_clips):
    vae = tiny_wan_components(vae="sprites")["vae"]
    assert token_grid_factors(vae=vae) == {"temporal_compression": 2, "spatial_compression": 4, "patch_size": (1, 2, 2)}
    mse, acc = _appearance_accuracy(vae, sprite_clips)
    random_mse, random_acc = _appearance_accuracy(tiny_wan_components()["vae"], sprite_clips)
    assert mse < 0.05 and mse < random_mse / 4, (mse, random_mse)
    # Measured: 0.71 (shipped) vs 0.35 (random) on these clips.
    assert acc > 0.6 and acc > random_acc + 0.25, (acc, random_acc)


@pytest.mark.parametrize("vae", [None, "sprites"])
def test_trainer_calibrates_only_the_random_toy_vae(sprite_clips, tmp_path, vae):
    from diasr_diffusers.training import DiasRTrainer, TrainConfig

    tiny = {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "patch_size": [1, 1, 1], "ffn_dim": 16}
    cfg = TrainConfig.from_dict(
        {"stage": "route", "allow_scratch": True, "train_data": str(sprite_clips), "tiny_model": {**tiny, "vae": vae},
         "height": 64, "width": 64, "num_frames": 9, "eval_fraction": 0.0}
    )  # fmt: skip
    trainer = DiasRTrainer(cfg, tmp_path / "run")
    shipped = tiny_wan_components(vae="sprites")["vae"].config.latents_std
    trainer.setup()
    z = encode_latents(trainer.pipe.vae, trainer.train_set[0]["video"][None])
    if vae is None:  # measured on the training clips: latents now vary like the noise they are mixed with
        assert 0.5 < float(z.flatten(2).std(-1).mean()) < 1.5
    else:  # a trained VAE keeps the statistics it was saved with
        assert trainer.pipe.vae.config.latents_std == shipped
        assert 0.5 < float(z.flatten(2).std(-1).mean()) < 1.5
