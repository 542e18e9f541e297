"""The `diasr` command line: demo and generate write valid videos; bad arguments fail before any model loads, as one
line on stderr with exit code 2; help answers without importing torch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

from diasr_diffusers.cli import build_parser, main
from diasr_diffusers.commands import generate as gen
from diasr_diffusers.pipelines import DiasRPipeline
from diasr_diffusers.routing import IDRouter
from diasr_diffusers.utils import io as io_utils
from diasr_diffusers.utils.output_paths import REGISTRY_NAME
from diasr_diffusers.utils.tiny import tiny_wan_components
from diasr_diffusers.utils.toy import SPRITE_MODEL_SIZE
from diasr_diffusers.utils.visualization import SUBJECT_COLORS, overlay_routing_maps, routing_grid, routing_legend

PROMPT = "the man and the woman dance in the park"


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


@pytest.fixture
def halves(tmp_path) -> tuple[Path, Path]:
    """Left/right layout masks, at another size than the video (they are resized)."""
    left = np.zeros((20, 20), np.uint8)
    left[:, :10] = 255
    paths = tmp_path / "left.png", tmp_path / "right.png"
    Image.fromarray(left).save(paths[0])
    Image.fromarray(255 - left).save(paths[1])
    return paths


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of ``diasr ARGV``, whether argparse or the command reports the error."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if anything tries to load weights or reach the Hub."""

    def fail(*args, **kwargs):
        raise AssertionError("the model must not be loaded for bad arguments")

    monkeypatch.setattr(gen, "load_pipeline", fail)
    monkeypatch.setattr(DiasRPipeline, "download", fail)
    monkeypatch.setattr(DiasRPipeline, "from_pretrained", fail)


