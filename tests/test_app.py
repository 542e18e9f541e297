"""``diasr app``: the Gradio page on the embedded sprite model, driven through ``gradio_client`` against a running local
server, and once end to end in a real headless Chromium (Selenium + the system's chromedriver; skipped, saying why,
when either is missing: ``apt-get install chromium chromium-driver``).

The server runs in this process on a free local port for the whole module. Screenshots of the browser test go to
``$PYTEST_ARTIFACTS`` (default ``tests/artifacts/``, not committed).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

gr = pytest.importorskip("gradio", reason='the page needs the [app] extra: pip install -e ".[app]"')
gradio_client = pytest.importorskip("gradio_client")
iio = pytest.importorskip("imageio.v3")

from diasr_diffusers.app import AppSettings, DiasRApp, build_app  # noqa: E402
from diasr_diffusers.commands.generate import DEMO_PROMPT, DEMO_SUBJECTS  # noqa: E402
from diasr_diffusers.utils.toy import SPRITE_MODEL_SIZE, load_sprite_model, sprite_model_path  # noqa: E402

# A hung server or browser fails its test instead of the suite (pytest-timeout, in the [test] extra).
pytestmark = pytest.mark.timeout(300)

STEPS = 3  # few steps: the tests check the plumbing, not the pictures
RESULT_TIMEOUT = 120  # seconds for one generation to come back (a few seconds on a quiet CPU)
REFS = resources.files("diasr_diffusers") / "assets" / "sprite_refs"
PHRASES = [p for p, _ in DEMO_SUBJECTS]
REF_PATHS = [str(REFS / name) for _, name in DEMO_SUBJECTS]
SETTINGS = AppSettings.for_sprite_model()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pipe():
    pipe = load_sprite_model()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def server(pipe):
    """``(demo, url)``: the page on a free local port (another process may take a port between the pick and the
    launch, so it tries three)."""
    demo = build_app(pipe, SETTINGS, checkpoint=sprite_model_path())
    for attempt in range(3):
        port = _free_port()
        try:
            demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
            break
        except OSError:
            if attempt == 2:
                raise
    yield demo, f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    return gradio_client.Client(server[1], verbose=False)


def _request(**overrides):
    """Keyword arguments of the page's ``/generate`` endpoint: the demo's two sprites in slots 1 and 2."""
    from gradio_client import handle_file

    values = {
        "prompt": DEMO_PROMPT,
        "routing": "router",
        "frames": SPRITE_MODEL_SIZE["num_frames"],
        "height": SPRITE_MODEL_SIZE["height"],
        "width": SPRITE_MODEL_SIZE["width"],
        "steps": STEPS,
        "guidance": SETTINGS.guidance_scale,
        "seed": 3,
    }
    for slot in range(4):
        values[f"phrase_{slot + 1}"] = PHRASES[slot] if slot < 2 else ""
        values[f"images_{slot + 1}"] = [handle_file(REF_PATHS[slot])] if slot < 2 else []
        values[f"mask_{slot + 1}"] = None
    values.update(overrides)
    return values


def _shares(label: dict) -> dict[str, float]:
    return {c["label"]: c["confidence"] for c in label["confidences"]}


def _direct_shares(pipe, **kwargs) -> dict[str, float]:
    """The routing shares of the same generation run on the pipeline directly (the app must add nothing)."""
    import torch
    from PIL import Image

    out = pipe(
        prompt=DEMO_PROMPT,
        subject_images=[Image.open(p).convert("RGB") for p in REF_PATHS],
        subject_phrases=PHRASES,
        num_inference_steps=STEPS,
        guidance_scale=SETTINGS.guidance_scale,
        generator=torch.Generator().manual_seed(3),
        return_routing_maps=True,
        **SPRITE_MODEL_SIZE,
        **kwargs,
    )
    maps = out.routing_maps[0]
    shares = {p: float((maps == i).float().mean()) for i, p in enumerate(PHRASES)}
    shares["(null)"] = float((maps == -1).float().mean())
    return shares


def test_generate_with_the_embedded_model(client, pipe):
    job = client.submit(api_name="/generate", **_request())
    video, overlay, label = job.result(timeout=RESULT_TIMEOUT)
    frames = iio.imread(video)
    up = SETTINGS.upscale
    assert frames.shape == (SPRITE_MODEL_SIZE["num_frames"], 64 * up, 64 * up, 3)
    maps = iio.imread(overlay)
    # The overlay is the video tinted per subject, with the legend strip (16-pixel rows) below it.
    assert maps.shape[0] == frames.shape[0] and maps.shape[2] == frames.shape[2]
    assert maps.shape[1] > frames.shape[1] and (maps.shape[1] - frames.shape[1]) % 16 == 0
    shares = _shares(label)
    assert set(shares) == {*PHRASES, "(null)"}
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-6)
    # The page passes prompt, subjects, seed, steps and routing through unchanged: same routing as a direct call.
    direct = _direct_shares(pipe, routing="router")
    assert shares == pytest.approx(direct, abs=1e-6)


def test_validation_errors_name_the_field_and_nothing_runs(client, server):
    from gradio_client.exceptions import ValidationError

    app: DiasRApp = server[0].diasr_app
    cases = [
        # (overrides, field, words of the message)
        ({"phrase_2": "the green moon"}, "phrase_2", "'the green moon' does not occur in the prompt"),
        ({"images_1": []}, "images_1", "Upload at least one reference image"),
        ({"prompt": "  "}, "prompt", "Write a prompt"),
        ({"frames": 99}, "frames", "Frames"),  # past the model's RoPE table (its VAE takes any frame count)
        ({"height": 70}, "height", "Height must be a multiple of 4"),  # the VAE x4, patch 1
        ({"routing": "masks"}, "mask_1", "Draw where this subject goes"),
        # Subjects in slots 1 and 3 (2 empty): the pipeline's "subject 1" is the page's subject 3.
        (
            {"phrase_2": "", "images_2": [], "phrase_3": "the green moon", "images_3": _request()["images_2"]},
            "phrase_3",
            "subject 3: phrase 'the green moon'",
        ),
    ]
    for overrides, field, words in cases:
        with pytest.raises(ValidationError) as info:
            client.predict(api_name="/generate", **_request(**overrides))
        text = str(info.value)
        assert words in text, (overrides, text)
        # Reported for that one parameter (the page shows it next to that field).
        assert f"1 parameter(s) failed validation:\n- {field}: " in text, (overrides, text)
        assert "Traceback" not in text
    # The same checks guard the function itself (API callers that skip the validator get one sentence too).
    values = list(_request(phrase_2="the green moon").values())
    values = [[v["path"] for v in x] if isinstance(x, list) else x for x in values]
    with pytest.raises(gr.Error, match="does not occur in the prompt"):
        app.generate(*values)


def _mask_png(columns: slice, size: tuple[int, int]) -> str:
    """A mask as the page's canvas sends it: white strokes over black, at the canvas size."""
    from PIL import Image

    canvas = np.zeros((size[1], size[0], 4), np.uint8)
    canvas[..., 3] = 255
    canvas[:, columns, :3] = 255
    path = tempfile.NamedTemporaryFile(suffix=".png", delete=False).name
    Image.fromarray(canvas).save(path)
    return path


