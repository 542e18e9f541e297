import time

import numpy as np
import pytest

from diasr_diffusers.data import make_synthetic, render_clip, validate_manifest
from diasr_diffusers.data._io import read_video_frames
from diasr_diffusers.data.synthetic import COLORS, _render_sprite, _sprite_colors


def test_render_is_deterministic_and_seed_dependent():
    a, b = render_clip(3, 1), render_clip(3, 1)
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.masks, b.masks)
    for ra, rb in zip(a.references, b.references):
        np.testing.assert_array_equal(ra, rb)
    assert a.caption == b.caption
    c = render_clip(4, 1)
    assert not np.array_equal(a.frames, c.frames)
    d = render_clip(3, 2)  # another clip of the same seed
    assert not np.array_equal(a.frames, d.frames)


def test_make_synthetic_is_byte_identical_for_a_seed(tmp_path):
    kwargs = dict(num_clips=3, subjects=(2, 3), num_frames=5, height=32, width=48)
    m1 = make_synthetic(tmp_path / "a", seed=7, **kwargs)
    m2 = make_synthetic(tmp_path / "b", seed=7, **kwargs)
    m3 = make_synthetic(tmp_path / "c", seed=8, **kwargs)
    assert m1.read_bytes() == m2.read_bytes()
    assert m1.read_bytes() != m3.read_bytes()
    for sub in ("masks", "refs"):
        files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a" / sub).iterdir())
        assert files
        for rel in files:
            assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    v1 = read_video_frames(tmp_path / "a" / "videos" / "clip_000000.mp4", range(5))
    v2 = read_video_frames(tmp_path / "b" / "videos" / "clip_000000.mp4", range(5))
    np.testing.assert_array_equal(v1, v2)
    # The mp4 stays close to the rendered frames (masks are computed on the rendered ones).
    rendered = render_clip(7, 0, subjects=(2, 3), num_frames=5, height=32, width=48).frames
    assert np.abs(v1.astype(int) - rendered.astype(int)).mean() < 3.0
    assert validate_manifest(m1).ok
    with pytest.raises(FileExistsError, match="overwrite"):
        make_synthetic(tmp_path / "a", seed=7, **kwargs)


@pytest.mark.parametrize("index", range(6))
def test_masks_are_exact_and_occlusion_aware(index):
    clip = render_clip(11, index, num_subjects=4, num_frames=9, height=64, width=64)
    n, f, h, w = clip.masks.shape
    assert (n, f, h, w) == (4, 9, 64, 64)
    assert clip.masks.sum(axis=0).max() <= 1  # a pixel belongs to at most one sprite
    for i, spec in enumerate(clip.sprites):
        main, dark = _sprite_colors(spec)
        for t in range(f):
            # Full silhouette at this pose, ignoring the others.
            box, inside, rgb = _render_sprite(spec, h, w, *clip.centers[i, t], clip.radii[i], clip.angles[i, t])
            full = np.zeros((h, w), dtype=bool)
            full[box] = inside
            front = [j for j in range(n) if clip.depth[j] > clip.depth[i]]
            covered = np.zeros((h, w), dtype=bool)
            for j in front:
                bj, ij, _ = _render_sprite(clip.sprites[j], h, w, *clip.centers[j, t], clip.radii[j], clip.angles[j, t])
                covered[bj] |= ij
            # Visible = own silhouette minus every sprite in front of it.
            np.testing.assert_array_equal(clip.masks[i, t], full & ~covered)
            pixels = clip.frames[t][clip.masks[i, t]]
            is_main = (pixels == main).all(axis=1)
            is_dark = (pixels == dark).all(axis=1)
            assert (is_main | is_dark).all(), (i, t)
            sprite_rgb = np.zeros((h, w, 3), dtype=np.uint8)
            sprite_rgb[box] = rgb
            np.testing.assert_array_equal(pixels, sprite_rgb[clip.masks[i, t]])


def test_references_use_another_pose_and_scale_and_captions_name_sprites():
    shared_color = shared_shape = 0
    for index in range(30):
        clip = render_clip(0, index, num_frames=9, height=64, width=64)
        assert 1 <= len(clip.sprites) <= 4
        assert len(set(clip.phrases)) == len(clip.phrases)
        for i, phrase in enumerate(clip.phrases):
            assert phrase in clip.caption.lower()
            gap = np.abs((clip.angles[i] - clip.reference_angles[i] + 180) % 360 - 180)
            assert gap.min() >= 30.0
            assert clip.reference_radius > 1.5 * clip.radii[i] * clip.references[i].shape[0] / 64
            ref, ref_mask = clip.references[i], clip.reference_masks[i]
            assert (ref[~ref_mask] == 255).all()  # on white
            assert ref_mask.mean() > 0.2
            assert clip.masks[i].any(axis=(1, 2)).mean() >= 0.75  # visible in most frames
        colors = [s.color for s in clip.sprites]
        shapes = [s.shape for s in clip.sprites]
        shared_color += len(set(colors)) < len(colors)
        shared_shape += len(set(shapes)) < len(shapes)
        assert set(colors) <= set(COLORS)
    # Color alone is not a shortcut: some clips have two sprites of one color (and some two of one shape).
    assert shared_color >= 5 and shared_shape >= 2


def test_render_is_fast_and_rejects_bad_arguments():
    render_clip(0, 0, num_frames=17, height=64, width=64)  # warm-up
    start = time.perf_counter()
    render_clip(0, 1, num_subjects=4, num_frames=17, height=64, width=64)
    assert time.perf_counter() - start < 0.5
    with pytest.raises(ValueError, match="`subjects`"):
        render_clip(0, 0, subjects=(0, 5))
    with pytest.raises(ValueError, match="`height` and `width`"):
        render_clip(0, 0, height=8)
    with pytest.raises(ValueError, match="`num_clips`"):
        make_synthetic("/nonexistent/never-written", num_clips=0)
