"""Small hand-made clips with known geometry for the data tests (imported by tests/test_data_*.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from diasr_diffusers.data._io import npz_bytes, write_video

RED = (230, 30, 30)
BLUE = (30, 60, 230)
GREY = (128, 128, 128)


def square_clip(
    root: Path,
    name: str = "clip",
    *,
    frames: int = 9,
    height: int = 64,
    width: int = 96,
    red_box: tuple[int, int, int, int] = (0, 32, 48, 80),
    blue_box: tuple[int, int, int, int] = (32, 64, 16, 48),
    blue_frames: int = 5,
) -> dict:
    """A grey video with a red square (all frames) and a blue square (first ``blue_frames`` frames).

    Boxes are ``(y0, y1, x0, x1)``. Writes the mp4, an npz of masks, two reference images (the red one with a mask on
    a grey background) and returns a manifest record (paths relative to ``root``).
    """
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    video[:] = GREY
    masks = np.zeros((2, frames, height, width), dtype=bool)
    y0, y1, x0, x1 = red_box
    video[:, y0:y1, x0:x1] = RED
    masks[0, :, y0:y1, x0:x1] = True
    y0, y1, x0, x1 = blue_box
    video[:blue_frames, y0:y1, x0:x1] = BLUE
    masks[1, :blue_frames, y0:y1, x0:x1] = True
    write_video(root / f"{name}.mp4", video, fps=8, crf=0)
    (root / f"{name}_masks.npz").write_bytes(npz_bytes({"red": masks[0], "blue": masks[1]}))
    ref = np.full((40, 30, 3), GREY, dtype=np.uint8)
    ref[10:30, 5:25] = RED
    ref_mask = np.zeros((40, 30), dtype=np.uint8)
    ref_mask[10:30, 5:25] = 255
    Image.fromarray(ref).save(root / f"{name}_red.png")
    Image.fromarray(ref_mask).save(root / f"{name}_red_mask.png")
    blue_ref = np.full((24, 24, 3), 255, dtype=np.uint8)
    blue_ref[4:20, 4:20] = BLUE
    Image.fromarray(blue_ref).save(root / f"{name}_blue.png")
    return {
        "id": name,
        "video": f"{name}.mp4",
        "caption": "A red square and a blue square on grey.",
        "fps": 8,
        "subjects": [
            {
                "phrase": "a red square",
                "references": [{"image": f"{name}_red.png", "mask": f"{name}_red_mask.png"}],
                "masks": {"npz": f"{name}_masks.npz", "key": "red"},
            },
            {
                "phrase": "a blue square",
                "references": [f"{name}_blue.png"],
                "masks": {"npz": f"{name}_masks.npz", "key": "blue"},
            },
        ],
    }


def write_jsonl(path: Path, lines: list) -> Path:
    """Write records (dicts, or raw strings for deliberately broken lines) one per line."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def tiny_vae():
    """A 62k-parameter Wan VAE (8x spatial, 4x temporal compression, 4 latent channels), built in-process."""
    import torch
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[2.0, 1.0, 0.5, 1.5],
    ).eval()
