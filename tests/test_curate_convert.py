"""LAION checkpoints -> the safetensors folders the curation stages load: `diasr convert-laion`.

The watermark fixture (`tests/fixtures/laion_watermark/`, written by its `make_fixture.py` with timm) is a tiny
timm `efficientnet_b3a` + LAION head saved as LAION saved `watermark_model_v1.pt`, with timm's own outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diasr_diffusers.cli import main
from diasr_diffusers.data.curate.convert import (
    LAION_WATERMARK_HEAD,
    convert_laion_aesthetic,
    convert_laion_watermark,
    laion_watermark_config,
)
from diasr_diffusers.data.curate.hub import LaionWatermark, laion_aesthetic_mlp

FIXTURES = Path(__file__).parent / "fixtures" / "laion_watermark"
TINY = {"width_coefficient": 0.3, "depth_coefficient": 0.3}  # the fixture's timm multipliers


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    return convert_laion_watermark(FIXTURES / "watermark_model_tiny.pt", tmp_path_factory.mktemp("wm") / "laion", **TINY)


@pytest.fixture(scope="module")
def stage(converted) -> LaionWatermark:
    stage = LaionWatermark(model=str(converted))
    stage._load()  # once for the module
    return stage


def test_converted_watermark_model_reproduces_timm(converted, stage):
    reference = load_file(FIXTURES / "reference.safetensors")
    body, head, _ = stage._load()
    with torch.no_grad():
        features = body(pixel_values=reference["pixel_values"]).last_hidden_state.mean(dim=(2, 3))
        logits = stage.logits(reference["pixel_values"])
    # timm's outputs for the same weights and pixels; the two inputs give clearly different features, so a
    # misplaced weight or a pixel of padding shift would show.
    assert (reference["features"][0] - reference["features"][1]).abs().max() > 0.1
    torch.testing.assert_close(features, reference["features"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits, reference["logits"], atol=1e-5, rtol=1e-4)
    assert sorted(p.name for p in converted.iterdir()) == sorted(
        ["config.json", "model.safetensors", LAION_WATERMARK_HEAD, "preprocessor_config.json"])  # fmt: skip
    assert json.loads((converted / "config.json").read_text())["id2label"] == {"0": "watermark", "1": "clear"}


def test_laion_watermark_preprocessing_is_laions(stage):
    """LAION's transform: Resize((256, 256)) on a PIL image (bilinear), ToTensor, ImageNet mean/std."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (90, 160, 3), dtype=np.uint8), rng.integers(0, 255, (300, 200, 3), dtype=np.uint8)]
    expected = []
    for image in images:
        x = np.asarray(Image.fromarray(image).resize((256, 256), Image.BILINEAR), dtype=np.float32) / 255.0
        expected.append((x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]))
    pixels = torch.from_numpy(np.stack(expected)).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        want = stage.logits(pixels).softmax(-1)[:, 0]
    got = stage.score(images)
    assert np.allclose(got, want.numpy(), atol=1e-4) and got[0] != got[1]


def test_converter_matches_the_real_checkpoint_layout():
    """Every key and shape of the full-size `watermark_model_v1.pt` (B3 + 1536-625-256-2 head) maps onto the
    transformers B3 config, checked on the meta device (no 43 MB of weights)."""
    from transformers import EfficientNetModel

    from diasr_diffusers.data.curate.convert import _HEAD_KEYS, _timm_to_transformers

    keys = json.loads((FIXTURES / "efficientnet_b3a_laion_keys.json").read_text())
    config = laion_watermark_config()
    with torch.device("meta"):
        expected = EfficientNetModel(config).state_dict()
    repeats = [int(np.ceil(1.4 * n)) for n in config.num_block_repeats]
    offsets = [sum(repeats[:i]) for i in range(len(repeats))]
    mapped = {}
    for key, shape in keys.items():
        if key in _HEAD_KEYS:
            continue
        target = _timm_to_transformers(key, offsets, [r != 1 for r in config.expand_ratios])
        assert target in expected, key
        assert list(expected[target].shape) == shape, (key, target)
        mapped[target] = key
    assert set(mapped) == set(expected) and len(mapped) == len(keys) - len(_HEAD_KEYS)
    assert keys["classifier.0.weight"] == [625, 1536] and keys["classifier.5.weight"] == [2, 256]


