"""IngredientsPipeline: ConsisID parity, every CFG branch and batch element routed, routing maps, loading the released
folder layout (transformer_ema preferred), save/load, face preprocessing (composite, error paths), bad input."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import ConsisIDTransformer3DModel
from diffusers.pipelines.consisid.pipeline_consisid import ConsisIDPipeline

from diasr_diffusers import IngredientsPipeline, IngredientsTransformer3DModel
from diasr_diffusers.pipelines import ingredients_faces, pipeline_ingredients
from diasr_diffusers.pipelines.ingredients_faces import compose_first_frame, identity_condition
from diasr_diffusers.utils.tiny_ingredients import TINY_INGREDIENTS_SIZE, tiny_faces, tiny_ingredients_components

SIZE = TINY_INGREDIENTS_SIZE
FIRST = PIL.Image.new("RGB", (96, 64), "white")
PROMPT = "the man and the woman talk in the park"


@pytest.fixture(scope="module")
def pipe():
    return IngredientsPipeline(**tiny_ingredients_components())


def _run(pipe, seed=0, **kwargs):
    kwargs.setdefault("prompt", PROMPT)
    kwargs.setdefault("image", FIRST)
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("output_type", "latent")
    gen = kwargs.pop("generator", torch.Generator().manual_seed(seed))
    return pipe(generator=gen, **SIZE, **kwargs)


def test_one_identity_is_consisid(pipe):
    """With one identity the router's softmax is 1: the pipeline is ConsisIDPipeline on the same weights."""
    comps = tiny_ingredients_components()
    ours = IngredientsPipeline(**comps)
    cfg = {k: v for k, v in comps["transformer"].config.items() if not k.startswith("_")}
    cfg = {k: v for k, v in cfg.items() if k not in ("router_inner_dim", "max_identities")}
    stock = ConsisIDTransformer3DModel.from_config(cfg).eval()
    sd = {k: v for k, v in comps["transformer"].state_dict().items() if not k.startswith("router.")}
    stock.load_state_dict(sd, strict=True)
    consisid = ConsisIDPipeline(**{**comps, "transformer": stock})
    id_cond, id_vit = tiny_faces(1)
    out = _run(ours, id_cond=id_cond, id_vit_hidden=id_vit, output_type="np", guidance_scale=6.0).frames
    ref = consisid(
        image=FIRST, prompt=PROMPT, id_cond=id_cond[0], id_vit_hidden=id_vit[0], num_inference_steps=2,
        output_type="np", generator=torch.Generator().manual_seed(0), **SIZE,
    ).frames  # fmt: skip
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)
    # Not trivially equal: another face changes the video.
    other = _run(ours, id_cond=tiny_faces(1, seed=4)[0], id_vit_hidden=tiny_faces(1, seed=4)[1], output_type="np")
    assert np.abs(other.frames - ref).max() > 1e-4


def test_three_identities_batch_two_under_cfg(pipe):
    """Two prompts x CFG = a transformer batch of 4; each video (and its routing map) equals its own run."""
    id_cond, id_vit = tiny_faces(3)
    prompts = [PROMPT, "the dog sits near the red car"]
    gens = lambda: [torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)]  # noqa: E731
    shape = (2, 3, 4, 8, 12)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    both = _run(pipe, prompt=prompts, id_cond=id_cond, id_vit_hidden=id_vit, generator=gens(), latents=latents,
                return_routing_maps=True, routing="hard")  # fmt: skip
    assert both.routing_maps.shape == (2, 3, 4, 6) and both.routing_maps.dtype == torch.int64
    assert set(both.routing_maps.unique().tolist()) <= {0, 1, 2}
    for b in range(2):
        one = _run(pipe, prompt=prompts[b], id_cond=id_cond, id_vit_hidden=id_vit, latents=latents[b : b + 1],
                   generator=gens()[b], return_routing_maps=True, routing="hard")  # fmt: skip
        torch.testing.assert_close(both.frames[b : b + 1], one.frames, rtol=0, atol=1e-5)
        assert torch.equal(both.routing_maps[b : b + 1], one.routing_maps)
    assert not torch.equal(both.routing_maps[0], both.routing_maps[1])  # each element has its own map
    # Per-video faces (a leading batch dimension): video b is its own run with its own faces.
    other_cond, other_vit = tiny_faces(3, seed=8)
    per_cond = [torch.cat([a, b]) for a, b in zip(id_cond, other_cond)]
    per_vit = [[torch.cat([a, b]) for a, b in zip(va, vb)] for va, vb in zip(id_vit, other_vit)]
    mixed = _run(pipe, prompt=prompts, id_cond=per_cond, id_vit_hidden=per_vit, generator=gens(), latents=latents)
    second = _run(pipe, prompt=prompts[1], id_cond=other_cond, id_vit_hidden=other_vit, latents=latents[1:],
                  generator=gens()[1])  # fmt: skip
    torch.testing.assert_close(mixed.frames[1:], second.frames, rtol=0, atol=1e-5)


