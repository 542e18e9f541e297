"""The `diasr` command line: demo and generate write valid videos; bad arguments fail before any model loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

from diasr_diffusers.cli import build_parser, main
from diasr_diffusers.commands import generate as gen
from diasr_diffusers.pipelines import DiasRPipeline
from diasr_diffusers.utils.tiny import tiny_wan_components


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny-diasr"
    DiasRPipeline(**tiny_wan_components()).save_pretrained(path)
    return path


@pytest.fixture
def refs(tmp_path) -> tuple[Path, Path]:
    a, b = tmp_path / "man.png", tmp_path / "woman.png"
    Image.fromarray(np.full((40, 24, 3), (200, 30, 30), np.uint8)).save(a)
    Image.fromarray(np.full((24, 40, 4), (30, 30, 200, 255), np.uint8)).save(b)
    return a, b


def test_demo_writes_video_maps_and_report(tmp_path):
    out = tmp_path / "demo"
    # Through the real module entry point, as a user runs it.
    proc = subprocess.run(
        [sys.executable, "-m", "diasr_diffusers.cli", "demo", "--out", str(out)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    video, maps = iio.imread(out / "demo.mp4"), iio.imread(out / "routing_maps.mp4")
    assert video.shape == maps.shape == (33, 128, 128, 3)
    report = (out / "report.md").read_text()
    assert "random weights" in report  # the demo says honestly what the model is
    # Layout control: the left half is routed to subject 0 (blue tint), the right half to subject 1 (orange).
    left, right = maps[16, :, :40].reshape(-1, 3).mean(0), maps[16, :, -40:].reshape(-1, 3).mean(0)
    assert left[2] > left[0] and right[0] > right[2]
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no temp files left behind


def test_generate_writes_video_and_routing_maps(tiny_model, refs, tmp_path):
    out, maps = tmp_path / "out" / "clip.mp4", tmp_path / "maps.mp4"
    code = main(
        [
            "generate", "--model", str(tiny_model), "--prompt", "the man and the woman dance in the park",
            "--subject", f"the man={refs[0]}", "--subject", f"the woman={refs[1]},{refs[0]}",
            "--frames", "9", "--height", "32", "--width", "32", "--steps", "2", "--seed", "3",
            "--out", str(out), "--routing-maps", str(maps), "--device", "cpu",
        ]
    )  # fmt: skip
    assert code == 0
    assert iio.imread(out).shape == (9, 32, 32, 3)
    assert iio.imread(maps).shape == (9, 32, 32, 3)


def test_generate_summary_reports_routing_share(tiny_model, refs, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    main(
        [
            "generate", "--model", str(tiny_model), "--prompt", "the man and the woman talk",
            "--subject", f"the man={refs[0]}", "--subject", f"the woman={refs[1]}",
            "--frames", "5", "--height", "32", "--width", "32", "--steps", "1", "--out", str(out),
            "--routing-maps", str(tmp_path / "m.mp4"), "--device", "cpu",
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{") :])
    share = summary["routing_share"]
    assert set(share) == {"the man", "the woman", "(null)"}
    assert sum(share.values()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--subject", "no-equals-sign"], "PHRASE=IMAGE"),
        (["--subject", "the man=/nonexistent/man.png"], "not found"),
        (["--out", "clip.gif"], "--out must be an .mp4"),
        (["--frames", "0"], "--frames must be positive"),
    ],
)
def test_generate_rejects_bad_arguments_before_loading(extra, message, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model must not be loaded for bad arguments")

    monkeypatch.setattr(gen, "load_pipeline", fail)
    args = ["generate", "--model", "unused", "--prompt", "the man", "--out", str(tmp_path / "x.mp4"), *extra]
    with pytest.raises(SystemExit, match=message):
        main(args)
    assert not (tmp_path / "x.mp4").exists()


def test_load_pipeline_rejects_non_pipeline_folder(tmp_path):
    with pytest.raises(ValueError, match="model_index.json"):
        gen.load_pipeline(str(tmp_path))


def test_parser_lists_commands():
    parser = build_parser()
    choices = parser._subparsers._group_actions[0].choices
    assert {"generate", "demo"} <= set(choices)


def test_tiny_components_load_a_saved_toy_vae(tmp_path):
    saved = tiny_wan_components(seed=3)["vae"]
    saved.save_pretrained(tmp_path / "vae")
    loaded = tiny_wan_components(vae=str(tmp_path / "vae"))["vae"]
    random_default = tiny_wan_components()["vae"]
    first = next(iter(saved.state_dict()))
    assert torch.equal(loaded.state_dict()[first], saved.state_dict()[first])
    assert not torch.equal(random_default.state_dict()[first], saved.state_dict()[first])
