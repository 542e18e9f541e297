"""Issue 25, data loss: one output-path guard (`utils.output_paths`) for every command that writes. Each test is a
finding that destroyed a user's file before the guard; each checks the file is untouched and the error names the flag."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diasr_diffusers.cli import main
from diasr_diffusers.utils.output_paths import (
    REGISTRY_NAME,
    OutputPathError,
    check_outputs,
    claim_outputs,
    disk_full_message,
)

# -- the guard itself --------------------------------------------------------------------------------------------


def test_guard_refuses_inputs_through_symlinks_hardlinks_and_dotdot(tmp_path):
    src = tmp_path / "in.json"
    src.write_text("{}")
    (tmp_path / "link.json").symlink_to(src)
    os.link(src, tmp_path / "hard.json")
    (tmp_path / "sub").mkdir()
    for out in ("link.json", "hard.json", "sub/../in.json"):
        with pytest.raises(OutputPathError, match=r"--out .*would overwrite the --cases file"):
            check_outputs([("--out", tmp_path / out)], [("--cases", src)], overwrite=True)
    assert src.read_text() == "{}"


def test_guard_foreign_file_needs_overwrite_own_file_does_not(tmp_path):
    mine = tmp_path / "notes.json"
    mine.write_text("user's")
    with pytest.raises(OutputPathError, match="exists and was not written by diasr; pass --overwrite"):
        check_outputs([("--out", mine)])
    check_outputs([("--out", mine)], overwrite=True)  # the user said so
    ours = tmp_path / "results.json"
    claim_outputs([ours])
    ours.write_text("an earlier run")
    check_outputs([("--out", ours)])  # a re-run replaces its own output
    assert json.loads((tmp_path / REGISTRY_NAME).read_text()) == ["results.json"]


def test_guard_existing_file_inside_an_input_folder_is_refused_even_with_overwrite(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "a.mp4").write_bytes(b"video")
    with pytest.raises(OutputPathError, match="inside the --videos folder"):
        check_outputs([("--out", videos / "a.mp4")], [("--videos", videos)], overwrite=True)
    check_outputs([("--out", videos / "new.json")], [("--videos", videos)])  # a new file there is fine


def _read_only(monkeypatch, folder: Path) -> None:
    """``folder`` reads as not writable, also for root (who may write anywhere; CI and this machine run as root)."""
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == folder and mode & os.W_OK else real(p, mode, **k))


def test_guard_read_only_folder(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    _read_only(monkeypatch, ro)
    with pytest.raises(OutputPathError, match=r"--out: the folder .*ro is not writable"):
        check_outputs([("--out", ro / "x" / "out.json")])


def test_disk_full_message():
    assert "disk is full" in disk_full_message(OSError(errno.ENOSPC, "No space left on device", "a.mp4"))
    assert "larger than this system allows" in disk_full_message(OSError(errno.EFBIG, "File too large"))
    assert disk_full_message(OSError(errno.ENOENT, "nope")) is None
    assert disk_full_message(ValueError("x")) is None


# -- diasr eval ----------------------------------------------------------------------------------------------------


@pytest.fixture
def eval_inputs(tmp_path):
    (tmp_path / "refs").mkdir()
    (tmp_path / "videos").mkdir()
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(tmp_path / "refs" / "man.png")
    (tmp_path / "videos" / "case2.mp4").write_bytes(b"an input video")
    cases = {"case2": {"img_paths": ["refs/man.png"], "prompt": "a man", "class_label": ["man"]}}
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    return tmp_path


@pytest.mark.parametrize(
    ("out", "extra", "victim", "message"),
    [
        ("videos/case2.mp4", ["--no-plot"], "videos/case2.mp4", "inside the --videos folder"),
        ("refs/man.png", ["--no-plot"], "refs/man.png", "reference image of case 'case2'"),
        ("refs/man.json", [], "refs/man.png", "the bar chart"),
    ],
)
@pytest.mark.parametrize("overwrite", [False, True])
def test_eval_out_never_lands_on_its_inputs(eval_inputs, capsys, out, extra, victim, message, overwrite):
    before = (eval_inputs / victim).read_bytes()
    argv = ["eval", "--cases", str(eval_inputs / "cases.json"), "--videos", str(eval_inputs / "videos"),
            "--out", str(eval_inputs / out), "--no-progress", *extra, *(["--overwrite"] if overwrite else [])]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--out" in err and message in err, err
    assert (eval_inputs / victim).read_bytes() == before


def test_eval_routing_out_refuses_a_foreign_file(tmp_path, capsys):
    np.savez(tmp_path / "maps.npz", routing_maps=np.zeros((1, 2, 2), np.int64))
    np.savez(tmp_path / "masks.npz", masks=np.ones((1, 1, 32, 32), bool))
    (tmp_path / "report.json").write_text("the user's")
    argv = ["eval-routing", "--maps", str(tmp_path / "maps.npz"), "--masks", str(tmp_path / "masks.npz"),
            "--out", str(tmp_path / "report.json")]  # fmt: skip
    assert main(argv) == 2
    assert "exists and was not written by diasr" in capsys.readouterr().err
    assert (tmp_path / "report.json").read_text() == "the user's"
    assert main([*argv, "--overwrite"]) == 0
    assert main(argv) == 0  # now it is ours: a re-run needs no --overwrite


# -- make-synthetic, demo, cache-latents, train ----------------------------------------------------------------------


def test_make_synthetic_keeps_foreign_videos_without_a_manifest(tmp_path, capsys):
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "clip_000000.mp4").write_bytes(b"the user's video")
    argv = ["make-synthetic", "--out", str(tmp_path), "--num-clips", "1", "--frames", "3", "--height", "16",
            "--width", "16"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "clip_000000.mp4" in err and "--overwrite" in err
    assert (tmp_path / "videos" / "clip_000000.mp4").read_bytes() == b"the user's video"
    assert main([*argv, "--overwrite"]) == 0
    assert (tmp_path / "videos" / "clip_000000.mp4").read_bytes() != b"the user's video"


def test_make_synthetic_rerun_after_an_interruption_needs_no_overwrite(tmp_path):
    argv = ["make-synthetic", "--out", str(tmp_path / "s"), "--num-clips", "2", "--frames", "3", "--height", "16",
            "--width", "16"]  # fmt: skip
    assert main(argv) == 0
    (tmp_path / "s" / "manifest.jsonl").unlink()  # as if killed before the manifest
    assert main(argv) == 0


def test_demo_keeps_the_users_report(tmp_path, capsys):
    (tmp_path / "report.md").write_text("my notes")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "report.md" in err and "--overwrite" in err
    assert (tmp_path / "report.md").read_text() == "my notes"
    assert not (tmp_path / "demo.mp4").exists()  # refused before any work


def test_cache_latents_read_only_out_is_a_clear_error(tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    assert main(["make-synthetic", "--out", str(tmp_path / "d"), "--num-clips", "1", "--frames", "5",
                 "--height", "16", "--width", "16"]) == 0  # fmt: skip
    _read_only(monkeypatch, ro)
    code = main(["cache-latents", "--data", str(tmp_path / "d"), "--model", str(tmp_path / "nomodel"),
                 "--out", str(ro / "cache"), "--frames", "5", "--height", "16", "--width", "16"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "--out" in err and "not writable" in err


def test_train_refuses_an_output_dir_holding_someone_elses_pipeline(tmp_path):
    from test_training import _config

    from diasr_diffusers.training import DiasRTrainer, TrainConfig

    out = tmp_path / "run"
    (out / "pipeline").mkdir(parents=True)
    (out / "pipeline" / "model_index.json").write_text("{}")  # e.g. the base model the user downloaded there
    manifest = tmp_path / "data"
    assert main(["make-synthetic", "--out", str(manifest), "--num-clips", "1", "--frames", "5", "--height", "32",
                 "--width", "32"]) == 0  # fmt: skip
    trainer = DiasRTrainer(TrainConfig.from_dict(_config(manifest)), out)
    with pytest.raises(ValueError, match=r"--output-dir.*pipeline.*not written by diasr"):
        trainer.check_output_dir()
    assert (out / "pipeline" / "model_index.json").read_text() == "{}"
    fresh = DiasRTrainer(TrainConfig.from_dict(_config(manifest)), tmp_path / "fresh")
    assert fresh.check_output_dir() is None
    again = DiasRTrainer(TrainConfig.from_dict(_config(manifest)), tmp_path / "fresh")
    assert again.check_output_dir() is None  # its own (claimed) names do not block a new run


# -- a full disk in train and generate ------------------------------------------------------------------------------


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_train_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    from diasr_diffusers.training import DiasRTrainer

    (tmp_path / "cfg.yaml").write_text("x: 1\n")
    monkeypatch.setattr(DiasRTrainer, "train", _enospc)
    monkeypatch.setattr(DiasRTrainer, "check_output_dir", lambda self: None)
    monkeypatch.setattr("diasr_diffusers.training.TrainConfig.from_yaml", lambda *a, **k: _FakeConfig())
    assert main(["train", "--config", str(tmp_path / "cfg.yaml"), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "disk is full" in err and "--output-dir" in err


class _FakeConfig:
    class family:  # noqa: N801 (mirrors TrainConfig.family)
        @staticmethod
        def trainer_class():
            from diasr_diffusers.training import DiasRTrainer

            return lambda config, out, resume=False: DiasRTrainer.__new__(DiasRTrainer)


def test_generate_full_disk_is_one_line_and_leaves_no_file(tmp_path, monkeypatch, capsys):
    import diffusers.utils

    from diasr_diffusers.commands import generate as gen

    class Out:
        frames = [np.zeros((5, 16, 16, 3), np.float32)]
        routing_maps = None

    def full_disk_writer(frames, path, fps):
        Path(path).write_bytes(b"half")  # the writer got halfway, then the disk filled up
        _enospc()

    monkeypatch.setattr(diffusers.utils, "export_to_video", full_disk_writer)
    out = tmp_path / "out.mp4"
    with pytest.raises(gen.UsageError, match="disk is full") as info:
        gen.write_or_explain(gen.save_outputs, Out(), [], out, None, 8)
    assert gen.report_usage_error("generate", info.value) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert [p.name for p in tmp_path.iterdir()] == []  # no half-written video, no temp file


# -- found by the second hostile round (benchmarks/hostile_round2.py) ----------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [("a\x00b.mp4", "holds a NUL byte"), ("x" * 5000 + ".mp4", "this file system allows"), ("  ", "empty")],
)
def test_generate_out_impossible_paths_are_one_line(tmp_path, capsys, value, message):
    from diasr_diffusers.commands import generate as gen

    with pytest.raises(gen.UsageError, match=message):  # were ValueError / OSError tracebacks
        gen.check_output(value, "--out")


def test_guard_refuses_a_broken_or_looping_symlink(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "dangling.json").symlink_to(tmp_path / "nowhere" / "x.json")
    for name in ("loop", "dangling.json"):
        with pytest.raises(OutputPathError, match="symbolic link that leads nowhere"):  # was accepted
            check_outputs([("--out", tmp_path / name)])