def test_hard_soft_and_routing_maps_follow_the_last_step(pipe):
    id_cond, id_vit = tiny_faces(2)
    seen = {}

    def grab(p, i, t, kw):
        seen[i] = kw["latents"].clone()
        return {}

    soft = _run(pipe, id_cond=id_cond, id_vit_hidden=id_vit, return_routing_maps=True, callback_on_step_end=grab)
    hard = _run(pipe, id_cond=id_cond, id_vit_hidden=id_vit, routing="hard", return_routing_maps=True)
    assert sorted(seen) == [0, 1] and torch.equal(seen[1], soft.frames)
    assert (soft.frames - hard.frames).abs().max() > 1e-5
    assert soft.routing_maps.shape == (1, 3, 4, 6)
    plain = _run(pipe, id_cond=id_cond, id_vit_hidden=id_vit)
    assert plain.routing_maps is None and torch.equal(plain.frames, soft.frames)  # recording changes nothing
    video, maps = _run(pipe, id_cond=id_cond, id_vit_hidden=id_vit, return_dict=False, return_routing_maps=True)
    assert torch.equal(maps, soft.routing_maps)


def test_released_folder_prefers_transformer_ema_and_round_trips(pipe, tmp_path, monkeypatch):
    id_cond, id_vit = tiny_faces(2)
    pipe.save_pretrained(tmp_path / "saved")
    again = IngredientsPipeline.from_pretrained(tmp_path / "saved")
    a = _run(pipe, id_cond=id_cond, id_vit_hidden=id_vit, routing="hard")
    b = _run(again, id_cond=id_cond, id_vit_hidden=id_vit, routing="hard")
    torch.testing.assert_close(a.frames, b.frames, rtol=0, atol=1e-6)
    # The released repo may hold transformer_ema/ next to transformer/: the EMA weights are the ones to use.
    ema = tiny_ingredients_components(seed=7)["transformer"]
    ema.save_pretrained(tmp_path / "saved" / "transformer_ema")
    with_ema = IngredientsPipeline.from_pretrained(tmp_path / "saved")
    assert torch.equal(with_ema.transformer.router[0].to_q.weight, ema.router[0].to_q.weight)
    plain = IngredientsPipeline.from_pretrained(tmp_path / "saved", transformer_subfolder="transformer")
    assert torch.equal(plain.transformer.router[0].to_q.weight, pipe.transformer.router[0].to_q.weight)
    # The released model_index.json names Diffusers' ConsisID classes (its pipeline class is not importable).
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    index.update(_class_name="ConsisIDPipeline", transformer=["diffusers", "ConsisIDTransformer3DModel"])
    (tmp_path / "saved" / "model_index.json").write_text(json.dumps(index))
    released = IngredientsPipeline.from_pretrained(tmp_path / "saved")
    assert isinstance(released, IngredientsPipeline) and isinstance(
        released.transformer, IngredientsTransformer3DModel
    )
    # A Hub id is fetched whole (face_encoder/ included) with snapshot_download, then loaded the same way.
    fetched = []
    monkeypatch.setattr("diasr_diffusers.utils.checkpoint_paths.check_hub_repo", lambda *a, **k: None)  # "online"
    monkeypatch.setattr(
        pipeline_ingredients, "snapshot_download", lambda repo, **kw: fetched.append(repo) or str(tmp_path / "saved")
    )
    assert isinstance(IngredientsPipeline.from_pretrained("feizhengcong/Ingredients"), IngredientsPipeline)
    assert fetched == ["feizhengcong/Ingredients"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no transformer"):
        IngredientsPipeline.from_pretrained(tmp_path / "empty")


def test_face_encoder_errors_name_what_is_missing(pipe, tmp_path, monkeypatch):
    missing = ingredients_faces.missing_face_packages()
    if missing:  # this machine: the heavy face packages are not installed
        with pytest.raises(ImportError, match="diasr-diffusers\\[ingredients\\]") as err:
            pipe.load_face_encoder(tmp_path)
        assert all(name in str(err.value) for name in missing)
    monkeypatch.setattr(ingredients_faces, "missing_face_packages", lambda: [])
    (tmp_path / "models" / "antelopev2").mkdir(parents=True)
    (tmp_path / "models" / "antelopev2" / "glintr100.onnx").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as err:
        pipe.load_face_encoder(tmp_path)
    assert "EVA02_CLIP_L_336_psz14_s6B.pt" in str(err.value) and "detection_Resnet50_Final.pth" in str(err.value)
    assert "glintr100" not in str(err.value)
    with pytest.raises(ValueError, match="`face_encoder_dir` is needed"):
        pipe.load_face_encoder()
    with pytest.raises(ValueError, match="load_face_encoder"):
        _run(pipe, face_images=[FIRST, FIRST])


def test_first_frame_composite_and_identity_condition():
    red = np.full((512, 512, 3), (200, 0, 0), np.uint8)
    blue = np.full((512, 512, 3), (0, 0, 200), np.uint8)
    frame = np.asarray(compose_first_frame([red, blue]))
    assert frame.shape == (480, 720, 3)
    assert (frame[:60] == 255).all() and (frame[420:] == 255).all()  # white above and below the faces
    assert (frame[60:420, :360] == (200, 0, 0)).all() and (frame[60:420, 360:] == (0, 0, 200)).all()
    three = np.asarray(compose_first_frame([red, blue, red]))  # 240-pixel squares, vertically centred
    assert (three[120:360, 240:480] == (0, 0, 200)).all() and (three[:120] == 255).all()
    glint, clip = torch.randn(512), torch.randn(1, 768) * 3
    cond = identity_condition(glint, clip)
    assert cond.shape == (1, 1280) and torch.equal(cond[0, :512], glint)
    torch.testing.assert_close(cond[0, 512:].norm(), torch.tensor(1.0))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"id_cond": None, "id_vit_hidden": None}, ValueError, "needs the faces"),
        ({"image": None}, ValueError, "pass the first frame as `image`"),
        ({"face_images": [FIRST]}, ValueError, "either `face_images` or precomputed"),
        ({"id_vit_hidden": None}, ValueError, "need both `id_cond` and `id_vit_hidden`"),
        ({"routing": "top1"}, ValueError, "`routing` must be one of"),
        ({"num_inference_steps": 0}, ValueError, "`num_inference_steps` must be >= 1"),
        ({"guidance_scale": float("nan")}, ValueError, "`guidance_scale` must be finite"),
        ({"faces": 5}, ValueError, "at most 4"),
        ({"faces": "mismatch"}, ValueError, "`id_cond` has 2 identities but `id_vit_hidden` has 1"),
        ({"faces": "batch3"}, ValueError, "one set per video \\(1\\)"),
    ],
)
def test_bad_input_is_refused_before_the_text_encoder(pipe, kwargs, error, match):
    id_cond, id_vit = tiny_faces(2)
    faces = kwargs.pop("faces", None)
    if faces == 5:
        id_cond, id_vit = tiny_faces(5)
    elif faces == "mismatch":
        id_vit = id_vit[:1]
    elif faces == "batch3":
        id_cond, id_vit = tiny_faces(2, batch=3)
    calls = []
    hook = pipe.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(error, match=match):
            _run(pipe, **{"id_cond": id_cond, "id_vit_hidden": id_vit, **kwargs})
    finally:
        hook.remove()
    assert not calls


