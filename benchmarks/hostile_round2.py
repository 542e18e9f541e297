"""Hostile round two (issue 25): new inputs over what the reliability fixes changed, each run and classified.

Classes: ``ok`` (accepted, and accepting it is right), ``clear`` (refused with one line naming the argument),
``unclear`` (refused, but the message is several lines or names nothing), ``crash`` (an exception type a user should
never see: IndexError, AttributeError, KeyError, RuntimeError, ZeroDivisionError, ...), ``hang`` (past the time
limit), ``silent`` (accepted although it should have been refused), ``data loss`` (a file that was not the command's
to write changed).

Every case states what is right (``expect="ok"`` or ``"error"``) and, for errors, a word the message must hold to
count as clear (the argument's name). The cases were written down before the code paths they hit were read again.

    PYTHONPATH=src python benchmarks/hostile_round2.py            # prints the table and the counts
    PYTHONPATH=src python benchmarks/hostile_round2.py --markdown # the counts as docs/reliability.md quotes them

About 2 minutes on a quiet 2-core CPU (a tiny Ingredients pipeline and the sprite page's checks are built once).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

CRASH_TYPES = (IndexError, AttributeError, KeyError, RuntimeError, ZeroDivisionError, AssertionError, NameError,
               UnboundLocalError, RecursionError, OverflowError, UnicodeError, NotImplementedError)  # fmt: skip
LIMIT_S = 60


@dataclass
class Case:
    group: str
    name: str
    run: Callable[[], Any]
    expect: str = "error"  # "ok" | "error"
    names: tuple[str, ...] = ()  # words a clear message holds (any of them)
    protected: tuple[Path, ...] = ()  # files that must not change


@dataclass
class Result:
    case: Case
    outcome: str
    detail: str


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang


def _snapshot(paths):
    return {p: (p.read_bytes() if p.is_file() else None) for p in paths}


def classify(case: Case) -> Result:
    before = _snapshot(case.protected)
    err_buf = io.StringIO()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(LIMIT_S)
    try:
        with contextlib.redirect_stderr(err_buf), contextlib.redirect_stdout(io.StringIO()):
            value = case.run()
        signal.alarm(0)
    except _Hang:
        return Result(case, "hang", f"over {LIMIT_S} s")
    except SystemExit as e:  # argparse
        signal.alarm(0)
        value = e.code
    except BaseException as e:  # noqa: BLE001
        signal.alarm(0)
        if _snapshot(case.protected) != before:
            return Result(case, "data loss", f"{type(e).__name__}: {e}")
        message = str(e)
        if isinstance(e, CRASH_TYPES) and not isinstance(e, (ValueError, TypeError, OSError)):
            return Result(case, "crash", f"{type(e).__name__}: {message[:200]}")
        if case.expect == "ok":
            return Result(case, "unclear", f"refused a valid input: {type(e).__name__}: {message[:200]}")
        one_line = "\n" not in message.strip() and len(message) < 600
        named = not case.names or any(n in message for n in case.names)
        return Result(case, "clear" if one_line and named else "unclear", f"{type(e).__name__}: {message[:200]}")
    if _snapshot(case.protected) != before:
        return Result(case, "data loss", f"returned {value!r:.80}")
    # CLI commands return exit codes: 2 = a user error, reported on stderr.
    stderr = err_buf.getvalue().strip()
    if isinstance(value, int) and not isinstance(value, bool) and value == 2 and case.group.startswith("cli"):
        if "Traceback" in stderr:
            return Result(case, "crash", stderr.splitlines()[-1][:200])
        one_line = len(stderr.splitlines()) == 1
        named = not case.names or any(n in stderr for n in case.names)
        outcome = "clear" if one_line and named else "unclear"
        if case.expect == "ok":
            outcome = "unclear"
        return Result(case, outcome, stderr[:200])
    if case.expect == "error":
        return Result(case, "silent", f"accepted: returned {value!r:.80}")
    return Result(case, "ok", f"{value!r:.80}")


# -- the cases ----------------------------------------------------------------------------------------------------


def output_guard_cases(tmp: Path) -> list[Case]:
    from diasr_diffusers.cli import main
    from diasr_diffusers.utils.output_paths import check_outputs, claim_outputs

    cases = []
    from PIL import Image

    def fixture(root: Path) -> list[Path]:
        """A fresh eval input set per case (an earlier case may rightly have replaced a file with --overwrite)."""
        (root / "videos").mkdir(parents=True)
        (root / "refs").mkdir()
        Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(root / "refs" / "a.png")
        (root / "videos" / "c1.mp4").write_bytes(b"input video")
        (root / "cases.json").write_text(json.dumps({"c1": {"img_paths": ["refs/a.png"], "prompt": "p", "class_label": ["x"]}}))
        (root / "pre.json").write_text(json.dumps({"c1": {"aes_score": 5.0}}))
        (root / "mine.json").write_text("user file")
        (root / "link_to_cases.json").symlink_to(root / "cases.json")
        os.link(root / "refs" / "a.png", root / "hard_a.png")
        return [root / "cases.json", root / "videos" / "c1.mp4", root / "refs" / "a.png", root / "pre.json", root / "mine.json"]

    def eval_argv(root, out, *extra):
        return ["eval", "--cases", str(root / "cases.json"), "--videos", str(root / "videos"), "--out", str(out),
                "--no-progress", "--metrics", "MotionAmplitude", *extra]  # fmt: skip

    targets = [
        ("the case file", "cases.json", "--cases"),
        ("a symlink to the case file", "link_to_cases.json", "--cases"),
        ("the case file via ..", "videos/../cases.json", "--cases"),
        ("an input video", "videos/c1.mp4", "--videos"),
        ("a reference image", "refs/a.png", "reference image"),
        ("a hard link of a reference", "hard_a.png", "reference image"),
        ("the precomputed file", "pre.json", "--precomputed"),
        ("a user's file", "mine.json", "--overwrite"),
        ("the videos folder", "videos", "--out"),
        ("a json whose chart is a reference", "refs/a.json", "bar chart"),
        ("a file under a file", "mine.json/x.json", "--out"),
    ]
    for what, rel, word in targets:
        for extra in ([], ["--no-plot"], ["--overwrite"], ["--precomputed", "PRE"]):
            root = tmp / f"guard_{len(cases)}"
            inputs = fixture(root)
            extra = [str(root / "pre.json") if e == "PRE" else e for e in extra]
            expect_ok = False
            if what == "a json whose chart is a reference" and "--no-plot" in extra:
                expect_ok = True  # no chart: the json alone is a new file
            if what == "a user's file" and "--overwrite" in extra:
                expect_ok = True  # the user said so
            if what == "the precomputed file" and "--precomputed" not in extra:
                expect_ok = "--overwrite" in extra  # not an input of this run: a foreign file
            target = root / rel
            protected = tuple(p for p in inputs if not (expect_ok and p == target))
            cases.append(Case("cli eval --out", f"{what} {' '.join(e for e in extra if '/' not in e) or '(plain)'}",
                              lambda r=root, t=target, e=extra: main(eval_argv(r, t, *e)),
                              "ok" if expect_ok else "error", (word, "--out"), protected))  # fmt: skip
    root = tmp / "guard"
    fixture(root)
    # eval-routing
    np.savez(root / "maps.npz", routing_maps=np.zeros((1, 2, 2), np.int64))
    np.savez(root / "masks.npz", masks=np.ones((1, 1, 32, 32), bool))
    (root / "mine_iou.json").write_text("the user's")
    for what, target, expect in [("the maps file", root / "maps.npz", "error"), ("the masks file", root / "masks.npz", "error"),
                                 ("a user's json", root / "mine_iou.json", "error"), ("a new file", root / "new_iou.json", "ok"),
                                 ("a folder", root / "refs", "error"), ("a missing folder", root / "nope" / "x.json", "error")]:  # fmt: skip
        argv = ["eval-routing", "--maps", str(root / "maps.npz"), "--masks", str(root / "masks.npz"), "--out", str(target)]
        cases.append(Case("cli eval-routing --out", what, lambda a=argv: main(a), expect, ("--out",),
                          (root / "maps.npz", root / "masks.npz", root / "mine_iou.json")))  # fmt: skip
    # make-synthetic into folders holding things
    for what, setup, extra, expect in [
        ("a foreign clip, no manifest", lambda d: (d / "videos").mkdir() or (d / "videos" / "clip_000000.mp4").write_bytes(b"x"), [], "error"),
        ("a foreign reference png", lambda d: (d / "refs").mkdir() or (d / "refs" / "clip_000000_s0.png").write_bytes(b"x"), [], "error"),
        ("a foreign npz mask", lambda d: (d / "masks").mkdir() or (d / "masks" / "clip_000000.npz").write_bytes(b"x"), [], "error"),
        ("a foreign clip past num_clips", lambda d: (d / "videos").mkdir() or (d / "videos" / "clip_000005.mp4").write_bytes(b"x"), [], "ok"),
        ("an unrelated user file", lambda d: (d / "notes.txt").write_text("x"), [], "ok"),
        ("a foreign png mask folder", lambda d: (d / "masks" / "clip_000000_s0").mkdir(parents=True) or (d / "masks" / "clip_000000_s0" / "00000.png").write_bytes(b"x"), ["--mask-format", "png"], "error"),
        ("a foreign clip with --overwrite", lambda d: (d / "videos").mkdir() or (d / "videos" / "clip_000000.mp4").write_bytes(b"x"), ["--overwrite"], "ok"),
        ("an existing manifest", lambda d: (d / "manifest.jsonl").write_text("{}\n"), [], "error"),
        ("out is a file", None, [], "error"),
    ]:  # fmt: skip
        d = tmp / f"synth_{len(cases)}"
        if setup is None:
            d.write_text("x")
            protected = (d,)
        else:
            d.mkdir()
            setup(d)
            protected = tuple(p for p in d.rglob("*") if p.is_file()) if expect == "error" else ()
        argv = ["make-synthetic", "--out", str(d), "--num-clips", "2", "--frames", "3", "--height", "16", "--width", "16", *extra]
        cases.append(Case("cli make-synthetic --out", what, lambda a=argv: main(a), expect, ("--overwrite", "out_dir", "--out"), protected))  # fmt: skip
    # generate's output checks (no model is loaded: they come first)
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(root / "man.png")
    (root / "left.png").write_bytes((root / "man.png").read_bytes())
    (root / "old.mp4").write_bytes(b"the user's video")
    gen_base = ["generate", "--model", str(tmp / "no_model"), "--prompt", "the man walks", "--device", "cpu",
                "--subject", f"the man={root / 'man.png'}"]  # fmt: skip
    for what, out, extra, word in [
        ("--out onto the subject image (renamed .mp4 link)", None, [], "--out"),
        ("--out onto a user's mp4", root / "old.mp4", [], "--overwrite"),
        ("--routing-maps onto a user's mp4", root / "new.mp4", ["--routing-maps", str(root / "old.mp4")], "--overwrite"),
        ("--routing-maps equal to --out", root / "new.mp4", ["--routing-maps", str(root / "new.mp4")], "--routing-maps"),
        ("--out through a symlinked folder onto a user's mp4", root / "lnk" / "old.mp4", [], "--overwrite"),
        ("--out a folder", root / "videos", [], "--out"),
        ("--out not .mp4", root / "x.gif", [], "--out"),
    ]:  # fmt: skip
        if out is None:
            (root / "man_link.mp4").symlink_to(root / "man.png")
            out = root / "man_link.mp4"
        if "lnk" in str(out) and not (root / "lnk").exists():
            (root / "lnk").symlink_to(root)
        cases.append(Case("cli generate outputs", what, lambda o=out, e=extra: main([*gen_base, "--out", str(o), *e]),
                          "error", (word,), (root / "man.png", root / "old.mp4")))  # fmt: skip
    # the guard itself, directly
    own = tmp / "own"
    own.mkdir()
    claim_outputs([own / "r.json"])
    (own / "r.json").write_text("ours")
    (own / "theirs.json").write_text("theirs")
    for what, outputs, ins, kw, expect in [
        ("own earlier output", [("--out", own / "r.json")], [], {}, "ok"),
        ("foreign file", [("--out", own / "theirs.json")], [], {}, "error"),
        ("foreign file, overwrite", [("--out", own / "theirs.json")], [], {"overwrite": True}, "ok"),
        ("own output that is also an input", [("--out", own / "r.json")], [("--in", own / "r.json")], {"overwrite": True}, "error"),
        ("two outputs, one file", [("--out", own / "a.json"), ("--plot", own / "a.json")], [], {}, "error"),
        ("output inside an input folder, new file", [("--out", own / "new.json")], [("--dir", own)], {}, "ok"),
        ("output inside an input folder, existing", [("--out", own / "theirs.json")], [("--dir", own)], {"overwrite": True}, "error"),
        ("input missing (ignored)", [("--out", own / "n2.json")], [("--in", own / "missing.json")], {}, "ok"),
        ("a registry that is not JSON", [("--out", own / "theirs.json")], [], {}, "error"),
        ("output is the registry itself", [("--out", own / ".diasr-outputs.json")], [], {}, "error"),
        ("empty path", [("--out", "")], [], {}, "error"),
    ]:  # fmt: skip
        cases.append(Case("guard", what, lambda o=outputs, i=ins, k=kw: check_outputs(o, i, **k), expect, ("--out", "--plot"),
                          (own / "theirs.json",) if not kw.get("overwrite") else ()))  # fmt: skip
    return cases


def loader_cases(tmp: Path) -> list[Case]:
    from safetensors.torch import save_file

    from diasr_diffusers import DiasRPipeline
    from diasr_diffusers.pipelines.public_weights import load_original_wan_state_dict
    from diasr_diffusers.routing import IDRouter
    from diasr_diffusers.utils import checkpoint_paths as cp

    cp.hub_reachable = lambda timeout=3.0: False  # this machine is offline; make it explicit and fast
    d = tmp / "load"
    d.mkdir()
    (d / "empty").mkdir()
    (d / "file.txt").write_text("x")
    (d / "zero.pth").write_bytes(b"")
    (d / "random.pth").write_bytes(os.urandom(4096))
    (d / "pickle2.pth").write_bytes(b"\x80\x02" + os.urandom(100))
    torch.save({"a": torch.zeros(1)}, d / "plain.pth")
    save_file({"a": torch.zeros(1)}, str(d / "st_as.pth"))
    torch.save({"a": torch.zeros(1)}, d / "torch_as.safetensors")
    (d / "trunc.safetensors").write_bytes((d / "st_as.pth").read_bytes()[:20])
    (d / "text.safetensors").write_text("hello")
    for name, weight_map in [("list", ["a.safetensors"]), ("null", None), ("str", "a.safetensors"), ("ints", {"a": 1}),
                             ("escape", {"a": "../a.safetensors"}), ("empty", {}), ("absent", {"a": "nope.safetensors"})]:  # fmt: skip
        (d / f"{name}.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (d / "notjson.safetensors.index.json").write_text("{not json")
    (d / "array.safetensors.index.json").write_text("[1, 2]")
    (d / "deep.safetensors.index.json").write_text("[" * 100000)
    save_file({"a": torch.zeros(1), "b": torch.zeros(1)}, str(d / "m-00001-of-00002.safetensors"))
    save_file({"a": torch.ones(1)}, str(d / "m-00002-of-00002.safetensors"))
    save_file({"a": torch.zeros(1)}, str(d / "n-00001-of-00003.safetensors"))

    cases = []
    for what, value, expect, word in [
        ("a zero-byte .pth", d / "zero.pth", "error", "checkpoint"),
        ("random bytes .pth", d / "random.pth", "error", "checkpoint"),
        ("pickle header then garbage", d / "pickle2.pth", "error", "checkpoint"),
        ("a plain tensor .pth", d / "plain.pth", "ok", ""),
        ("safetensors named .pth", d / "st_as.pth", "ok", ""),
        ("torch file named .safetensors", d / "torch_as.safetensors", "error", "checkpoint"),
        ("truncated safetensors", d / "trunc.safetensors", "error", "checkpoint"),
        ("text named .safetensors", d / "text.safetensors", "error", "checkpoint"),
        ("an empty folder", d / "empty", "error", "checkpoint"),
        ("a .txt file", d / "file.txt", "error", "checkpoint"),
        ("one shard of two, keys in both", d / "m-00001-of-00002.safetensors", "error", "two shards"),
        ("one shard of three, two missing", d / "n-00001-of-00003.safetensors", "error", "missing shard"),
        ("an empty list of shards", [], "error", "checkpoint"),
        ("a list with a missing shard", [d / "nope.safetensors"], "error", "checkpoint"),
        *[(f"index whose weight_map is {n}", d / f"{n}.safetensors.index.json", "error", "checkpoint")
          for n in ("list", "null", "str", "ints", "escape", "empty", "absent", "notjson", "array", "deep")],
        ("a path that does not exist", d / "nope" / "x.pth", "error", "checkpoint"),
        ("a relative path that does not exist", "./nope/x.safetensors", "error", "checkpoint"),
    ]:  # fmt: skip
        cases.append(Case("loader: load_original_wan_state_dict", what, lambda v=value: load_original_wan_state_dict(v), expect, (word,)))
    for what, kwargs, sources, expect, word in [
        ("dtype 'bfloat16'", {"dtype": "bfloat16"}, {}, "ok", ""),
        ("dtype 'torch.float16'", {"torch_dtype": "torch.float16"}, {}, "ok", ""),
        ("dtype 'bf16'", {"dtype": "bf16"}, {}, "error", "dtype"),
        ("dtype 5", {"dtype": 5}, {}, "error", "dtype"),
        ("dtype torch.int8", {"dtype": torch.int8}, {}, "ok", ""),
        ("dtype ''", {"dtype": ""}, {}, "error", "dtype"),
        ("base: empty string", {}, {"base": ""}, "error", "base"),
        ("base: whitespace", {}, {"base": "   "}, "error", "base"),
        ("base: a file", {}, {"base": str(d / "file.txt")}, "error", "base"),
        ("base: ~/nope", {}, {"base": "~/nope_diasr_base"}, "error", "base"),
        ("base: a/b/c", {}, {"base": "a/b/c"}, "error", "base"),
        ("base: name with spaces", {}, {"base": "my base"}, "error", "base"),
        ("base: unicode name", {}, {"base": "Wan-AI/Wän"}, "error", "base"),
        ("base: 300-char name", {}, {"base": "x" * 300}, "error", "base"),
        ("base: an existing folder", {}, {"base": str(d / "empty")}, "ok", ""),
        ("base: trailing slash repo", {}, {"base": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers/"}, "error", "base"),
        ("checkpoint: repo id offline", {}, {"checkpoint": "bytedance-research/Phantom"}, "error", "hf download"),
        ("checkpoint: a folder", {}, {"checkpoint": str(d / "empty")}, "ok", ""),
        ("checkpoint: list of files", {}, {"checkpoint": [str(d / "plain.pth")]}, "ok", ""),
        ("checkpoint: list with a folder", {}, {"checkpoint": [str(d / "empty")]}, "error", "checkpoint"),
        ("id_router: a file", {}, {"id_router": str(d / "file.txt")}, "error", "id_router"),
        ("id_router: an object", {}, {"id_router": object()}, "ok", ""),
        ("id_router: None", {}, {"id_router": None}, "ok", ""),
        ("pretrained: Path object missing", {}, {"pretrained_model_name_or_path": d / "nope"}, "error", "does not exist"),
        ("pretrained: local_files_only repo", {"local_files_only": True}, {"pretrained_model_name_or_path": "org/model"}, "error", "local_files_only"),
        ("pretrained: HF cache_dir given", {"cache_dir": str(d)}, {"pretrained_model_name_or_path": "org/model"}, "error", str(d)),
    ]:  # fmt: skip
        cases.append(Case("loader: check_loader_sources", what, lambda k=kwargs, s=sources: cp.check_loader_sources(k, **s), expect, (word,)))
    for what, call, word in [
        ("from_pretrained on a file", lambda: DiasRPipeline.from_pretrained(str(d / "file.txt")), "pretrained"),
        ("from_pretrained on an empty folder", lambda: DiasRPipeline.from_pretrained(str(d / "empty")), "model_index"),
        ("from_pretrained typo repo offline", lambda: DiasRPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Difusers"), "Difusers"),
        ("from_phantom missing base", lambda: DiasRPipeline.from_phantom(d / "plain.pth", base=str(d / "nobase")), "base"),
        ("from_phantom dtype='float16' on bad file", lambda: DiasRPipeline.from_phantom(d / "random.pth", base=str(d / "empty"), dtype="float16"), "checkpoint"),
        ("from_skyreels_v3 on an empty folder", lambda: DiasRPipeline.from_skyreels_v3(str(d / "empty")), "transformer"),
        ("from_skyreels_v3 on a file", lambda: DiasRPipeline.from_skyreels_v3(str(d / "file.txt")), "pretrained"),
        ("IDRouter on an empty folder", lambda: IDRouter.from_pretrained(str(d / "empty")), "config"),
        ("IDRouter on a missing relative path", lambda: IDRouter.from_pretrained("./nope/router"), "does not exist"),
        ("IDRouter repo id offline", lambda: IDRouter.from_pretrained("org/router"), "org/router"),
    ]:  # fmt: skip
        cases.append(Case("loader: entry points", what, call, "error", (word,)))
    return cases


def check_cases() -> list[Case]:
    from diasr_diffusers.pipelines.checks import check_finite_tensors, check_int, check_real, frames_the_vae_makes

    cases = []
    for value, expect in [(1, "ok"), (0, "error"), (-1, "error"), (True, "error"), (False, "error"), (2**70, "ok"),
                          (np.int64(3), "ok"), (np.int8(-3), "error"), (1.0, "error"), ("3", "error"), (None, "error"),
                          (Fraction(3, 1), "error"), (torch.tensor(3), "error"), (3 + 0j, "error")]:  # fmt: skip
        cases.append(Case("checks: check_int", f"{value!r}", lambda v=value: check_int("num_frames", v, 1), expect, ("num_frames",)))
    for value, expect in [(0.0, "ok"), (-0.0, "ok"), (-1e-12, "error"), (float("nan"), "error"), (float("inf"), "error"),
                          (np.float32("nan"), "error"), (np.float64(2.5), "ok"), (Fraction(1, 3), "ok"), ("1.0", "error"),
                          (True, "error"), (None, "error"), (1e308, "ok"), (complex(1, 0), "error")]:  # fmt: skip
        cases.append(Case("checks: check_real", f"{value!r}", lambda v=value: check_real("eta", v, 0.0), expect, ("eta",)))
    nan = torch.tensor([float("nan")])
    for what, value, expect in [
        ("finite tensor", torch.ones(2), "ok"), ("nan tensor", nan, "error"), ("inf in bf16", torch.tensor([float("inf")], dtype=torch.bfloat16), "error"),
        ("int tensor", torch.ones(2, dtype=torch.int64), "error"), ("nested nan", [[torch.ones(1), nan]], "error"),
        ("tuple of finite", (torch.ones(1), torch.zeros(1)), "ok"), ("empty list", [], "ok"), ("None", None, "ok"),
        ("a string", "x", "error"), ("numpy array", np.ones(2), "error"), ("empty tensor", torch.ones(0), "ok"),
        ("nan in a meta-free complex", torch.tensor([1 + 1j]), "error"),
    ]:  # fmt: skip
        cases.append(Case("checks: check_finite_tensors", what, lambda v=value: check_finite_tensors("id_cond", v), expect, ("id_cond",)))
    for n, t, want in [(1, 4, 1), (5, 4, 5), (10, 4, 9), (49, 4, 49), (2, 4, 1), (9, 8, 9), (16, 8, 9)]:
        cases.append(Case("checks: frames_the_vae_makes", f"{n} frames, x{t}",
                          lambda n=n, t=t, w=want: None if frames_the_vae_makes(n, t) == w else (_ for _ in ()).throw(AssertionError(f"{frames_the_vae_makes(n, t)} != {w}")),
                          "ok"))  # fmt: skip
    return cases


def ingredients_cases() -> list[Case]:
    from diasr_diffusers import IngredientsPipeline
    from diasr_diffusers.utils.tiny_ingredients import TINY_INGREDIENTS_SIZE, tiny_faces, tiny_ingredients_components

    pipe = IngredientsPipeline(**tiny_ingredients_components())
    pipe.set_progress_bar_config(disable=True)
    first = __import__("PIL.Image").Image.new("RGB", (96, 64), "white")
    c, v = tiny_faces(2)

    def call(**kw):
        args = {**TINY_INGREDIENTS_SIZE, "prompt": "the man and the woman", "image": first, "id_cond": c,
                "id_vit_hidden": v, "num_inference_steps": 1, "output_type": "latent",
                "generator": torch.Generator().manual_seed(0), **kw}  # fmt: skip
        return pipe(**args).frames.shape

    cases = []
    for what, kw, expect, word in [
        ("defaults", {}, "ok", ""),
        ("guidance 0", {"guidance_scale": 0.0}, "ok", ""),
        ("guidance -0.1", {"guidance_scale": -0.1}, "error", "guidance_scale"),
        ("guidance nan", {"guidance_scale": float("nan")}, "error", "guidance_scale"),
        ("eta 1e9", {"eta": 1e9}, "ok", ""),
        ("eta -1", {"eta": -1}, "error", "eta"),
        ("eta '0'", {"eta": "0"}, "error", "eta"),
        ("max_sequence_length -1", {"max_sequence_length": -1}, "error", "max_sequence_length"),
        ("max_sequence_length 2.0", {"max_sequence_length": 2.0}, "error", "max_sequence_length"),
        ("num_frames 0", {"num_frames": 0}, "error", "num_frames"),
        ("num_frames 10 (warns, 9 used)", {"num_frames": 10}, "ok", ""),
        ("num_frames np.int64(9)", {"num_frames": np.int64(9)}, "ok", ""),
        ("latents int64", {"latents": torch.zeros(1, 3, 4, 8, 12, dtype=torch.int64)}, "error", "latents"),
        ("latents 4-D", {"latents": torch.zeros(3, 4, 8, 12)}, "error", "latents"),
        ("latents with inf", {"latents": torch.full((1, 3, 4, 8, 12), float("inf"))}, "error", "latents"),
        ("latents right shape", {"latents": torch.zeros(1, 3, 4, 8, 12)}, "ok", ""),
        ("id_cond nan in identity 0", {"id_cond": [c[0] * float("nan"), c[1]]}, "error", "id_cond"),
        ("id_cond int tensors", {"id_cond": [x.long() for x in c]}, "error", "id_cond"),
        ("id_vit_hidden inf", {"id_vit_hidden": [[t * float("inf") for t in v[0]], v[1]]}, "error", "id_vit_hidden"),
        ("id_vit_hidden strings", {"id_vit_hidden": [["a", "b"], v[1]]}, "error", "id_vit_hidden"),
        ("id_cond only", {"id_vit_hidden": None}, "error", "id_vit_hidden"),
        ("num_videos_per_prompt 2", {"num_videos_per_prompt": 2}, "ok", ""),
    ]:  # fmt: skip
        cases.append(Case("pipeline: IngredientsPipeline", what, lambda k=kw: call(**k), expect, (word,)))
    return cases


def mask_cases() -> list[Case]:
    from diasr_diffusers.routing import check_layout_masks, layout_labels

    cases = []

    def cov(*subjects):  # each subject: a 2x2 grid of coverages
        return torch.tensor([[[[s]] for s in subjects]], dtype=torch.float32).reshape(1, len(subjects), 1, 2, 2)

    for what, coverage, expect, word in [
        ("disjoint halves", cov([[1, 0], [1, 0]], [[0, 1], [0, 1]]), "ok", ""),
        ("identical masks", cov([[1, 1], [1, 1]], [[1, 1], [1, 1]]), "error", "subject_masks[1]"),
        ("nested: small over large", cov([[1, 1], [1, 1]], [[1, 0], [0, 0]]), "ok", ""),
        ("nested: large over small (order swapped)", cov([[1, 0], [0, 0]], [[1, 1], [1, 1]]), "ok", ""),
        ("one subject, all", cov([[1, 1], [1, 1]]), "ok", ""),
        ("one subject, too small", cov([[0.2, 0], [0, 0]]), "error", "subject_masks[0]"),
        ("three, two identical small", cov([[1, 1], [1, 1]], [[1, 0], [0, 0]], [[1, 0], [0, 0]]), "error", "subject_masks[2]"),
        ("half coverage exactly", cov([[0.5, 0], [0, 0]], [[0, 1], [1, 1]]), "ok", ""),
        ("coverage > 1", cov([[1.5, 0], [0, 0]], [[0, 1], [1, 1]]), "error", "coverage"),
        ("NaN coverage", cov([[float("nan"), 0], [0, 0]], [[0, 1], [1, 1]]), "error", "coverage"),
        ("no subjects", torch.zeros(1, 0, 1, 2, 2), "ok", ""),
        ("(B, N, L) layout", torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), "ok", ""),
        ("batch of 2, second loses a subject", torch.cat([cov([[1, 0], [1, 0]], [[0, 1], [0, 1]]), cov([[1, 1], [1, 1]], [[0, 0], [0, 0]])]), "error", "subject_masks[1]"),
    ]:  # fmt: skip
        cases.append(Case("masks: layout_labels", what, lambda c=coverage: layout_labels(c), expect, (word,)))
    for what, masks, expect, word in [
        ("uint8 255", np.full((2, 8, 8), 255, np.uint8), "ok", ""),
        ("uint8 one empty", np.stack([np.full((8, 8), 255, np.uint8), np.zeros((8, 8), np.uint8)]), "error", "subject_masks[1]"),
        ("bool all false", np.zeros((2, 8, 8), bool), "error", "subject_masks[0]"),
        ("float tiny positive", np.full((1, 8, 8), 1e-9, np.float32), "ok", ""),
        ("label map 0..2", np.array([[[0, 1, 2]]]), "error", "subject_masks"),
        ("negative floats", -np.ones((1, 4, 4), np.float32), "error", "subject_masks"),
        ("object array", np.array([[["a"]]], dtype=object), "error", "subject_masks"),
        ("a list", [[[1]]], "error", "subject_masks"),
        ("4-D, empty in frame 0 only", np.concatenate([np.zeros((1, 1, 4, 4)), np.ones((1, 2, 4, 4))], axis=1), "ok", ""),
        ("2-D", np.ones((4, 4)), "ok", ""),
    ]:  # fmt: skip
        cases.append(Case("masks: check_layout_masks", what, lambda m=masks: check_layout_masks(m), expect, (word,)))
    return cases


def app_cases() -> list[Case]:
    from diasr_diffusers.app import AppSettings, DiasRApp
    from diasr_diffusers.utils.toy import load_sprite_model, sprite_model_path

    pipe = load_sprite_model()
    app = DiasRApp(pipe, AppSettings.for_sprite_model(), checkpoint=sprite_model_path())
    empty = ["", [], None] * app.max_subjects
    base = {"prompt": "the star", "routing": "similarity", "num_frames": 9, "height": 64, "width": 64, "steps": 2,
            "guidance": 4.0, "seed": 0}  # fmt: skip

    def parse(**kw):
        v = {**base, **kw}
        return app.parse(v["prompt"], v["routing"], v["num_frames"], v["height"], v["width"], v["steps"], v["guidance"], v["seed"], *empty)

    cases = []
    for what, kw, expect, word in [
        ("defaults", {}, "ok", ""),
        ("frames True", {"num_frames": True}, "error", "Frames"),
        ("frames '9'", {"num_frames": "9"}, "error", "Frames"),
        ("frames 9.0", {"num_frames": 9.0}, "ok", ""),
        ("frames np.int64(9)", {"num_frames": np.int64(9)}, "ok", ""),
        ("frames 9.5", {"num_frames": 9.5}, "error", "Frames"),
        ("frames inf", {"num_frames": float("inf")}, "error", "Frames"),
        ("frames nan", {"num_frames": float("nan")}, "error", "Frames"),
        ("frames None", {"num_frames": None}, "error", "Frames"),
        ("frames 10**30", {"num_frames": 10**30}, "error", "Frames"),
        ("frames -9", {"num_frames": -9}, "error", "Frames"),
        ("height 0", {"height": 0}, "error", "Height"),
        ("height 1e9", {"height": 1e9}, "error", "Height"),
        ("width [64]", {"width": [64]}, "error", "Width"),
        ("steps 201", {"steps": 201}, "error", "Steps"),
        ("steps 200", {"steps": 200}, "ok", ""),
        ("steps 0", {"steps": 0}, "error", "Steps"),
        ("seed 1.5", {"seed": 1.5}, "error", "Seed"),
        ("seed 2**63", {"seed": 2**63}, "error", "Seed"),
        ("seed 2**63-1", {"seed": 2**63 - 1}, "ok", ""),
        ("seed False", {"seed": False}, "error", "Seed"),
        ("seed -0.0", {"seed": -0.0}, "ok", ""),
        ("guidance True", {"guidance": True}, "error", "Guidance"),
        ("guidance '4'", {"guidance": "4"}, "error", "Guidance"),
        ("guidance inf", {"guidance": float("inf")}, "error", "Guidance"),
        ("guidance -1e-9", {"guidance": -1e-9}, "error", "Guidance"),
        ("guidance 0", {"guidance": 0}, "ok", ""),
        ("routing 'auto'", {"routing": "auto"}, "error", "Routing"),
        ("routing None", {"routing": None}, "error", "Routing"),
        ("prompt None", {"prompt": None}, "error", "prompt"),
    ]:  # fmt: skip
        cases.append(Case("page: DiasRApp.parse", what, lambda k=kw: parse(**k), expect, (word,)))
    return cases


def cache_cases() -> list[Case]:
    from diasr_diffusers.data.dataset import weights_sha256

    class M(torch.nn.Module):
        def __init__(self, dtype=torch.float32, scalar=False):
            super().__init__()
            self.w = torch.nn.Parameter(torch.arange(6, dtype=dtype).reshape(2, 3).t())  # non-contiguous
            if scalar:
                self.register_buffer("s", torch.tensor(1.0))

    def differs(a, b):
        if weights_sha256(a) == weights_sha256(b):
            raise AssertionError("two different modules hash the same")

    m = M()
    n = M()
    with torch.no_grad():
        n.w[0, 0] += 1e-6
    return [
        Case("cache: weights_sha256", "non-contiguous fp32", lambda: weights_sha256(M()), "ok"),
        Case("cache: weights_sha256", "bf16", lambda: weights_sha256(M(torch.bfloat16)), "ok"),
        Case("cache: weights_sha256", "0-dim buffer", lambda: weights_sha256(M(scalar=True)), "ok"),
        Case("cache: weights_sha256", "one ulp-ish change is seen", lambda: differs(m, n), "ok"),
        Case("cache: weights_sha256", "dtype change is seen", lambda: differs(M(), M(torch.float64)), "ok"),
        Case("cache: weights_sha256", "same weights hash the same", lambda: weights_sha256(M()) == weights_sha256(M()) or (_ for _ in ()).throw(AssertionError()), "ok"),
    ]  # fmt: skip


def second_batch_cases(tmp: Path) -> list[Case]:
    """Written after the first count came back clean, to push harder on the same surface (outputs of generate,
    demo and train; odd registries and path strings; ambiguous weight folders; odd page and pipeline values)."""
    from PIL import Image
    from safetensors.torch import save_file

    from diasr_diffusers import DiasRPipeline, IngredientsPipeline
    from diasr_diffusers.cli import main
    from diasr_diffusers.routing import layout_labels
    from diasr_diffusers.utils.output_paths import REGISTRY_NAME, check_outputs
    from diasr_diffusers.utils.tiny_ingredients import TINY_INGREDIENTS_SIZE, tiny_faces, tiny_ingredients_components

    d = tmp / "b2"
    (d / "model").mkdir(parents=True)
    (d / "model" / "model_index.json").write_text("{}")
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(d / "man.png")
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(d / "left.png")
    save_file({"a": torch.zeros(1)}, str(d / "lora.safetensors"))
    (d / "video.mp4").write_bytes(b"user video")
    protected = (d / "man.png", d / "left.png", d / "lora.safetensors", d / "video.mp4", d / "model" / "model_index.json")
    gen = ["generate", "--model", str(d / "model"), "--prompt", "the man walks", "--device", "cpu", "--height", "32",
           "--width", "32", "--subject", f"the man={d / 'man.png'}"]  # fmt: skip
    cases = []
    for what, extra, expect, word in [
        ("--out onto the --mask png (renamed)", ["--mask", f"the man={d / 'left.png'}", "--out", "LEFT_LINK"], "error", "--mask"),
        ("--out onto the --lora file (link)", ["--lora", str(d / "lora.safetensors"), "--out", "LORA_LINK"], "error", "--lora"),
        ("--out inside the --model folder onto its index (link)", ["--out", "INDEX_LINK"], "error", "--model"),
        ("--routing-maps onto a user's video with --overwrite", ["--out", str(d / "o1.mp4"), "--routing-maps", str(d / "video.mp4"), "--overwrite"], "ok-guard", ""),
        ("--out with a NUL byte", ["--out", "a\x00b.mp4"], "error", "--out"),
        ("--out 5000 characters", ["--out", "x" * 5000 + ".mp4"], "error", "--out"),
        ("--out in a folder under a file", ["--out", str(d / "man.png" / "o.mp4")], "error", "--out"),
    ]:  # fmt: skip
        links = {"LEFT_LINK": (d / "left_link.mp4", d / "left.png"), "LORA_LINK": (d / "lora_link.mp4", d / "lora.safetensors"),
                 "INDEX_LINK": (d / "model" / "index_link.mp4", d / "model" / "model_index.json")}  # fmt: skip
        argv = [*gen]
        for e in extra:
            if e in links:
                link, target = links[e]
                if not link.exists():
                    link.symlink_to(target)
                e = str(link)
            argv.append(e)
        if expect == "ok-guard":
            # The guard must let it through (the model is not a real one: the next error is about --model).
            cases.append(Case("cli generate outputs (2)", what, lambda a=argv: main(a), "error", ("--model",), protected[:-1]))
        else:
            cases.append(Case("cli generate outputs (2)", what, lambda a=argv: main(a), expect, (word,), protected))
    # demo: refused before any work, else it would run the model (seconds)
    demo_dir = d / "demo"

    def demo_mp4_folder():
        (demo_dir / "sub" / "demo.mp4").mkdir(parents=True)
        return main(["demo", "--out", str(demo_dir / "sub")])

    demo_dir.mkdir()
    (demo_dir / "scores.json").write_text("mine")
    cases += [
        Case("cli demo --out", "a foreign scores.json", lambda: main(["demo", "--out", str(demo_dir)]), "error", ("--overwrite",), (demo_dir / "scores.json",)),
        Case("cli demo --out", "a file", lambda: main(["demo", "--out", str(d / "man.png")]), "error", ("--out",), (d / "man.png",)),
        Case("cli demo --out", "under a file", lambda: main(["demo", "--out", str(d / "man.png" / "x")]), "error", ("--out",), (d / "man.png",)),
        Case("cli demo --out", "demo.mp4 is a folder", demo_mp4_folder, "error", ("--out",)),
    ]  # fmt: skip
    # train's output folder
    from diasr_diffusers.data import make_synthetic
    from diasr_diffusers.training import DiasRTrainer, TrainConfig

    make_synthetic(d / "data", num_clips=2, seed=0, subjects=(1, 2), num_frames=5, height=32, width=32)
    tiny = {"num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2, "ffn_dim": 32, "text_dim": 32}

    def trainer(out, resume=False):
        cfg = TrainConfig.from_dict({"stage": "route", "allow_scratch": True, "train_data": str(d / "data"),
                                     "tiny_model": tiny, "height": 32, "width": 32, "num_frames": 5, "max_steps": 1})  # fmt: skip
        return DiasRTrainer(cfg, out, resume=resume).check_output_dir()

    for i, (what, setup, resume, expect, word) in enumerate([
        ("foreign router/ folder", lambda o: (o / "router").mkdir(parents=True), False, "error", "router"),
        ("foreign LoRA file", lambda o: o.mkdir() or (o / "pytorch_lora_weights.safetensors").write_bytes(b"x"), False, "error", "pytorch_lora_weights"),
        ("foreign metrics.jsonl", lambda o: o.mkdir() or (o / "metrics.jsonl").write_text("{}"), False, "error", "metrics.jsonl"),
        ("foreign eval.json", lambda o: o.mkdir() or (o / "eval.json").write_text("{}"), False, "error", "eval.json"),
        ("unrelated user files", lambda o: o.mkdir() or (o / "notes.txt").write_text("x"), False, "ok", ""),
        ("output dir is a file", lambda o: o.write_text("x"), False, "error", "folder"),
        ("resume with nothing", lambda o: o.mkdir(), True, "error", "--resume"),
        ("a second fresh run in its own folder", lambda o: trainer(o), False, "ok", ""),
    ]):  # fmt: skip
        out = d / f"run{i}"
        setup(out)
        files = tuple(p for p in out.rglob("*") if p.is_file()) if out.is_dir() else ((out,) if out.exists() else ())
        cases.append(Case("train --output-dir", what, lambda o=out, r=resume: trainer(o, r), expect, (word, "output"), files))
    # odd registries and path strings for the guard
    reg = d / "reg"
    reg.mkdir()
    (reg / "t.json").write_text("theirs")
    for what, content, expect in [("a registry that is a JSON object", '{"t.json": true}', "error"),
                                  ("a registry listing numbers", "[1, 2]", "error"),
                                  ("a registry of 10 MB garbage", "x" * 10_000_000, "error")]:  # fmt: skip
        def with_registry(c=content):
            (reg / REGISTRY_NAME).write_text(c)
            return check_outputs([("--out", reg / "t.json")])

        cases.append(Case("guard (2)", what, with_registry, expect, ("--overwrite",), (reg / "t.json",)))
    (reg / "loop").symlink_to(reg / "loop")

    def registry_folder():
        (reg / "sub" / REGISTRY_NAME).mkdir(parents=True)
        (reg / "sub" / "x").write_text("x")
        return check_outputs([("--out", reg / "sub" / "x")])

    cases += [
        Case("guard (2)", "a symlink loop as output", lambda: check_outputs([("--out", reg / "loop")]), "error", ("--out",)),
        Case("guard (2)", "NUL byte in a path", lambda: check_outputs([("--out", "a\x00b")]), "error", ("--out",)),
        Case("guard (2)", "registry as a folder", registry_folder, "error", ("--overwrite",)),
    ]  # fmt: skip
    # ambiguous weight folders
    amb = d / "amb"
    amb.mkdir()
    torch.save({"a": torch.zeros(1)}, amb / "a.pth")
    save_file({"a": torch.zeros(1)}, str(amb / "b.safetensors"))
    only_index = d / "only_index"
    only_index.mkdir()
    (only_index / "x.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "x-00001-of-00001.safetensors"}}))
    cases += [
        Case("loader (2)", "a folder with a .pth and a .safetensors", lambda: DiasRPipeline.from_phantom(amb, base=str(d / "model")), "error", ("checkpoint",)),
        Case("loader (2)", "an index without its shard", lambda: DiasRPipeline.from_phantom(only_index, base=str(d / "model")), "error", ("checkpoint",)),
        Case("loader (2)", "from_pretrained on a folder without model_index", lambda: DiasRPipeline.from_pretrained(str(amb)), "error", ("model_index",)),
        Case("loader (2)", "from_phantom size='7B' offline", lambda: DiasRPipeline.from_phantom("bytedance-research/Phantom", size="7B"), "error", ("size", "Phantom")),
        Case("loader (2)", "from_phantom dtype 'float64' on a good folder", lambda: DiasRPipeline.from_phantom(amb / "a.pth", base=str(d / "model"), dtype="float64"), "error", ("checkpoint",)),
    ]  # fmt: skip
    # layout masks: odd thresholds and types
    cov = torch.zeros(1, 2, 1, 2, 2)
    cov[0, 0, 0, :, 0] = 1
    cov[0, 1, 0, :, 1] = 1
    cases += [
        Case("masks (2)", "threshold 0", lambda: layout_labels(cov, threshold=0), "error", ("threshold",)),
        Case("masks (2)", "threshold 1.5", lambda: layout_labels(cov, threshold=1.5), "error", ("threshold",)),
        Case("masks (2)", "threshold True", lambda: layout_labels(cov, threshold=True), "error", ("threshold",)),
        Case("masks (2)", "int coverage 0/1", lambda: layout_labels(cov.long()), "ok"),
        Case("masks (2)", "4-D coverage", lambda: layout_labels(cov[0]), "error", ("coverage",)),
        Case("masks (2)", "a list", lambda: layout_labels([[[1.0]]]), "error", ("coverage",)),
    ]  # fmt: skip
    # Ingredients: odd calls
    pipe = IngredientsPipeline(**tiny_ingredients_components())
    pipe.set_progress_bar_config(disable=True)
    c, v = tiny_faces(2)
    first = Image.new("RGB", (96, 64), "white")

    def call(**kw):
        args = {**TINY_INGREDIENTS_SIZE, "prompt": "the man and the woman", "image": first, "id_cond": c,
                "id_vit_hidden": v, "num_inference_steps": 1, "output_type": "latent",
                "generator": torch.Generator().manual_seed(0), **kw}  # fmt: skip
        return pipe(**args).frames.shape

    for what, kw, expect, word in [
        ("routing 'HARD'", {"routing": "HARD"}, "error", "routing"),
        ("face_images []", {"face_images": [], "id_cond": None, "id_vit_hidden": None}, "error", "face_images"),
        ("two prompts, latents for one", {"prompt": ["a", "b"], "latents": torch.zeros(1, 3, 4, 8, 12)}, "error", "latents"),
        ("prompt_embeds and latents batch 2", {"prompt": None, "prompt_embeds": torch.zeros(2, 16, 32), "latents": torch.zeros(1, 3, 4, 8, 12)}, "error", "latents"),
        ("height 60", {"height": 60}, "error", "height"),
        ("num_inference_steps 10**6 (refused? no: allowed)", {"num_inference_steps": np.int64(1)}, "ok", ""),
        ("guidance_scale np.float32(1.5)", {"guidance_scale": np.float32(1.5)}, "ok", ""),
        ("eta Fraction(1, 2)", {"eta": Fraction(1, 2)}, "ok", ""),
        ("id_cond a tensor, not a list", {"id_cond": c[0]}, "error", "id_cond"),
        ("id_vit_hidden empty lists", {"id_vit_hidden": [[], []]}, "error", "id_vit_hidden"),
    ]:  # fmt: skip
        cases.append(Case("pipeline: IngredientsPipeline (2)", what, lambda k=kw: call(**k), expect, (word,)))
    return cases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--only", default=None, help="run only groups containing this word")
    parser.add_argument("--verbose", action="store_true", help="print every input's outcome and message")
    args = parser.parse_args()
    import logging

    logging.disable(logging.WARNING)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hostile2-") as tmp:
        tmp = Path(tmp)
        cases = [*output_guard_cases(tmp), *loader_cases(tmp), *check_cases(), *mask_cases(), *cache_cases(),
                 *ingredients_cases(), *app_cases(), *second_batch_cases(tmp)]  # fmt: skip
        if args.only:
            cases = [c for c in cases if args.only in c.group]
        results = [classify(c) for c in cases]
    counts = Counter(r.outcome for r in results)
    by_group: dict[str, Counter] = {}
    for r in results:
        by_group.setdefault(r.case.group, Counter())[r.outcome] += 1
    order = ["ok", "clear", "unclear", "crash", "hang", "silent", "data loss"]
    if args.markdown:
        print("| group | inputs | " + " | ".join(order) + " |")
        print("|---|---:|" + "---:|" * len(order))
        for group, c in by_group.items():
            print(f"| {group} | {sum(c.values())} | " + " | ".join(str(c.get(k, 0)) for k in order) + " |")
        print(f"| **all** | **{len(results)}** | " + " | ".join(f"**{counts.get(k, 0)}**" for k in order) + " |")
    else:
        for r in results:
            if args.verbose or r.outcome not in ("ok", "clear"):
                print(f"[{r.outcome}] {r.case.group} :: {r.case.name} :: {r.detail}")
        print(f"{len(results)} inputs in {time.perf_counter() - start:.0f} s: " + ", ".join(f"{k} {counts.get(k, 0)}" for k in order))
    return 0


if __name__ == "__main__":
    sys.exit(main())
