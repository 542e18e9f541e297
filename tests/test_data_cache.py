import json

import pytest
import torch
from _data_fixtures import tiny_vae
from safetensors import safe_open

from diasr_diffusers.data import (
    LatentCacheDataset,
    MuSADataset,
    cache_latents,
    collate_fn,
    encode_latents,
    make_synthetic,
)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    return make_synthetic(root / "data", num_clips=3, seed=4, subjects=(1, 3), num_frames=5, height=32, width=32)


def _dataset(manifest, **kwargs):
    return MuSADataset(manifest, num_frames=5, height=32, width=32, clip_sampling="start", crop="center", **kwargs)


def test_cache_round_trip(synth, tmp_path):
    vae = tiny_vae()
    ds = _dataset(synth)
    index_path = cache_latents(ds, vae, tmp_path / "latents", progress=False)
    index = json.loads(index_path.read_text())
    assert index["format"] == "diasr-latent-cache" and len(index["entries"]) == 3
    assert index["vae"]["normalized"] is True
    files = sorted(p.name for p in (tmp_path / "latents").iterdir())
    assert files == ["index.json"] + sorted(e["file"] for e in index["entries"])  # no temp files left behind

    cached = _dataset(synth, latent_cache=tmp_path / "latents")
    for i in range(len(ds)):
        item, hit = ds[i], cached[i]
        assert "video" not in hit and "ref_images" not in hit
        with torch.no_grad():
            raw = vae.encode(item["video"][None]).latent_dist.mode()
        mean = torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, 4, 1, 1, 1)
        std = torch.tensor([2.0, 1.0, 0.5, 1.5]).view(1, 4, 1, 1, 1)
        assert hit["latents"].shape == (4, 2, 4, 4)
        torch.testing.assert_close(hit["latents"], ((raw - mean) / std)[0])
        refs = encode_latents(vae, torch.stack(item["ref_images"]).unsqueeze(2))
        assert hit["ref_latents"].shape == (len(item["phrases"]), 4, 1, 4, 4)
        torch.testing.assert_close(hit["ref_latents"], refs)
        for key in ("masks", "token_masks", "token_labels", "frame_indices"):
            assert torch.equal(hit[key], item[key]), key
        assert hit["masks"].dtype == torch.bool
        assert hit["phrases"] == item["phrases"] and hit["caption"] == item["caption"]
    batch = collate_fn([cached[i] for i in range(len(cached))])
    n = int(batch["num_subjects"].max())
    assert batch["latents"].shape == (3, 4, 2, 4, 4) and batch["ref_latents"].shape == (3, n, 4, 1, 4, 4)
    assert len(LatentCacheDataset(tmp_path / "latents")) == 3

    # Stored with safetensors (no pickle), caption in the header.
    with safe_open(str(tmp_path / "latents" / index["entries"][0]["file"]), framework="pt") as f:
        assert f.metadata()["caption"] == ds[0]["caption"]


def test_cache_resume_and_mismatched_settings(synth, tmp_path):
    vae = tiny_vae()
    ds = _dataset(synth)
    out = tmp_path / "latents"
    cache_latents(ds, vae, out, progress=False)
    first = out / "line_0000001.safetensors"
    stamp = first.stat().st_mtime_ns
    first_other = (out / "line_0000002.safetensors")
    first_other.unlink()  # as if the run had been interrupted
    cache_latents(ds, vae, out, progress=False)
    assert first.stat().st_mtime_ns == stamp and first_other.is_file()  # kept vs redone
    with pytest.raises(ValueError, match="other settings"):
        MuSADataset(synth, num_frames=5, height=32, width=32, clip_sampling="start", crop="random", latent_cache=out)
    other = MuSADataset(synth, num_frames=5, height=32, width=32, clip_sampling="center", crop="center")
    with pytest.raises(FileExistsError, match="overwrite"):
        cache_latents(other, vae, out, progress=False)
    with pytest.raises(FileNotFoundError, match="index.json"):
        LatentCacheDataset(tmp_path / "nothing")