def test_readme_tiny_example_runs(capsys):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(
        b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "tiny_ingredients_components" in b
    )
    namespace: dict = {}
    exec(compile(block, "README Ingredients example", "exec"), namespace)  # noqa: S102 - the README's own example
    assert namespace["out"].frames.shape == (2, 9, 64, 96, 3)
    assert tuple(namespace["out"].routing_maps.shape) == (2, 3, 4, 6)
    assert "(2, 9, 64, 96, 3) (2, 3, 4, 6)" in capsys.readouterr().out


class _FakeHelper:
    """facexlib's FaceRestoreHelper interface: reads BGR, 'aligns' by resizing the whole image to 512x512."""

    def clean_all(self):
        self.image, self.all_landmarks_5, self.cropped_faces = None, [], []

    def read_image(self, bgr):
        self.image = bgr

    def get_face_landmarks_5(self, only_center_face=False):
        self.all_landmarks_5 = [] if (self.image == 0).all() else [np.zeros((5, 2))]  # a black image has no face

    def align_warp_face(self):
        self.cropped_faces = [np.asarray(PIL.Image.fromarray(self.image).resize((512, 512)))]


class _FakeGlint:
    def get_feat(self, bgr):  # insightface reads BGR: the feature records the channel means in that order
        return np.concatenate([bgr.reshape(-1, 3).mean(0), np.zeros(509)]).astype(np.float32)[None]


