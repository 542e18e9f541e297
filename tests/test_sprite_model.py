"""The shipped sprite model (issue 12): it loads offline as a Diffusers folder and is the trained one."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from diasr_diffusers import DiasRPipeline, IDRouter
from diasr_diffusers.utils.toy import SPRITE_MODEL_SIZE, load_sprite_model, sprite_model_path

MAX_BYTES = 20 * 2**20


def test_sprite_model_is_a_small_safetensors_diffusers_folder():
    folder = Path(sprite_model_path())
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "DiasRPipeline" and index["id_router"][1] == "IDRouter"
    files = [f for f in folder.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= MAX_BYTES
    weights = [f for f in files if f.suffix in (".bin", ".pt", ".pth", ".ckpt", ".safetensors")]
    assert weights and all(f.suffix == ".safetensors" for f in weights)


def test_sprite_model_loads_and_generates_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = load_sprite_model()
    assert isinstance(pipe, DiasRPipeline) and isinstance(pipe.id_router, IDRouter)
    assert pipe.transformer.config.num_layers == 4
    same = DiasRPipeline.from_pretrained(sprite_model_path())
    saved = load_file(Path(sprite_model_path()) / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in same.transformer.state_dict().items())
    out = pipe(
        prompt="A video of the solid green square moving over a soft gradient background.",
        subject_images=[torch.full((3, 64, 64), 0.5)],
        subject_phrases=["the solid green square"],
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **SPRITE_MODEL_SIZE,
    )
    assert out.frames.shape == (1, SPRITE_MODEL_SIZE["num_frames"], 64, 64, 3)
