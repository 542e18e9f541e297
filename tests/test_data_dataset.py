import numpy as np
import pytest
import torch
from _data_fixtures import BLUE, GREY, RED, square_clip, write_jsonl

from diasr_diffusers.data import MuSADataset, RefAugment, collate_fn, make_synthetic, prepare_reference
from diasr_diffusers.routing.masks import masks_to_token_grid, routing_labels_from_coverage


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    root = tmp_path_factory.mktemp("squares")
    # Source 64x96 -> 32x32: cover scale 1/2, centre crop = source columns 16..80.
    record = square_clip(root, red_box=(0, 32, 48, 80), blue_box=(32, 64, 16, 48), blue_frames=5)
    return write_jsonl(root / "manifest.jsonl", [record])


def test_item_shapes_mask_alignment_and_token_labels(squares):
    ds = MuSADataset(squares, num_frames=9, height=32, width=32, clip_sampling="start", crop="center")
    assert len(ds) == 1 and ds.num_skipped == 0
    item = ds[0]
    assert item["video"].shape == (3, 9, 32, 32) and item["video"].dtype == torch.float32
    assert item["video"].min() >= -1 and item["video"].max() <= 1
    assert item["masks"].shape == (2, 9, 32, 32) and item["masks"].dtype == torch.bool
    assert item["phrases"] == ["a red square", "a blue square"]
    assert [r.shape for r in item["ref_images"]] == [(3, 32, 32), (3, 32, 32)]
    assert item["frame_indices"].tolist() == list(range(9))

    expected = torch.zeros(2, 9, 32, 32, dtype=torch.bool)
    expected[0, :, 0:16, 16:32] = True  # red: source rows 0..32, cols 48..80 -> (48-16)/2 .. (80-16)/2
    expected[1, :5, 16:32, 0:16] = True  # blue: source cols 16..48 -> 0..16, first 5 frames
    assert torch.equal(item["masks"], expected)
    # The video moved the same way: red where the red mask is, blue where the blue one is, grey elsewhere.
    rgb = ((item["video"] + 1) * 127.5).permute(1, 2, 3, 0)  # (F, H, W, 3)
    for mask, color in ((expected[0], RED), (expected[1], BLUE), (~expected.any(0), GREY)):
        diff = (rgb[mask] - torch.tensor(color, dtype=torch.float32)).abs().mean()
        assert diff < 4.0, (color, diff)

    # Token grid: 16x16-pixel tokens (VAE 8 x patch 2); latent frames {0}, {1-4}, {5-8}.
    assert item["token_masks"].shape == (2, 3, 2, 2)
    labels = item["token_labels"].view(3, 2, 2)
    want = torch.full((3, 2, 2), -1, dtype=torch.long)
    want[:, 0, 1] = 0
    want[:2, 1, 0] = 1
    assert torch.equal(labels, want)
    direct = routing_labels_from_coverage(masks_to_token_grid(expected[None], temporal_compression=4,
                                                              spatial_compression=8, patch_size=(1, 2, 2)))
    assert torch.equal(item["token_labels"], direct[0])


def test_masks_follow_the_video_under_random_crop_and_stride(squares):
    ds = MuSADataset(squares, num_frames=5, height=32, width=32, frame_stride=2, crop="random", seed=3)
    assert ds.records[0].num_video_frames == 9
    crops = set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        item = ds[0]
        assert item["frame_indices"].tolist() == [0, 2, 4, 6, 8]
        rgb = ((item["video"] + 1) * 127.5).permute(1, 2, 3, 0)
        red = (rgb - torch.tensor(RED, dtype=torch.float32)).abs().amax(-1) < 30
        # Same geometry: red pixels and the red mask agree except on the mask's one-pixel border (resampling).
        mask = item["masks"][0].float().unsqueeze(1)
        dilated = torch.nn.functional.max_pool2d(mask, 3, 1, 1).squeeze(1).bool()
        eroded = ~torch.nn.functional.max_pool2d(1 - mask, 3, 1, 1).squeeze(1).bool()
        assert not (red & ~dilated).any() and not (eroded & ~red).any()
        assert eroded.sum() > 0.5 * item["masks"][0].sum()
        assert item["masks"][0].any()
        crops.add(tuple(item["masks"][0, 0].nonzero()[0].tolist()))
        assert not item["masks"][1, 3:].any()  # blue gone from frame 5 on (frames 6, 8)
    assert len(crops) > 1  # the random crop moved between epochs


def test_determinism_under_seed_and_epoch(tmp_path):
    manifest = make_synthetic(tmp_path / "s", num_clips=2, seed=1, subjects=(2, 2), num_frames=9, height=48, width=64)
    kwargs = dict(num_frames=5, height=32, width=32, ref_augment=RefAugment())
    a, b, c = MuSADataset(manifest, seed=5, **kwargs), MuSADataset(manifest, seed=5, **kwargs), \
        MuSADataset(manifest, seed=6, **kwargs)
    ia, ib, ic = a[1], b[1], c[1]
    for key in ("video", "masks", "token_labels", "frame_indices"):
        assert torch.equal(ia[key], ib[key]), key
    assert all(torch.equal(x, y) for x, y in zip(ia["ref_images"], ib["ref_images"]))
    assert not all(torch.equal(x, y) for x, y in zip(ia["ref_images"], ic["ref_images"]))
    a.set_epoch(1)
    assert not all(torch.equal(x, y) for x, y in zip(a[1]["ref_images"], ib["ref_images"]))
    a.set_epoch(0)
    assert torch.equal(a[1]["video"], ib["video"])