class _FakeClip(torch.nn.Module):
    image_size = 336

    def forward(self, x, return_all_features=False, return_hidden=True, shuffle=False):
        assert x.shape == (1, 3, 336, 336)
        embed = torch.cat([x.mean((2, 3)), torch.ones(1, 765)], dim=1)  # per-channel means of the normalised RGB input
        return embed, [torch.full((1, 577, 1024), float(k)) for k in range(5)]


def test_face_encoder_assembles_the_released_features():
    """The glue around the face models (colour orders, normalisation, the composite), with stand-ins that expose
    what they were given: the real models are not installed here."""
    from diasr_diffusers.pipelines.ingredients_faces import IngredientsFaceEncoder

    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    encoder = IngredientsFaceEncoder(_FakeHelper(), _FakeGlint(), _FakeClip(), mean, std, "cpu", torch.float32)
    red = PIL.Image.new("RGB", (300, 200), (200, 10, 0))
    blue = np.zeros((1500, 900, 3), np.uint8)
    blue[..., 2] = 180  # long edge 1500 > 1024: resized first
    faces = encoder([red, blue])
    assert [c.shape for c in faces.id_cond] == [(1, 1280)] * 2 and len(faces.id_vit_hidden[1]) == 5
    torch.testing.assert_close(faces.id_cond[0][0, :3], torch.tensor([0.0, 10.0, 200.0]))  # BGR to insightface
    rgb = (torch.tensor([200.0, 10.0, 0.0]) / 255 - torch.tensor(mean)) / torch.tensor(std)  # RGB to EVA-CLIP
    clip = torch.cat([rgb, torch.ones(765)])
    torch.testing.assert_close(faces.id_cond[0][0, 512:], clip / clip.norm(), rtol=1e-4, atol=1e-4)
    frame = np.asarray(faces.first_frame)
    assert tuple(frame[240, 180]) == (200, 10, 0) and tuple(frame[240, 540]) == (0, 0, 180)  # RGB on the canvas
    assert faces.aligned_faces[0].shape == (512, 512, 3) and tuple(faces.aligned_faces[0][0, 0]) == (200, 10, 0)
    with pytest.raises(ValueError, match=r"no face found in `images\[1\]`"):
        encoder([red, np.zeros((64, 64, 3), np.uint8)])


def test_from_pretrained_passes_dtype_dicts_and_variant_to_the_transformer(pipe, tmp_path):
    """Diffusers' per-component ``torch_dtype`` dict and ``variant=`` reach the transformer, loaded separately."""
    pipe.save_pretrained(tmp_path / "saved", variant="fp16")
    loaded = IngredientsPipeline.from_pretrained(
        tmp_path / "saved", variant="fp16", torch_dtype={"transformer": torch.bfloat16, "default": torch.float32}
    )
    assert loaded.transformer.dtype == torch.bfloat16 and loaded.vae.dtype == torch.float32
    assert torch.equal(loaded.transformer.router[0].to_q.weight.float(),
                       pipe.transformer.router[0].to_q.weight.bfloat16().float())  # fmt: skip
    default_only = IngredientsPipeline.from_pretrained(tmp_path / "saved", variant="fp16", torch_dtype={"default": torch.bfloat16})  # fmt: skip
    assert default_only.transformer.dtype == torch.bfloat16