def test_converter_refuses_bad_input_and_never_half_writes(tmp_path):
    state = torch.load(FIXTURES / "watermark_model_tiny.pt", weights_only=True)
    # Full-size coefficients on the tiny checkpoint: a shape mismatch naming the key.
    with pytest.raises(ValueError, match=r"conv_stem.weight has shape \(16, 3, 3, 3\).*\(40, 3, 3, 3\)"):
        convert_laion_watermark(FIXTURES / "watermark_model_tiny.pt", tmp_path / "a")
    assert not (tmp_path / "a").exists() and not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="stage 0 equal input and output widths"):
        convert_laion_watermark(FIXTURES / "watermark_model_tiny.pt", tmp_path / "a", width_coefficient=0.1)
    no_head = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    torch.save(no_head, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="no LAION watermark head"):
        convert_laion_watermark(tmp_path / "plain.pt", tmp_path / "b", **TINY)
    torch.save({**state, "blocks.9.0.conv_dw.weight": torch.zeros(1)}, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match=r"1 unknown keys \['blocks.9.0.conv_dw.weight'\]"):
        convert_laion_watermark(tmp_path / "extra.pt", tmp_path / "c", **TINY)
    # A pickle that is more than tensors is refused by weights_only: no code from the file runs.
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "module.pt")
    with pytest.raises(ValueError, match="weights_only"):
        convert_laion_watermark(tmp_path / "module.pt", tmp_path / "d", **TINY)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="`out`"):
        convert_laion_watermark(FIXTURES / "watermark_model_tiny.pt", tmp_path / "mine", **TINY)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["extra.pt", "mine", "module.pt", "plain.pt"]


def test_cli_converts_and_curate_picks_the_laion_stage(tmp_path, capsys):
    from diasr_diffusers.data.curate import Stages
    from diasr_diffusers.data.curate.hub import ImageClassifierWatermark, hub_stages

    args = ["convert-laion", "watermark", str(FIXTURES / "watermark_model_tiny.pt"), "--out", str(tmp_path / "wm"),
            "--width-coefficient", "0.3", "--depth-coefficient", "0.3"]  # fmt: skip
    assert main(args) == 0 and "--models watermark=" in capsys.readouterr().out
    assert main(args) == 2 and "--out" in capsys.readouterr().err  # exists now: refused, not overwritten
    stages = hub_stages(Stages(), [f"watermark={tmp_path / 'wm'}"])
    assert isinstance(stages.watermark, LaionWatermark)
    probs = stages.watermark.score([np.zeros((40, 60, 3), np.uint8), np.full((40, 60, 3), 255, np.uint8)])
    assert len(probs) == 2 and all(0 < p < 1 for p in probs) and probs[0] != probs[1]
    assert isinstance(hub_stages(Stages(), ["watermark=some/classifier"]).watermark, ImageClassifierWatermark)


def test_convert_laion_aesthetic(tmp_path):
    mlp = laion_aesthetic_mlp(16)
    torch.save(mlp.state_dict(), tmp_path / "aesthetic.pth")
    out = convert_laion_aesthetic(tmp_path / "aesthetic.pth", tmp_path / "mlp.safetensors")
    weights = load_file(out)
    assert weights.keys() == mlp.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in mlp.state_dict().items())
    torch.save({"layers.0.weight": torch.zeros(1024, 16)}, tmp_path / "partial.pth")
    with pytest.raises(RuntimeError, match="Missing key"):
        convert_laion_aesthetic(tmp_path / "partial.pth", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
