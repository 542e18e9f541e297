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
from diasr_diffusers.data.dataset import weights_sha256


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    return make_synthetic(root / "data", num_clips=3, seed=4, subjects=(1, 3), num_frames=5, height=32, width=32)


def _dataset(manifest, **kwargs):
    return MuSADataset(manifest, num_frames=5, height=32, width=32, clip_sampling="start", crop="center", **kwargs)


@pytest.fixture(scope="module")
def cache_dir(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("cached") / "latents"
    cache_latents(_dataset(synth), tiny_vae(), out, progress=False)
    return out


def test_cache_round_trip(synth, cache_dir):
    vae = tiny_vae()
    ds = _dataset(synth)
    index_path = cache_dir / "index.json"
    index = json.loads(index_path.read_text())
    assert index["format"] == "diasr-latent-cache" and len(index["entries"]) == 3
    assert index["vae"]["normalized"] is True
    files = sorted(p.name for p in cache_dir.iterdir())
    assert files == sorted(["index.json", *(e["file"] for e in index["entries"])])  # no temp files left behind

    cached = _dataset(synth, latent_cache=cache_dir)
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
    assert len(LatentCacheDataset(cache_dir)) == 3

    # Stored with safetensors (no pickle), caption in the header.
    with safe_open(str(cache_dir / index["entries"][0]["file"]), framework="pt") as f:
        assert f.metadata()["caption"] == ds[0]["caption"]


def test_cache_resume_and_mismatched_settings(synth, tmp_path):
    vae = tiny_vae()
    ds = _dataset(synth)
    out = tmp_path / "latents"
    cache_latents(ds, vae, out, progress=False)
    entries = json.loads((out / "index.json").read_text())["entries"]
    first = out / entries[0]["file"]
    stamp = first.stat().st_mtime_ns
    first_other = out / entries[1]["file"]
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


def _manifest_lines(path):
    return [line for line in path.read_text().splitlines() if line.strip()]


def test_cache_is_keyed_by_content_not_line(synth, cache_dir):
    # Regression: entries were keyed by manifest line, so after removing or reordering records the dataset served
    # other clips' latents without a word.
    out = cache_dir
    lines = _manifest_lines(synth)
    reordered = synth.parent / "reordered.jsonl"
    reordered.write_text("\n".join([lines[2], lines[0]]) + "\n")  # line 1 is now clip 2, line 2 is clip 0
    plain, cached = _dataset(reordered), _dataset(reordered, latent_cache=out)
    for i in range(len(plain)):
        hit = cached[i]
        assert hit["clip_id"] == plain[i]["clip_id"] and hit["caption"] == plain[i]["caption"]
        assert torch.equal(hit["token_labels"], plain[i]["token_labels"])


def test_cache_refuses_records_whose_files_changed(synth, cache_dir, tmp_path):
    import os
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synth.parent, root)  # copy2 keeps sizes and mtimes: the copy still matches the cache
    manifest = root / "manifest.jsonl"
    out = cache_dir
    _dataset(manifest, latent_cache=out)
    record = json.loads(_manifest_lines(manifest)[1])
    video = root / record["video"]
    stat = video.stat()
    os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a re-encoded clip
    with pytest.raises(ValueError, match=rf"line 2 \(id '{record['id']}'\).*re-run `diasr cache-latents`"):
        _dataset(manifest, latent_cache=out)
    edited = json.loads(_manifest_lines(manifest)[0])
    edited["caption"] = edited["caption"] + " Again."
    (root / "one.jsonl").write_text(json.dumps(edited) + "\n")
    with pytest.raises(ValueError, match="changed since caching"):
        _dataset(root / "one.jsonl", latent_cache=out)


def test_old_line_keyed_cache_is_refused(synth, tmp_path):
    out = tmp_path / "latents"
    out.mkdir()
    (out / "index.json").write_text(json.dumps({"format": "diasr-latent-cache", "version": 1, "entries": []}))
    with pytest.raises(ValueError, match="v1 index.*re-run `diasr cache-latents`"):
        LatentCacheDataset(out)
    (out / "index.json").write_text("[" * 100000)
    with pytest.raises(ValueError, match="not valid JSON"):
        LatentCacheDataset(out)


def test_hostile_cache_folders(cache_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(cache_dir, copy)
    index = json.loads((copy / "index.json").read_text())
    first = copy / index["entries"][0]["file"]
    first.write_bytes(first.read_bytes()[:100])  # truncated by a full disk / a killed copy
    with pytest.raises(ValueError, match="unreadable.*re-run `diasr cache-latents`"):
        LatentCacheDataset(copy)[0]
    # A file of another record under this record's name would silently serve the wrong clip.
    shutil.copy(copy / index["entries"][1]["file"], first)
    with pytest.raises(ValueError, match="belongs to another record"):
        LatentCacheDataset(copy)[0]
    index["entries"][0]["file"] = "../../outside.safetensors"
    (copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="not a file name inside the cache"):
        LatentCacheDataset(copy)
    (copy / "index.json").write_text("[]")
    with pytest.raises(ValueError, match="is not a diasr-latent-cache index"):
        LatentCacheDataset(copy)


def test_cache_is_keyed_by_the_vae_weights(synth, tmp_path):
    # Issue 25: a second VAE of the same config but other weights kept every old file (latents off by 0.28) though
    # the docs said the VAE was checked.
    ds = _dataset(synth)
    out = tmp_path / "latents"
    first, second = tiny_vae(), tiny_vae()
    with torch.no_grad():
        for p in second.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert dict(first.config) == dict(second.config)
    cache_latents(ds, first, out, progress=False)
    with pytest.raises(FileExistsError, match="another VAE"):
        cache_latents(ds, second, out, progress=False)
    cache_latents(ds, second, out, progress=False, overwrite=True)
    index = json.loads((out / "index.json").read_text())
    assert index["vae"]["weights_sha256"] == weights_sha256(second) != weights_sha256(first)
    # Every file was re-encoded with the second VAE, none kept from the first.
    item = ds[0]
    expected = encode_latents(second, item["video"][None])[0]
    assert torch.allclose(LatentCacheDataset(out)[0]["latents"].float(), expected, atol=1e-5)
    # Resuming into the second VAE's cache with the first is refused, not mixed file by file.
    (out / index["entries"][1]["file"]).unlink()
    with pytest.raises(FileExistsError, match="another VAE"):
        cache_latents(ds, first, out, progress=False)