def test_masks_mode_routes_where_the_masks_are_drawn(client):
    from gradio_client import handle_file

    app_canvas = (256, 256)  # the sprite model's 64x64 frames: a square canvas (MASK_CANVAS)
    left_quarter, right_half = _mask_png(slice(0, 64), app_canvas), _mask_png(slice(128, 256), app_canvas)
    try:
        masks = {
            "mask_1": {"background": None, "layers": [], "composite": handle_file(left_quarter)},
            "mask_2": {"background": None, "layers": [], "composite": handle_file(right_half)},
        }
        job = client.submit(api_name="/generate", **_request(routing="masks", **masks))
        video, overlay, label = job.result(timeout=RESULT_TIMEOUT)
    finally:
        os.unlink(left_quarter)
        os.unlink(right_half)
    assert iio.imread(video).shape[0] == SPRITE_MODEL_SIZE["num_frames"] and overlay is not None
    # Token-aligned masks: a quarter of the tokens go to subject 1, half to subject 2, the rest to nobody.
    assert _shares(label) == pytest.approx({PHRASES[0]: 0.25, PHRASES[1]: 0.5, "(null)": 0.25}, abs=1e-6)


def test_second_request_is_queued_not_lost_and_progress_is_reported(client):
    from gradio_client.utils import Status

    jobs = [client.submit(api_name="/generate", **_request(seed=5)) for _ in range(2)]
    samples = []  # (status of job 0, status of job 1)
    deadline = time.monotonic() + 2 * RESULT_TIMEOUT
    while not all(job.done() for job in jobs) and time.monotonic() < deadline:
        samples.append(tuple(job.status() for job in jobs))
        time.sleep(0.02)
    results = [job.result(timeout=RESULT_TIMEOUT) for job in jobs]
    assert _shares(results[0][2]) == pytest.approx(_shares(results[1][2]))  # both ran: same inputs, same routing
    running = {Status.PROCESSING, Status.PROGRESS}
    # Whichever reached the server first ran while the other waited its turn (concurrency 1).
    waited = any({a.code, b.code} & running and Status.IN_QUEUE in (a.code, b.code) for a, b in samples)
    assert waited, sorted({(a.code.name, b.code.name) for a, b in samples})
    steps = {u.index for s in samples for j in s if j.progress_data for u in j.progress_data if u.desc == "Denoising"}
    assert steps and max(steps) == STEPS  # the pipeline's step callback drives the progress bar