def test_signature_follows_consisid():
    """ConsisIDPipeline's arguments in its order and with its defaults; Ingredients' own are keyword-only."""
    import inspect

    from diffusers import ConsisIDPipeline

    ours = list(inspect.signature(IngredientsPipeline.__call__).parameters.values())[1:]
    stock = list(inspect.signature(ConsisIDPipeline.__call__).parameters.values())[1:]
    assert [p.name for p in ours[: len(stock)]] == [p.name for p in stock]
    # `image` may be left out (the faces' composite); every other default is ConsisID's.
    assert [p.default for p in ours[1 : len(stock)]] == [p.default for p in stock[1:]] and ours[0].default is None
    assert all(p.kind == inspect.Parameter.KEYWORD_ONLY for p in ours[len(stock) :])


# -- issue 25: the shared input checks -----------------------------------------------------------------------------


def _nan_in(x):
    x = x.clone()
    x.view(-1)[0] = float("nan")
    return x


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda c, v: {"id_cond": [_nan_in(c[0]), c[1]]}, ValueError, r"`id_cond\[0\]` holds NaN"),
        (lambda c, v: {"id_cond": [c[0], c[1] * float("inf")]}, ValueError, r"`id_cond\[1\]` holds NaN or infinite"),
        (lambda c, v: {"id_vit_hidden": [v[0], [v[1][0], _nan_in(v[1][1])]]}, ValueError,
         r"`id_vit_hidden\[1\]\[1\]` holds NaN"),
        (lambda c, v: {"latents": torch.full((1, 3, 4, 8, 12), float("nan"))}, ValueError, "`latents` holds NaN"),
        (lambda c, v: {"latents": torch.zeros(1, 3, 4, 8, 8)}, ValueError, r"`latents` must have shape .*\(1, 3, 4, 8, 12\)"),
        (lambda c, v: {"guidance_scale": -1.0}, ValueError, "`guidance_scale` must be >= 0"),
        (lambda c, v: {"eta": -0.5}, ValueError, "`eta` must be >= 0"),
        (lambda c, v: {"eta": float("nan")}, ValueError, "`eta` must be finite"),
        (lambda c, v: {"max_sequence_length": 0}, ValueError, "`max_sequence_length` must be >= 1"),
        (lambda c, v: {"num_frames": True}, TypeError, "`num_frames` must be an integer"),
    ],
)
def test_bad_numbers_and_tensors_are_refused_by_name(pipe, change, error, message):  # noqa: E501
    id_cond, id_vit = tiny_faces(2)
    kwargs = {**SIZE, "prompt": PROMPT, "image": FIRST, "num_inference_steps": 1, "output_type": "latent",
              "id_cond": id_cond, "id_vit_hidden": id_vit, **change(id_cond, id_vit)}  # fmt: skip
    with pytest.raises(error, match=message):  # was: an all-NaN video, accepted, or a torch.cat RuntimeError
        pipe(**kwargs)


def test_num_frames_off_the_vae_grid_warns_with_the_count_used(pipe, caplog):
    id_cond, id_vit = tiny_faces(2)
    requested = SIZE["num_frames"] + 1  # one past a 4k+1 count
    with caplog.at_level("WARNING"):
        out = pipe(prompt=PROMPT, image=FIRST, id_cond=id_cond, id_vit_hidden=id_vit, num_inference_steps=1,
                   output_type="np", generator=torch.Generator().manual_seed(0),
                   **{**SIZE, "num_frames": requested})  # fmt: skip
    assert f"got num_frames={requested}, generating {SIZE['num_frames']} frames" in caplog.text  # was silent
    assert out.frames.shape[1] == SIZE["num_frames"]