# -- start-up -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["demo", "--help"]])
def test_help_does_not_import_torch_or_diffusers(argv):
    code = f"""
        import runpy, sys
        sys.argv = ["diasr", *{argv!r}]
        try:
            runpy.run_module("diasr_diffusers.cli", run_name="__main__")
        except SystemExit as e:
            assert e.code == 0, e.code
        print(sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules))
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert "usage: diasr" in proc.stdout


def test_package_imports_public_names_lazily():
    code = "import sys, diasr_diffusers; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]
    import diasr_diffusers

    assert diasr_diffusers.IDRouter is IDRouter
    assert set(diasr_diffusers.__all__) <= set(dir(diasr_diffusers))
    with pytest.raises(AttributeError, match="no_such_name"):
        diasr_diffusers.no_such_name  # noqa: B018


def test_generate_help_shows_defaults_and_api_options():
    text = build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    assert "(default: 16)" in text and "(default: 480)" in text
    for flag in (
        "--negative-prompt",
        "--guidance-scale-ref",
        "--max-sequence-length",
        "--similarity-threshold",
        "--mask",
    ):
        assert flag in text


def test_routing_choices_match_the_processors():
    from diasr_diffusers.processors import ROUTING_MODES

    assert set(gen.ROUTING_CHOICES) == {"auto", *ROUTING_MODES}


def test_parser_lists_commands():
    choices = build_parser()._subparsers._group_actions[0].choices
    assert {"generate", "demo"} <= set(choices)


# -- demo and generate, end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dense_args(tmp_path_factory) -> list[str]:
    """``--dense`` for the demo: none once the dense baseline ships (assets/sprite_dense, issue 24 part 2); until
    then a stand-in made here, the sprite model without its router (not the baseline: only the plumbing is tested)."""
    from diasr_diffusers.utils.toy import load_sprite_model, sprite_dense_model_path

    if (Path(sprite_dense_model_path()) / "model_index.json").is_file():
        return []
    path = tmp_path_factory.mktemp("dense") / "stand_in"
    DiasRPipeline(**{**load_sprite_model().components, "id_router": None}).save_pretrained(path)
    return ["--dense", str(path)]


def test_demo_writes_panels_video_strip_and_report(tmp_path, dense_args):
    out = tmp_path / "demo"
    # Through the real module entry point, as a user runs it (2 steps: the pictures and numbers are tested in
    # tests/test_demo.py; here what is written).
    proc = subprocess.run(
        [sys.executable, "-m", "diasr_diffusers.cli", "demo", "--out", str(out), "--steps", "2", *dense_args],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    video, strip = iio.imread(out / "demo.mp4"), iio.imread(out / "demo.png")
    # Three panels of 64x64 frames written 4x larger side by side, routing maps below (sides multiples of 16).
    assert video.shape[0] == SPRITE_MODEL_SIZE["num_frames"] and video.shape[2] >= 3 * 256 and video.shape[1] > 2 * 256
    assert video.shape[1] % 16 == 0 and video.shape[2] % 16 == 0
    assert strip.shape[1] > strip.shape[0] and strip.shape[2] == 3
    report = (out / "report.md").read_text()
    assert "trained from scratch" in report and "not a video model" in report  # says honestly what the model is
    for title in ("moving layout", "trained router", "dense baseline"):
        assert title in report
    scores = json.loads((out / "scores.json").read_text())
    assert list(scores["panels"]) == ["masks", "router", "dense"]
    # The trained router, not a fixed layout, routes tokens to each sprite; the dense baseline has no routing.
    assert all(scores["panels"]["router"]["routing_share"][p] > 0 for p in ("the striped red star", "the dotted blue circle"))  # fmt: skip
    assert scores["panels"]["dense"]["routing_share"] is None
    for panel in scores["panels"].values():
        for subject in panel["subjects"]:  # every verdict is one of the plain sentences, with its evidence
            assert subject["verdict"].split(":")[0] in ("found", "not found") or "blob" in subject["verdict"] or subject["verdict"].startswith("a sprite, but")  # fmt: skip
            assert set(subject["attributes"]) == {"shape", "color", "pattern"}
    assert scores["panels"]["masks"]["subjects"][0]["in_layout_box"]  # the layout panel reads its boxes
    # No temp files left behind (the one hidden file is the record of what diasr wrote there).
    assert not any(p.name.startswith(".") and p.name != REGISTRY_NAME for p in out.iterdir())


def test_demo_refuses_a_dense_folder_that_is_not_a_pipeline(tmp_path, capsys, no_model):
    code, err = run_cli(["demo", "--out", str(tmp_path / "o"), "--dense", str(tmp_path)], capsys)
    assert code == 2 and "--dense" in err and "model_index.json" in err


def test_generate_with_masks_writes_video_and_routing_maps(tiny_model, refs, halves, tmp_path, capsys):
    out, maps = tmp_path / "out" / "clip.mp4", tmp_path / "maps.mp4"
    code = main(
        [
            "generate", "--model", str(tiny_model), "--prompt", PROMPT,
            "--subject", f"the man={refs[0]}", "--subject", f"the woman={refs[1]},{refs[0]}",
            "--mask", f"the man={halves[0]}", "--mask", f"the woman={halves[1]}",
            "--frames", "9", "--height", "32", "--width", "32", "--steps", "2", "--seed", "3",
            "--negative-prompt", "blurry", "--guidance-scale-ref", "2.0", "--max-sequence-length", "64",
            "--out", str(out), "--routing-maps", str(maps), "--device", "cpu",
        ]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{") :])
    # The masks routed the left half to "the man" and the right half to "the woman".
    assert summary["routing_share"] == pytest.approx({"the man": 0.5, "the woman": 0.5, "(null)": 0.0})
    assert iio.imread(out).shape == (9, 32, 32, 3)
    video = iio.imread(maps)
    assert video.shape[0] == 9 and video.shape[1] > 32 and video.shape[2] == 32  # frames + legend strip
    assert not [p for p in tmp_path.rglob(".*") if p.name != REGISTRY_NAME]  # no temp files left behind


def test_generate_summary_reports_routing_share(tiny_model, refs, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    code = main(
        [
            "generate", "--model", str(tiny_model), "--prompt", "the man and the woman talk",
            "--subject", f"the man={refs[0]}", "--subject", f"the woman={refs[1]}", "--routing", "similarity",
            "--similarity-threshold", "0.5", "--frames", "5", "--height", "32", "--width", "32", "--steps", "1",
            "--out", str(out), "--routing-maps", str(tmp_path / "m.mp4"), "--device", "cpu",
        ]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    share = json.loads(printed[printed.index("{") :])["routing_share"]
    assert set(share) == {"the man", "the woman", "(null)"}
    assert sum(share.values()) == pytest.approx(1.0)


# -- bad arguments: one line, exit 2, nothing loaded, nothing written --------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--subject", "no-equals-sign"], "PHRASE=IMAGE"),
        (["--subject", "the man=/nonexistent/man.png"], "not an image file"),
        (["--subject", "the man={bad}"], "cannot read"),
        (["--subject", "the mango={man}"], "does not occur in the --prompt"),
        (["--subject", "the man={man}", "--subject", "The Man={man}"], "given twice"),
        (["--subject", "the man={man}", "--subject", "man and={man}"], "overlap"),
        (["--prompt", "   "], "--prompt is empty"),
        (["--out", "clip.gif"], "--out must be an .mp4"),
        (["--out", "{folder}"], "is a folder"),
        (["--out", "{man}/x.mp4"], "which is a file"),
        (["--routing-maps", "{out}"], "must differ from --out"),
        (["--frames", "0"], "argument --frames: must be >= 1"),
        (["--fps", "-5"], "argument --fps: must be >= 1"),
        (["--fps", "0"], "argument --fps: must be >= 1"),
        (["--fps", "2.5"], "argument --fps: expected an integer"),
        (["--height", "40"], "multiples of 16"),
        (["--guidance-scale", "nan"], "finite"),
        (["--seed", "-1"], "argument --seed"),
        (["--routing", "masks"], "needs a --mask"),
        (["--routing", "router"], "give at least one --subject"),
        (["--subject", "the man={man}", "--mask", "the woman={left}"], "not one of the --subject phrases"),
        (["--subject", "the man={man}", "--subject", "the woman={man}", "--mask", "the man={left}"], "missing"),
        (["--subject", "the man={man}", "--mask", "the man={black}"], "no white pixel"),
        (["--subject", "the man={man}", "--mask", "the man={bad}"], "cannot read"),
        (["--subject", "the man={man}", "--mask", "the man={left}", "--routing", "similarity"], "--routing masks"),
        (["--lora", "{folder}/missing.safetensors"], "--lora"),
        (["--model", "./nowhere"], "no such folder"),
        (["--model", "{man}"], "is a file"),
    ],
)
def test_generate_rejects_bad_arguments_before_loading(extra, message, tmp_path, refs, halves, no_model, capsys):
    black = tmp_path / "black.png"
    Image.new("L", (8, 8)).save(black)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    (tmp_path / "folder.mp4").mkdir()
    names = {"man": refs[0], "bad": tmp_path / "bad.png", "folder": tmp_path / "folder.mp4", "left": halves[0]}
    names |= {"black": black, "out": tmp_path / "x.mp4"}
    extra = [e.format(**names) for e in extra]
    argv = ["generate", "--model", "unused", "--prompt", PROMPT, "--out", str(tmp_path / "x.mp4"), *extra]
    code, err = run_cli(argv, capsys)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "x.mp4").exists()


def test_generate_rejects_a_device_this_build_lacks(tmp_path, no_model, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, err = run_cli(["generate", "--model", "m", "--prompt", "a cat", "--out", str(tmp_path / "x.mp4"), "--device", "cuda"], capsys)  # fmt: skip
    assert code == 2 and "no CUDA" in err and len(err.strip().splitlines()) == 1


def test_readme_sizes_on_the_toy_model_are_refused_before_loading(tiny_model, refs, tmp_path, monkeypatch, capsys):
    # The README's CLI example uses Wan2.1's sizes (480x832, 81 frames); the toy model's rope table is 32 tokens.
    monkeypatch.setattr(gen, "load_pipeline", mock.Mock(side_effect=AssertionError("loaded")))
    argv = ["generate", "--model", str(tiny_model), "--prompt", PROMPT, "--subject", f"the man={refs[0]}",
            "--frames", "81", "--out", str(tmp_path / "x.mp4"), "--device", "cpu"]  # fmt: skip
    code, err = run_cli(argv, capsys)
    assert code == 2 and "rope_max_seq_len" in err and gen.EXAMPLE_MODEL in err
    code, err = run_cli([*argv[:-4], "--frames", "10", "--height", "32", "--width", "32", *argv[-4:]], capsys)
    assert code == 2 and "4k+1" in err and "9 or 13" in err
    code, err = run_cli([*argv, "--height", "32", "--width", "32", "--frames", "9", "--routing", "router"], capsys)
    assert code == 2 and "has none" in err


def test_model_not_found_says_where_it_looked(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants
    from huggingface_hub.errors import RepositoryNotFoundError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    argv = ["generate", "--model", "nowhere", "--prompt", "a cat", "--out", "x.mp4", "--device", "cpu"]
    code, err = run_cli(argv, capsys)
    assert code == 2 and str(tmp_path / "nowhere") in err and "not in the cache" in err and "offline" in err
    assert "internet connection" not in err and len(err.strip().splitlines()) == 1

    def missing_repo(*args, **kwargs):
        raise RepositoryNotFoundError("404", response=mock.Mock(headers={}, status_code=404))

    monkeypatch.setattr(DiasRPipeline, "download", missing_repo)
    # Online, but no such repo: answered by the loaders' front door before any download is tried.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("diasr_diffusers.utils.checkpoint_paths.hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr("huggingface_hub.repo_exists", lambda *a, **k: False)
    code, err = run_cli(argv, capsys)
    assert code == 2 and "'nowhere': no such local path, and no Hub repo of that name" in err


def _save_router(tiny_model: Path, path: Path, **tiny_kwargs) -> Path:
    transformer = tiny_wan_components(**tiny_kwargs)["transformer"]
    IDRouter.from_transformer(transformer, router_dim=16, num_identity_queries=2, num_heads=2).save_pretrained(path)
    return path


def test_router_for_another_model_is_one_sentence(tiny_model, refs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gen, "load_pipeline", mock.Mock(side_effect=AssertionError("loaded")))
    router = _save_router(tiny_model, tmp_path / "router", attention_head_dim=16)  # the toy model has 12
    argv = ["generate", "--model", str(tiny_model), "--router", str(router), "--prompt", PROMPT,
            "--subject", f"the man={refs[0]}", "--frames", "5", "--height", "32", "--width", "32",
            "--out", str(tmp_path / "x.mp4"), "--device", "cpu"]  # fmt: skip
    code, err = run_cli(argv, capsys)
    assert code == 2 and "made for another model" in err and "hidden_dim 32 (model: 24)" in err
    assert len(err.strip().splitlines()) == 1


def test_lora_of_the_wrong_shape_is_one_sentence(tiny_model, refs, tmp_path, capsys):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    other = tiny_wan_components(attention_head_dim=16)["transformer"]  # the toy model has 12
    other.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k"]))
    DiasRPipeline.save_lora_weights(tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(other))
    argv = ["generate", "--model", str(tiny_model), "--lora", str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"),
            "--prompt", PROMPT, "--subject", f"the man={refs[0]}", "--frames", "5", "--height", "32", "--width", "32",
            "--out", str(tmp_path / "x.mp4"), "--device", "cpu"]  # fmt: skip
    code, err = run_cli(argv, capsys)
    lines = [line for line in err.splitlines() if "it/s]" not in line and line.strip()]  # not tqdm's progress bars
    assert code == 2 and "tensor shapes do not fit this model" in err and "more tensors" in err
    assert len(lines) == 1 and "size mismatch for blocks.1" not in err
    assert not (tmp_path / "x.mp4").exists()


def test_load_pipeline_rejects_non_pipeline_folder(tmp_path):
    with pytest.raises(gen.UsageError, match="model_index.json"):
        gen.load_pipeline(str(tmp_path))


def test_demo_rejects_an_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    code, err = run_cli(["demo", "--out", str(tmp_path / "f")], capsys)
    assert code == 2 and "not a folder" in err
    code, err = run_cli(["demo", "--out", str(tmp_path / "f" / "sub")], capsys)
    assert code == 2 and "which is a file" in err


# -- outputs ------------------------------------------------------------------------------------------------------


def test_write_video_refuses_bad_fps_and_empty_exports(tmp_path, monkeypatch):
    frames = np.zeros((3, 16, 16, 3), np.float32)
    with pytest.raises(ValueError, match="fps"):
        gen.write_video_atomic(frames, tmp_path / "a.mp4", fps=-5)
    monkeypatch.setattr("diffusers.utils.export_to_video", lambda frames, path, fps: Path(path).touch())
    with pytest.raises(RuntimeError, match="empty file"):
        gen.write_video_atomic(frames, tmp_path / "a.mp4", fps=8)
    assert os.listdir(tmp_path) == []


def test_temp_files_of_a_killed_writer_are_removed_at_the_next_write(tmp_path):
    # A writer SIGKILLed inside atomic_path (as during a video export) leaves its temp file behind.
    code = f"""
        import os, signal
        from diasr_diffusers.utils.io import atomic_path
        with atomic_path({str(tmp_path / "clip.mp4")!r}) as tmp:
            tmp.write_bytes(b"partial")
            os.kill(os.getpid(), signal.SIGKILL)
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".clip.mp4.diasr-tmp-") and left[0].endswith(".mp4")
    # Not ours, or ours but with a live writer: kept.
    (tmp_path / ".clip.mp4.someone-else.mp4").write_bytes(b"x")
    alive = f".clip.mp4.diasr-tmp-{io_utils._host_tag()}-{os.getppid()}-abc.mp4"
    (tmp_path / alive).write_bytes(b"x")
    io_utils.atomic_write_text(tmp_path / "report.md", "done")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".clip.mp4.someone-else.mp4", alive, "report.md"])


