"""`diasr eval` and `diasr eval-routing` end to end on tiny generated inputs, and every bad input."""

import json
import os

import imageio.v2 as imageio
import numpy as np
import pytest
from eval_synth import astronaut_face, static_clip, texture, translating_square
from PIL import Image

from diasr_diffusers.cli import main
from diasr_diffusers.eval import aggregate_video_scores, motion_amplitude, read_video, total_score

RAW = {"aes_score": 5.2, "motion_smoothness": 0.95, "facesim_cur": 0.4, "gme_score": 0.7, "nexus_score": 0.02,
       "natural_score": 3.5}  # fmt: skip


def write_mp4(path, frames):
    imageio.mimwrite(path, list(frames), fps=8, format="FFMPEG", codec="libx264", macro_block_size=16)


@pytest.fixture(scope="module")
def case_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("opens2v")
    (root / "Images").mkdir()
    videos = root / "videos"
    videos.mkdir()
    Image.fromarray(texture(48, 48, seed=2)).save(root / "Images" / "square.png")
    Image.fromarray(astronaut_face(128)).save(root / "Images" / "astronaut.png")
    cases = {
        "singleobj_1": {"img_paths": ["Images/square.png"], "prompt": "a square slides right", "class_label": ["Toy"]},
        "singleobj_2": {"img_paths": ["Images/square.png"], "prompt": "a still square", "class_label": ["Toy"]},
        "singleface_1": {"img_paths": ["Images/astronaut.png"], "prompt": "an astronaut", "class_label": ["face"]},
        "multiface_1": {"img_paths": ["Images/astronaut.png"], "prompt": "missing video", "class_label": ["face"]},
        "multiface_2": {"img_paths": ["Images/astronaut.png"], "prompt": "corrupt video", "class_label": ["face"]},
    }
    (root / "cases.json").write_text(json.dumps(cases))
    write_mp4(videos / "singleobj_1.mp4", translating_square(3))
    write_mp4(videos / "singleobj_2.mp4", static_clip())
    write_mp4(videos / "singleface_1.mp4", np.stack([astronaut_face(128, dx=2 * t) for t in range(6)]))
    (videos / "multiface_2.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    return root


def run(argv):
    return main(argv)


def test_eval_end_to_end(case_set, tmp_path, capsys):
    out = tmp_path / "results.json"
    rc = run(["eval", "--cases", str(case_set / "cases.json"), "--videos", str(case_set / "videos"),
              "--out", str(out), "--no-progress"])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0
    results = json.loads(out.read_text())
    assert results["summary"] == {"num_cases": 5, "evaluated": 3, "skipped": 2}
    assert results["skipped"]["multiface_1"].startswith("missing video")
    assert results["skipped"]["multiface_2"].startswith("corrupt video")
    assert "skipped multiface_1" in printed and "skipped multiface_2" in printed

    cases = results["cases"]
    moving = cases["singleobj_1"]["metrics"]["MotionAmplitude"]
    assert moving > 0.2 > 0.01 > cases["singleobj_2"]["metrics"]["MotionAmplitude"]
    assert moving == pytest.approx(motion_amplitude(read_video(case_set / "videos" / "singleobj_1.mp4")), rel=1e-6)
    face = cases["singleface_1"]["metrics"]
    assert face["FaceSim-1to1"] > 0.95 and face["FaceSim-MaxPairs"] >= face["FaceSim-1to1"]
    assert cases["singleobj_1"]["metrics"]["FaceSim-1to1"] is None  # no face among the references
    assert cases["singleface_1"]["details"]["face"]["presence"] == [1.0]

    categories = results["categories"]
    assert set(categories) == {"singleobj", "singleface"}
    assert categories["singleobj"]["num_cases"] == 2
    expected = np.mean([cases[c]["metrics"]["WarpResidual"] for c in ("singleobj_1", "singleobj_2")])
    assert categories["singleobj"]["metrics"]["WarpResidual"] == pytest.approx(expected)
    # Only MotionAmplitude is available offline, so no TotalScore, and the reason is spelled out.
    total = results["overall"]["total_score"]
    assert total["value"] is None and "Aesthetics" in total["missing"] and "MotionAmplitude" not in total["missing"]
    assert "not computed" in printed

    chart = tmp_path / "results.png"
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.parametrize(("version", "domain"), [("v1.1", "open"), ("v1.0", "human")])
def test_eval_total_score_with_precomputed_scores(case_set, tmp_path, version, domain):
    precomputed = tmp_path / "pre.json"
    precomputed.write_text(json.dumps({c: RAW for c in ("singleobj_1", "singleobj_2", "singleface_1")}))
    out = tmp_path / "r.json"
    rc = run(["eval", "--cases", str(case_set / "cases.json"), "--videos", str(case_set / "videos"), "--out", str(out),
              "--metrics", "MotionAmplitude", "--precomputed", str(precomputed), "--version", version,
              "--domain", domain, "--no-progress", "--no-plot"])  # fmt: skip
    assert rc == 0
    results = json.loads(out.read_text())
    raw = [dict(RAW, motion_amplitude=case["metrics"]["MotionAmplitude"]) for case in results["cases"].values()]
    expected = total_score(aggregate_video_scores(raw), version=version, domain=domain)
    assert results["overall"]["total_score"]["value"] == pytest.approx(expected)
    assert results["overall"]["total_score"]["missing"] == []
    single = results["categories"]["singleface"]["total_score"]["value"]
    assert single == pytest.approx(total_score(aggregate_video_scores(raw[2:]), version=version, domain=domain))
    assert not (tmp_path / "r.png").exists()


def test_all_videos_missing_exits_1_but_writes_results(case_set, tmp_path):
    empty = tmp_path / "no-videos"
    empty.mkdir()
    out = tmp_path / "r.json"
    rc = run(["eval", "--cases", str(case_set / "cases.json"), "--videos", str(empty), "--out", str(out),
              "--metrics", "MotionAmplitude", "--no-progress"])  # fmt: skip
    assert rc == 1
    assert json.loads(out.read_text())["summary"]["evaluated"] == 0


def _bad_cases(tmp_path, content):
    path = tmp_path / "cases.json"
    path.write_text(content)
    return str(path)


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda t, c: ["--cases", str(t / "nope.json"), "--videos", str(c / "videos")], "--cases: file not found"),
        (lambda t, c: ["--cases", _bad_cases(t, "[1, 2]"), "--videos", str(c / "videos")], "expected a JSON object"),
        (lambda t, c: ["--cases", _bad_cases(t, "{not json"), "--videos", str(c / "videos")], "not valid JSON"),
        (
            lambda t, c: ["--cases", _bad_cases(t, '{"x_1": {"prompt": "p"}}'), "--videos", str(c / "videos")],
            "case 'x_1': `img_paths`",
        ),
        (
            lambda t, c: [
                "--cases",
                _bad_cases(t, '{"x_1": {"img_paths": ["a.png"], "prompt": 3}}'),
                "--videos",
                str(c / "videos"),
            ],  # fmt: skip
            "`prompt` must be a string",
        ),
        (lambda t, c: ["--cases", _bad_cases(t, "{}"), "--videos", str(c / "videos")], "holds no cases"),
        # Regression: a deeply nested file raised RecursionError (rc 1, traceback).
        (lambda t, c: ["--cases", _bad_cases(t, "[" * 100000), "--videos", str(c / "videos")], "nested too deeply"),
        (
            lambda t, c: [
                "--cases",
                str(c / "cases.json"),
                "--videos",
                str(c / "videos"),
                "--precomputed",
                _bad_cases(t, '{"a": ' * 100000),
            ],  # fmt: skip
            "--precomputed: not valid JSON: nested too deeply",
        ),
        (
            lambda t, c: ["--cases", str(c / "cases.json"), "--videos", str(t / "missing")],
            "--videos: folder not found",
        ),
        (
            lambda t, c: ["--cases", str(c / "cases.json"), "--videos", str(c / "videos"), "--face-frames", "0"],
            "--face-frames",
        ),
        (
            lambda t, c: [
                "--cases",
                str(c / "cases.json"),
                "--videos",
                str(c / "videos"),
                "--precomputed",
                _bad_cases(t, '{"singleobj_1": {"aes_score": "high"}}'),
            ],  # fmt: skip
            "--precomputed: case 'singleobj_1': non-numeric",
        ),
        (
            lambda t, c: ["--cases", str(c / "cases.json"), "--videos", str(c / "videos"), "--metrics", "CLIP-T"],
            "--clip-model is required",
        ),
        (
            lambda t, c: [
                "--cases",
                str(c / "cases.json"),
                "--videos",
                str(c / "videos"),
                "--metrics",
                "CLIP-T",
                "--clip-model",
                str(t / "no-clip"),
            ],  # fmt: skip
            "hf download openai/clip-vit-large-patch14",
        ),
    ],
)
def test_eval_bad_input(case_set, tmp_path, capsys, make_args, message):
    out = tmp_path / "out" / "r.json"
    (tmp_path / "out").mkdir()
    rc = run(["eval", *make_args(tmp_path, case_set), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert not out.exists()


def test_eval_outputs_stay_distinct(case_set, tmp_path, capsys):
    # Regression: `--out res.png` wrote the bar chart over the results file.
    base = ["eval", "--cases", str(case_set / "cases.json"), "--videos", str(case_set / "videos"), "--no-progress",
            "--metrics", "MotionAmplitude"]  # fmt: skip
    out = tmp_path / "res.png"
    assert run([*base, "--out", str(out)]) == 2
    assert "--out" in capsys.readouterr().err and not out.exists()
    copy = tmp_path / "cases.json"
    copy.write_text((case_set / "cases.json").read_text())
    assert run([*base[:2], str(copy), *base[3:], "--out", str(copy), "--no-plot"]) == 2
    assert "would overwrite the --cases file" in capsys.readouterr().err
    assert run([*base, "--out", str(out), "--no-plot"]) == 0  # no chart: the name is free
    assert json.loads(out.read_text())["complete"] is True


def _bomb_png(path):
    """A PNG whose header claims 30000x30000 pixels (PIL refuses it with DecompressionBombError)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


class _NoFaces:
    def embed(self, images):
        return np.full((len(images), 4), np.nan)

    def detect_and_embed(self, frame):
        return []


def test_bad_case_is_skipped_and_other_results_survive(case_set, tmp_path, monkeypatch, capsys):
    from diasr_diffusers.eval import load_cases, runner

    # Regression: a reference whose header claims 30000x30000 raised DecompressionBombError out of the whole run.
    _bomb_png(tmp_path / "bomb.png")
    cases = load_cases(case_set / "cases.json")
    cases["singleobj_2"].img_paths = [str(tmp_path / "bomb.png")]
    results = runner.evaluate_cases(cases, case_set / "videos", metrics=["FaceSim"], face_embedder=_NoFaces(),
                             progress=False)  # fmt: skip
    assert results["skipped"]["singleobj_2"].startswith("unreadable reference image")
    assert "DecompressionBombError" in results["skipped"]["singleobj_2"]
    assert set(results["cases"]) == {"singleobj_1", "singleface_1"}

    # Regression: results were written once at the end, so a crash in the last case lost every other result.
    real_read = runner.read_video

    def crash_on_singleface(path, *args, **kwargs):
        if "singleface_1" in str(path):
            raise KeyboardInterrupt
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(runner, "read_video", crash_on_singleface)
    out = tmp_path / "r.json"
    with pytest.raises(KeyboardInterrupt):
        run(["eval", "--cases", str(case_set / "cases.json"), "--videos", str(case_set / "videos"), "--out", str(out),
             "--metrics", "MotionAmplitude", "--no-progress"])  # fmt: skip
    partial = json.loads(out.read_text())
    assert partial["complete"] is False and set(partial["cases"]) == {"singleobj_1", "singleobj_2"}
    assert partial["cases"]["singleobj_1"]["metrics"]["MotionAmplitude"] > 0


def test_eval_out_folder_must_exist(case_set, tmp_path, capsys):
    out = tmp_path / "missing-dir" / "r.json"
    rc = run(
        ["eval", "--cases", str(case_set / "cases.json"), "--videos", str(case_set / "videos"), "--out", str(out)]
    )
    assert rc == 2 and "--out" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# eval-routing
# ----------------------------------------------------------------------------------------------------------------


def _routing_files(tmp_path, maps, masks, maps_key="routing_maps"):
    np.savez(tmp_path / "maps.npz", **{maps_key: maps})
    np.savez(tmp_path / "masks.npz", masks=masks)
    return ["--maps", str(tmp_path / "maps.npz"), "--masks", str(tmp_path / "masks.npz")]


def _layout():
    masks = np.zeros((2, 5, 64, 64), dtype=np.uint8)
    masks[0, :, :, :32] = 1
    masks[1, :, :32, 32:] = 1
    maps = np.full((1, 2, 4, 4), -1, dtype=np.int64)
    maps[0, :, :, :2] = 0
    maps[0, :, :2, 2:] = 1
    return maps, masks


def test_eval_routing_end_to_end(tmp_path, capsys):
    maps, masks = _layout()
    maps[0, :, :, 1] = -1  # subject 0 loses half its tokens
    out = tmp_path / "routing.json"
    assert run(["eval-routing", *_routing_files(tmp_path, maps, masks), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["per_subject_iou"] == [pytest.approx(0.5), 1.0]
    assert result["mean_iou"] == pytest.approx(0.75)
    assert result["config"]["patch_size"] == [1, 2, 2]
    assert "mean IoU: 0.7500" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("wrong_key", "--maps: "),
        ("grid", "token grid"),
        ("missing", "--maps: file not found"),
        ("not_npz", "cannot read"),
    ],
)
def test_eval_routing_bad_input(tmp_path, capsys, kind, message):
    maps, masks = _layout()
    args = _routing_files(tmp_path, maps, masks, maps_key="maps" if kind == "wrong_key" else "routing_maps")
    if kind == "grid":
        args = _routing_files(tmp_path, maps[:, :, :3, :3], masks)
    elif kind == "missing":
        args[1] = str(tmp_path / "nope.npz")
    elif kind == "not_npz":
        (tmp_path / "maps.npz").write_text("hello")
    out = tmp_path / "routing.json"
    assert run(["eval-routing", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err
    if kind == "wrong_key":
        assert "'routing_maps'" in err and "found: ['maps']" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--temporal-compression", "0"], "--temporal-compression must be a positive integer"),  # was rc 0, IoU 1.0
        (["--spatial-compression", "0"], "--spatial-compression must be a positive integer"),  # was rc 0, IoU 1.0
        (["--spatial-compression", "-8"], "--spatial-compression"),  # was a RuntimeError from torch's pooling
        (["--patch-size", "0", "2", "2"], "--patch-size"),  # was ZeroDivisionError
        (["--threshold", "nan"], "--threshold must be in (0, 1]"),  # was rc 0 with every token background
        (["--threshold", "5"], "--threshold"),
        ("masks255", "divide 0/255 masks by 255"),  # was rc 0 (coverage 255 counted as a full subject)
        ("masks_nan", "--masks values must be in [0, 1]"),  # was rc 0, IoU 0
        ("out_is_input", "would overwrite the --maps file"),
    ],
)
def test_eval_routing_refuses_silently_wrong_settings(tmp_path, capsys, extra, message):
    maps, masks = _layout()
    if extra == "masks255":
        masks, extra = masks * 255, []
    elif extra == "masks_nan":
        masks, extra = np.where(masks > 0, np.nan, 0.0), []
    args = _routing_files(tmp_path, maps, masks)
    out = tmp_path / "routing.json"
    if extra == "out_is_input":
        out, extra = tmp_path / "maps.npz", []
    before = (tmp_path / "maps.npz").read_bytes()
    assert run(["eval-routing", *args, "--out", str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert (tmp_path / "maps.npz").read_bytes() == before and not (tmp_path / "routing.json").exists()
