"""MotionAmplitude (OpenS2V-Eval's Farneback score) and the flow-based flicker metrics on clips with known motion."""

import cv2
import numpy as np
import pytest
from eval_synth import static_clip, texture, translating_square

from diasr_diffusers.eval import motion_amplitude, warp_residual


def direct_opencv_motion(frames: np.ndarray, gray_code: int = cv2.COLOR_BGR2GRAY) -> float:
    """OpenS2V-Eval's computation written out with plain OpenCV calls (signed, before abs)."""
    grays = [cv2.cvtColor(frame, gray_code) for frame in frames]
    maps = []
    for prev, nxt in zip(grays[:-1], grays[1:]):
        flow = cv2.calcOpticalFlowFarneback(prev, nxt, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        h, w = flow.shape[:2]
        maps.append(cv2.resize(flow, (16, int(h * (16 / w))), interpolation=cv2.INTER_AREA))
    return float(np.mean(np.mean(np.array(maps), axis=0)))


def opposite_colour_pans() -> np.ndarray:
    """Red channel pans left while blue pans right: the grey conversion decides which one wins."""
    red, blue = texture(96, 220, seed=3)[..., 0], texture(96, 220, seed=5)[..., 2]
    frames = []
    for t in range(8):
        frame = np.zeros((96, 128, 3), np.uint8)
        frame[..., 0] = red[:, 40 + 3 * t : 168 + 3 * t]
        frame[..., 2] = blue[:, 60 - 3 * t : 188 - 3 * t]
        frames.append(frame)
    return np.stack(frames)


@pytest.mark.parametrize("velocity", [1, 2, 3, -2])
def test_translating_square_sign_and_magnitude(velocity):
    clip = translating_square(velocity)
    signed = motion_amplitude(clip, return_signed=True)
    # Flow is `velocity` on the square's pixels (x channel only), ~0 on the static background; the score averages
    # over pixels *and* both channels.
    expected = velocity * 48 * 48 / (2 * 96 * 128)
    assert np.sign(signed) == np.sign(velocity)
    assert signed == pytest.approx(expected, rel=0.15)
    assert motion_amplitude(clip) == pytest.approx(abs(signed))


def test_full_frame_pan_magnitude():
    wide = texture(96, 220, seed=7)
    for v in (1, 2):
        clip = np.stack([wide[:, 40 + v * t : 168 + v * t] for t in range(9)])  # content moves left by v px/frame
        assert motion_amplitude(clip, return_signed=True) == pytest.approx(-v / 2, rel=0.05)


def test_static_clip_is_zero():
    assert motion_amplitude(static_clip()) < 1e-3  # Farneback leaves ~1e-4 px of numerical noise


def test_matches_direct_opencv_computation():
    for clip in (translating_square(2), opposite_colour_pans()):
        assert motion_amplitude(clip, return_signed=True) == pytest.approx(direct_opencv_motion(clip), abs=1e-6)


def test_bgr2gray_quirk_is_kept():
    # With a correct RGB->grey conversion the leftward red pan dominates; with OpenS2V's BGR2GRAY on RGB frames
    # the rightward blue pan does. The score must follow OpenS2V.
    clip = opposite_colour_pans()
    ours = motion_amplitude(clip, return_signed=True)
    correct_grey = direct_opencv_motion(clip, cv2.COLOR_RGB2GRAY)
    assert ours > 0.5 and correct_grey < -0.5


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        (np.zeros((1, 32, 32, 3), np.uint8), "at least 2 frames"),
        (np.zeros((4, 32, 32, 3), np.float32), "uint8"),
        (np.zeros((4, 32, 32), np.uint8), r"\(F, H, W, 3\)"),
    ],
)
def test_bad_frames(frames, match):
    with pytest.raises(ValueError, match=match):
        motion_amplitude(frames)


def test_warp_residual_separates_smooth_motion_from_flicker():
    smooth = warp_residual(translating_square(3))
    static = warp_residual(static_clip())
    assert static["WarpResidual"] < 1e-4
    assert smooth["WarpResidual"] < 0.01  # large motion, but all of it explained by the flow

    rng = np.random.default_rng(0)
    brightness = rng.integers(-40, 40, size=(9, 1, 1, 1))
    flicker = np.clip(static_clip().astype(int) + brightness, 0, 255).astype(np.uint8)
    flickering = warp_residual(flicker)
    assert flickering["BrightnessFlicker"] > 0.03 > 0.001 > smooth["BrightnessFlicker"]
    assert flickering["WarpResidual"] > 5 * smooth["WarpResidual"]

    morphing = translating_square(3)
    for t in range(len(morphing)):  # the square's texture changes every frame: content the flow cannot explain
        x = 20 + 3 * t
        morphing[t, 24:72, x : x + 48] = texture(48, 48, seed=100 + t)
    assert warp_residual(morphing)["WarpResidual"] > 2 * smooth["WarpResidual"]