# -- the command ------------------------------------------------------------------------------------------------------


def test_cli_checks_before_loading(tmp_path, capsys):
    from diasr_diffusers.cli import main

    with pytest.raises(SystemExit) as info:
        main(["app", "--port", "0"])
    assert info.value.code == 2 and "--port: must be in 1..65535" in capsys.readouterr().err
    assert main(["app", "--model", str(tmp_path / "missing")]) == 2
    assert "--model" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        assert main(["app", "--port", str(port)]) == 2
    assert f"--port {port} on 127.0.0.1 is taken" in capsys.readouterr().err
    assert time.monotonic() - start < 10  # refused before the model loads


def test_cli_serves_any_model_on_localhost(tmp_path, monkeypatch, capsys):
    """``diasr app --model FOLDER`` on a tiny random Wan2.1-architecture model (no router): the page's defaults fit
    the model, its functions generate, and it listens on 127.0.0.1 unless told otherwise."""
    from diasr_diffusers import DiasRPipeline
    from diasr_diffusers.cli import main
    from diasr_diffusers.utils.tiny import tiny_wan_components

    DiasRPipeline(**tiny_wan_components()).save_pretrained(tmp_path / "tiny")
    launched = {}

    def launch(demo, **kwargs):
        launched.update(kwargs, demo=demo)

    monkeypatch.setattr(gr.Blocks, "launch", launch)
    port = _free_port()
    assert main(["app", "--model", str(tmp_path / "tiny"), "--port", str(port)]) == 0
    assert launched["server_name"] == "127.0.0.1" and launched["server_port"] == port
    assert f"serving http://127.0.0.1:{port}/" in capsys.readouterr().out
    app: DiasRApp = launched["demo"].diasr_app
    assert app.routing_modes == ("similarity", "masks", "dense")  # no router in this model
    assert app.limits["max_size"] == 512 and app.settings.width == 512  # Wan's 832 does not fit its rope length
    values = dict.fromkeys(app.input_names())
    values.update(prompt="the man and the dog", routing="similarity", frames=5, height=32, width=32, steps=2,
                  guidance=1.0, seed=0, phrase_1="the man", images_1=[REF_PATHS[0]])  # fmt: skip
    video, overlay, shares = app.generate(*values.values())
    assert iio.imread(video).shape == (5, 32, 32, 3) and overlay is not None
    assert set(shares) == {"the man", "(null)"}
    # The pipeline's warnings reach the page (outside a request, gr.Warning is a Python warning).
    values.update(phrase_1="", images_1=None, routing="dense")
    with pytest.warns(UserWarning, match="Ignoring `routing='dense'`: no reference images"):
        video, overlay, shares = app.generate(*values.values())
    assert overlay is None and shares is None  # nothing routed, nothing to show


# -- a real browser ---------------------------------------------------------------------------------------------------


