import json

import pytest
from _data_fixtures import tiny_vae

from diasr_diffusers.cli import main
from diasr_diffusers.data import LatentCacheDataset, MuSADataset, validate_manifest


def test_make_synthetic_validate_and_cache_latents(tmp_path, capsys):
    out = tmp_path / "synth"
    rc = main(["make-synthetic", "--out", str(out), "--num-clips", "3", "--seed", "2", "--subjects", "2-3",
               "--frames", "5", "--height", "32", "--width", "32", "--mask-format", "png"])
    assert rc == 0
    manifest = out / "manifest.jsonl"
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(records) == 3 and all(2 <= len(r["subjects"]) <= 3 for r in records)
    assert all("png_dir" in s["masks"] for r in records for s in r["subjects"])
    assert validate_manifest(manifest).ok
    assert len(MuSADataset(manifest, num_frames=5, height=32, width=32)) == 3

    capsys.readouterr()
    assert main(["validate-data", str(manifest)]) == 0
    assert "3 records, 0 bad" in capsys.readouterr().out
    # Regression: the folder (what make-synthetic prints and training accepts) was "does not exist".
    assert main(["validate-data", str(out), "--quick"]) == 0
    assert "3 records, 0 bad" in capsys.readouterr().out

    # A broken copy: the CLI lists the bad line and fails.
    lines = manifest.read_text().splitlines()
    broken = json.loads(lines[1])
    broken["subjects"][0]["phrase"] = "the invisible unicorn"
    (out / "broken.jsonl").write_text("\n".join([lines[0], json.dumps(broken), "{oops"]) + "\n")
    assert main(["validate-data", str(out / "broken.jsonl")]) == 1
    text = capsys.readouterr().out
    assert "line 2 (clip_000001): subject 0: phrase 'the invisible unicorn' does not occur" in text
    assert "line 3: malformed JSON" in text

    model = tmp_path / "model"
    tiny_vae().save_pretrained(model / "vae")
    rc = main(["cache-latents", "--data", str(manifest), "--model", str(model), "--out", str(tmp_path / "lat"),
               "--frames", "5", "--height", "32", "--width", "32"])
    assert rc == 0
    cache = LatentCacheDataset(tmp_path / "lat")
    assert len(cache) == 3 and cache[0]["latents"].shape == (4, 2, 4, 4)


def test_cli_errors(tmp_path, capsys):
    assert main(["validate-data", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["make-synthetic", "--out", str(tmp_path), "--num-clips", "1", "--subjects", "5"])
    assert main(["make-synthetic", "--out", str(tmp_path / "x"), "--num-clips", "0"]) == 2
    assert "`num_clips`" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_validate_data_refuses_outside_paths_unless_allowed(tmp_path, capsys):
    ds = tmp_path / "ds"
    ds.mkdir()
    record = {"id": "x", "video": "/etc/passwd", "caption": "a cat", "subjects": [
        {"phrase": "a cat", "references": ["../cat.png"], "masks": {"npz": "m.npz"}}]}
    (ds / "manifest.jsonl").write_text(json.dumps(record) + "\n")
    assert main(["validate-data", str(ds), "--quick"]) == 1
    text = capsys.readouterr().out
    assert text.count("leads outside the dataset root") == 2 and "--allow-outside-root" in text
    assert main(["validate-data", str(ds), "--quick", "--allow-outside-root"]) == 1
    text = capsys.readouterr().out
    assert "outside" not in text and "missing file" in text
    assert main(["validate-data", str(ds), "--workers", "-1"]) == 2
    assert "--workers" in capsys.readouterr().err
    (tmp_path / "lat").write_text("")
    assert main(["cache-latents", "--data", str(ds), "--model", str(tmp_path), "--out", str(tmp_path / "lat")]) == 2
    assert "--out" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--fps", "nan"], "`fps` must be a number"),  # was "cannot convert NaN to integer ratio"
        (["--fps", "inf"], "`fps` must be a number"),  # was an OverflowError traceback
        (["--height", "100000", "--width", "100000"], "must be <= 4096"),  # was a 116 GiB allocation
        (["--frames", "100000000"], "GiB of frames"),  # was a hang
        (["--num-clips", "99999999999999999999"], "`num_clips` must be an integer in"),  # was a hang
        (["--seed", "-1"], "`seed`"),
    ],
)
def test_make_synthetic_refuses_absurd_sizes(tmp_path, capsys, extra, message):
    argv = ["make-synthetic", "--out", str(tmp_path / "s"), "--num-clips", "1", "--frames", "3", "--height", "16",
            "--width", "16", *extra]  # fmt: skip
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_make_synthetic_out_is_a_file(tmp_path, capsys):
    # Regression: NotADirectoryError traceback from deep inside pathlib, after rendering started.
    (tmp_path / "f").write_text("")
    for out in (tmp_path / "f", tmp_path / "f" / "sub"):
        assert main(["make-synthetic", "--out", str(out), "--num-clips", "1"]) == 2
        assert "is a file, not a folder" in capsys.readouterr().err


def test_cache_latents_model_and_device_errors_are_one_line(tmp_path, capsys):
    # Regression: a typo'd --model raised diffusers' OSError with a traceback (rc 1).
    main(["make-synthetic", "--out", str(tmp_path / "d"), "--num-clips", "1", "--frames", "1", "--height", "16",
          "--width", "16"])  # fmt: skip
    base = ["cache-latents", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "lat"), "--frames", "1",
            "--height", "16", "--width", "16"]  # fmt: skip
    for extra, message in (
        (["--model", str(tmp_path / "nowhere")], "--model: folder"),
        (["--model", str(tmp_path / "d")], "has no vae/config.json"),
        (["--model", str(tmp_path / "d"), "--device", "bogus"], "--device"),
    ):
        capsys.readouterr()
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "lat").exists()