def test_reference_background_removal_and_augmentation():
    image = np.full((40, 30, 3), GREY, dtype=np.uint8)
    image[10:30, 5:25] = RED
    mask = np.zeros((40, 30), dtype=bool)
    mask[10:30, 5:25] = True
    plain = prepare_reference(image, None, (32, 32))
    assert plain.shape == (3, 32, 32)
    assert torch.allclose(plain[:, 16, 4], torch.tensor(GREY) / 127.5 - 1, atol=0.02)  # grey background kept
    assert torch.allclose(plain[:, 16, 0], torch.ones(3))  # padded white (40x30 fitted into 32x32)
    cut = prepare_reference(image, mask, (32, 32))
    # Cropped to the subject (a square) and fitted: red fills the canvas, no grey left.
    red = torch.tensor(RED, dtype=torch.float32) / 127.5 - 1
    assert torch.allclose(cut[:, 16, 16], red, atol=0.02)
    assert not torch.isclose(cut, (torch.tensor(GREY) / 127.5 - 1).view(3, 1, 1), atol=0.02).all(0).any()
    aug = RefAugment(scale=(0.5, 0.6), flip_p=1.0)
    out = prepare_reference(image, mask, (32, 32), np.random.default_rng(0), aug)
    assert torch.allclose(out[:, 0, 0], torch.ones(3)) and torch.allclose(out[:, 31, 31], torch.ones(3))
    center = out[:, 16, 16]
    assert center[0] > center[1] + 0.5 and center[0] > center[2] + 0.5  # still red: no hue jitter
    again = prepare_reference(image, mask, (32, 32), np.random.default_rng(0), aug)
    assert torch.equal(out, again)
    # Flip: an asymmetric image is mirrored.
    asym = np.full((20, 20, 3), 255, dtype=np.uint8)
    asym[:, :5] = BLUE
    flipped = prepare_reference(asym, None, (20, 20), np.random.default_rng(0),
                                RefAugment(crop_scale=(1, 1), scale=(1, 1), flip_p=1.0, brightness=0, contrast=0,
                                           saturation=0))
    assert flipped[2, 10, -1] > 0.5 and flipped[0, 10, -1] < -0.5 and torch.allclose(flipped[:, 10, 0], torch.ones(3))


def test_collate_pads_variable_subject_counts(tmp_path):
    manifest = make_synthetic(tmp_path / "s", num_clips=6, seed=2, subjects=(1, 4), num_frames=5, height=32, width=32)
    ds = MuSADataset(manifest, num_frames=5, height=32, width=32, patch_size=(1, 1, 1))
    items = [ds[i] for i in range(len(ds))]
    counts = [len(it["phrases"]) for it in items]
    assert len(set(counts)) > 1
    batch = collate_fn(items)
    n = max(counts)
    assert batch["video"].shape == (6, 3, 5, 32, 32)
    assert batch["ref_images"].shape == (6, n, 3, 32, 32)
    assert batch["masks"].shape == (6, n, 5, 32, 32)
    assert batch["token_masks"].shape == (6, n, 2, 4, 4)
    assert batch["token_labels"].shape == (6, 2 * 4 * 4)
    assert batch["subject_valid"].tolist() == [[j < c for j in range(n)] for c in counts]
    for b, (item, c) in enumerate(zip(items, counts)):
        assert torch.equal(batch["masks"][b, :c], item["masks"]) and not batch["masks"][b, c:].any()
        assert torch.equal(batch["ref_images"][b, :c], torch.stack(item["ref_images"]))
        assert batch["phrases"][b][:c] == item["phrases"] and batch["phrases"][b][c:] == [""] * (n - c)
        assert int(batch["token_labels"][b].max()) < c
    assert batch["num_subjects"].tolist() == counts


def test_bad_arguments_and_short_records(squares):
    with pytest.raises(ValueError, match="`num_frames` must be 1 \\+ 4"):
        MuSADataset(squares, num_frames=8, height=32, width=32)
    with pytest.raises(ValueError, match="`height` and `width`"):
        MuSADataset(squares, num_frames=9, height=30, width=32)
    with pytest.raises(ValueError, match="no usable records"):
        MuSADataset(squares, num_frames=13, height=32, width=32)  # video has 9 frames
    with pytest.raises(ValueError, match="9 frames < 13 needed"):
        MuSADataset(squares, num_frames=13, height=32, width=32, skip_invalid=False)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"height": 64.0}, TypeError, "`height` must be an integer"),  # was a TypeError deep in torch on first item
        ({"num_frames": True}, TypeError, "`num_frames`"),  # was taken as 1 frame
        ({"temporal_compression": 0}, ValueError, "`temporal_compression`"),  # was ZeroDivisionError
        ({"spatial_compression": 0}, ValueError, "`spatial_compression`"),
        ({"patch_size": (0, 2, 2)}, ValueError, "`patch_size`"),
        ({"patch_size": (1, 2)}, ValueError, "`patch_size`"),  # was "not enough values to unpack"
        ({"seed": -1}, ValueError, "`seed`"),  # was a numpy error on the first item
        ({"ref_size": (16.5, 16)}, ValueError, "`ref_size`"),
        ({"frame_stride": 10**30}, ValueError, "`frame_stride`"),  # was an OverflowError on the first item
    ],
)
def test_dataset_argument_types_are_checked_before_loading(tmp_path, kwargs, error, message):
    base = {"num_frames": 1, "height": 64, "width": 64, **kwargs}
    with pytest.raises(error, match=message):
        MuSADataset(tmp_path / "not-read.jsonl", **base)