def _browser():
    """A headless Chromium driven by Selenium, or a skip saying what is missing (nothing is downloaded)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (in the [test] extra)")
    from selenium.webdriver.chrome.service import Service

    binary = next(
        (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None
    )
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip(
            "no headless browser: needs Chromium and its driver on PATH "
            f"(chromium: {binary or 'missing'}, chromedriver: {driver or 'missing'}); "
            "Debian/Ubuntu: apt-get install chromium chromium-driver"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic",
        "--window-size=1400,1900", f"--user-data-dir={tempfile.mkdtemp(prefix='diasr-chromium-')}",
    ):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def _artifacts() -> Path:
    folder = Path(os.environ.get("PYTEST_ARTIFACTS") or Path(__file__).parent / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_browser_end_to_end(server):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    try:
        browser.set_page_load_timeout(60)
        browser.get(server[1])
        wait = WebDriverWait(browser, RESULT_TIMEOUT, ignored_exceptions=[StaleElementReferenceException])

        def find(selector: str):
            return browser.find_element(By.CSS_SELECTOR, selector)

        def shown(selector: str) -> bool:  # in one script: a hidden component may be gone from the page meanwhile
            script = "const e = document.querySelector(arguments[0]); return !!e && e.getClientRects().length > 0"
            return browser.execute_script(script, selector)

        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#prompt textarea"))
        find("#prompt textarea").send_keys(DEMO_PROMPT)
        find("#add-subject").click()  # the page starts with one subject
        wait.until(lambda b: shown("#phrase-1 textarea"))
        find("#phrase-1 textarea").send_keys("left over")
        find("#remove-subject").click()  # hides the slot and clears it
        wait.until(lambda b: not shown("#phrase-1 textarea"))
        find("#add-subject").click()
        wait.until(lambda b: shown("#phrase-1 textarea"))
        assert find("#phrase-1 textarea").get_attribute("value") == ""
        find("#phrase-0 textarea").send_keys(PHRASES[0])
        find("#phrase-1 textarea").send_keys("the green moon")  # not in the prompt: refused next to the field
        for slot, path in enumerate(REF_PATHS):
            find(f"#images-{slot} input[type=file]").send_keys(path)
        # The file list shows each name as stem and suffix on separate lines.
        wait.until(lambda b: all(Path(p).stem in find(f"#images-{i}").text for i, p in enumerate(REF_PATHS)))

        find("#generate").click()
        wait.until(lambda b: "does not occur in the prompt" in find("#phrase-1 .validation-error").text)
        browser.save_screenshot(str(_artifacts() / "app_validation_error.png"))
        phrase = find("#phrase-1 textarea")
        phrase.send_keys(Keys.CONTROL, "a")
        phrase.send_keys(PHRASES[1])

        # Lay the subjects out: the star on the left, the circle on the right (strokes on each canvas).
        find("#routing input[value=masks]").click()
        for slot, dx in ((0, -55), (1, 55)):
            canvas = wait.until(lambda b, s=slot: [c for c in b.find_elements(By.CSS_SELECTOR, f"#mask-{s} canvas") if c.is_displayed()])[-1]  # fmt: skip
            stroke = ActionChains(browser, duration=50).move_to_element_with_offset(canvas, dx, -70).click_and_hold()
            stroke.move_by_offset(0, 140).release().perform()  # one straight stroke, top to bottom

        find("#generate").click()
        wait.until(
            lambda b: (
                b.find_elements(By.CSS_SELECTOR, "#video video[src]")
                and b.find_elements(By.CSS_SELECTOR, "#routing-overlay video[src]")
                and PHRASES[1] in find("#routing-shares").text
            )
        )
        assert not [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".validation-error") if e.text]
        video = find("#video video")
        wait.until(lambda b: b.execute_script("return arguments[0].readyState >= 2", video))  # a frame decoded
        assert browser.execute_script("return arguments[0].videoWidth", video) == 64 * SETTINGS.upscale
        shares = find("#routing-shares").text
        assert PHRASES[0] in shares and "(null)" in shares
        browser.execute_script("window.scrollTo(0, 0)")
        browser.save_screenshot(str(_artifacts() / "app.png"))
    except Exception:
        browser.save_screenshot(str(_artifacts() / "app_failure.png"))
        raise
    finally:
        browser.quit()


def test_api_callers_get_the_fields_own_limits_and_strict_numbers(client):
    # Issue 25: True became 1 frame, seed 1.5 was rounded by the form before the app's check, and a value past a
    # field's limit came back as a bare "400 Bad Request" naming no field.
    from gradio_client.exceptions import ValidationError

    cases = [
        ({"frames": True}, "frames", "Frames must be a whole number, got True"),
        ({"seed": 1.5}, "seed", "Seed must be a whole number, got 1.5"),
        ({"steps": 500}, "steps", "Steps must be between 1 and 200, got 500"),
        ({"height": 100000}, "height", "Height must be between"),
        ({"guidance": -2}, "guidance", "Guidance must be a number >= 0"),
        ({"seed": -1}, "seed", "Seed must be in [0, 2**63)"),
    ]
    for overrides, field, words in cases:
        with pytest.raises(ValidationError) as info:
            client.predict(api_name="/generate", **_request(**overrides))
        text = str(info.value)
        assert f"- {field}: " in text and words in text, (overrides, text)


def test_api_callers_may_leave_unused_subject_slots_out(client):
    values = {k: v for k, v in _request().items() if not k.endswith(("_3", "_4"))}  # was a TypeError: phrase_3
    video, _, label = client.predict(api_name="/generate", **values)
    assert os.path.isfile(video) and set(_shares(label)) == {*PHRASES, "(null)"}


def test_sprite_page_says_what_the_model_was_trained_for(server):
    radio = next(c for c in server[0].config["components"] if c.get("props", {}).get("elem_id") == "routing")
    assert "trained with its router" in radio["props"]["info"]