# -- legend -------------------------------------------------------------------------------------------------------


def _has_color(image: np.ndarray, color) -> bool:
    return bool((image.reshape(-1, 3) == np.asarray(color, np.uint8)).all(axis=1).any())


def test_legend_carries_the_subject_colours():
    strip = routing_legend(["the man", "the woman"], width=160)
    assert strip.shape[1] == 160 and strip.shape[0] % 16 == 0
    assert _has_color(strip, SUBJECT_COLORS[0]) and _has_color(strip, SUBJECT_COLORS[1])
    assert not _has_color(strip, SUBJECT_COLORS[2])  # only the given subjects, null is untinted
    narrow = routing_legend(["the striped red star", "the dotted blue bottle", "a cat"], width=32)
    assert narrow.shape[0] > 16 and all(_has_color(narrow, SUBJECT_COLORS[i]) for i in range(3))  # wraps, keeps all


def test_overlay_and_grid_append_the_legend():
    frames = np.full((5, 32, 32, 3), 0.5, np.float32)
    maps = np.array([[[0, 1], [-1, 1]]] * 2)
    plain = overlay_routing_maps(frames, maps)
    with_legend = overlay_routing_maps(frames, maps, phrases=["a", "b"])
    assert np.array_equal(with_legend[:, :32], plain)
    legend = with_legend[0, 32:]
    assert _has_color(legend, SUBJECT_COLORS[0]) and _has_color(legend, SUBJECT_COLORS[1])
    grid = np.asarray(routing_grid(frames, maps, every=2, phrases=["a", "b"]))
    assert grid.shape[0] > 64 and _has_color(grid[64:], SUBJECT_COLORS[1])
    with pytest.raises(ValueError, match="subject 1"):
        overlay_routing_maps(frames, maps, phrases=["a"])


def test_tiny_components_load_a_saved_toy_vae(tmp_path):
    saved = tiny_wan_components(seed=3)["vae"]
    saved.save_pretrained(tmp_path / "vae")
    loaded = tiny_wan_components(vae=str(tmp_path / "vae"))["vae"]
    random_default = tiny_wan_components()["vae"]
    first = next(iter(saved.state_dict()))
    assert torch.equal(loaded.state_dict()[first], saved.state_dict()[first])
    assert not torch.equal(random_default.state_dict()[first], saved.state_dict()[first])


def test_help_prints_each_default_once(capsys):
    # Issue 25: "--device ... (default: cuda if available, else cpu) (default: None)".
    for command in ("generate", "demo"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: None)" not in text and "(default: False)" not in text
        assert "cpu) (default" not in text
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 81)" in text  # defaults that are not in the help are still added
    assert "auto: masks if given, else the router if loaded, else similarity" in text  # the code's order (README too)
