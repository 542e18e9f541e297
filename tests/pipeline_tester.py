"""The checks every DiasR pipeline passes, the Diffusers way: a tester mixin plus one small config class per family.

:class:`SubjectPipelineTesterMixin` covers what Diffusers' ``PipelineTesterMixin``
(``tests/pipelines/test_pipelines_common.py``) checks of a pipeline: the stock calling convention (positional
arguments in the stock order and with its defaults, the extras keyword-only), ``callback_on_step_end`` and
``callback_on_step_end_tensor_inputs`` (what the callback receives, what it returns, ``test_callback_cfg``), the
components and optional components through ``save_pretrained`` / ``from_pretrained``, the output types and
``return_dict``, batches and ``num_videos_per_prompt``, the ``prompt_embeds`` path. On top: bit-identical frames to
the stock pipeline without subjects, and every routing mode with three-way guidance and routing maps.

A family's config class (in its test file) sets :attr:`pipeline_class` and :attr:`stock_class` and defines
:meth:`get_components` and :attr:`inputs` (tiny sizes, 2 steps); the rest has defaults.
"""

from __future__ import annotations

import inspect
import json
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from diasr_diffusers import IDRouter
from diasr_diffusers.pipelines.subjects import SubjectTrainingHooks


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class SubjectPipelineTesterMixin:
    pipeline_class: ClassVar[type]
    stock_class: ClassVar[type]
    prompt: ClassVar[str] = "the red star and the blue bottle dance in the park"
    phrases: ClassVar[list[str]] = ["the red star", "the blue bottle"]
    # The stock keyword inputs of every call after `prompt` (tiny sizes, 2 steps).
    inputs: ClassVar[dict[str, Any]]
    # Stock arguments whose default differs on purpose, with the reason (checked to exist).
    default_exceptions: ClassVar[dict[str, str]] = {}
    # Keyword arguments of the DiasR call the stock pipeline does not take (dropped for the stock call).
    diasr_only_inputs: ClassVar[tuple[str, ...]] = ()
    # Denoising steps of the checks that do not need the configured ones (the suite's time); None: `inputs`'.
    fast_steps: ClassVar[int | None] = 1

    # -- the family's set-up ---------------------------------------------------------------------------------------

    def get_components(self) -> dict[str, Any]:
        raise NotImplementedError

    def configure(self, pipe: Any) -> Any:
        """Family set-up of a freshly built or loaded pipeline (and of the stock one)."""
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def encode_prompt_inputs(self, pipe: Any, prompt: str, negative_prompt: str) -> dict[str, Any]:
        """The call's text as precomputed embeddings (the stock ``encode_prompt``), keyword arguments."""
        embeds, negative = pipe.encode_prompt(
            prompt, negative_prompt, True, max_sequence_length=self.inputs.get("max_sequence_length", 512)
        )
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative}

    # -- helpers ---------------------------------------------------------------------------------------------------

    @pytest.fixture(scope="class")
    def pipe(self):
        return self.configure(self.pipeline_class(**self.get_components()))

    @pytest.fixture(scope="class")
    def router_pipe(self):
        components = self.get_components()  # with the pipeline's config arguments (Wan2.2's boundary_ratio)
        denoiser = components["transformer"] or components["transformer_2"]
        torch.manual_seed(0)
        router = IDRouter.from_transformer(denoiser, router_dim=16, num_identity_queries=2, num_heads=2)
        return self.configure(self.pipeline_class(**components, id_router=router))

    def subjects(self) -> dict[str, Any]:
        images = [Image.new("RGB", (64, 96), (220, 40, 40)), Image.new("RGB", (80, 40), (40, 90, 230))]
        return {"subject_images": images, "subject_phrases": list(self.phrases)}

    def halves(self) -> torch.Tensor:
        masks = torch.zeros(2, self.inputs["height"], self.inputs["width"], dtype=torch.bool)
        half = self.inputs["width"] // 2
        masks[0, :, :half], masks[1, :, half:] = True, True
        return masks

    def call(self, pipe: Any, seed: int = 0, generator: Any = None, **kwargs: Any) -> Any:
        steps = {"num_inference_steps": self.fast_steps} if self.fast_steps else {}
        args = {"prompt": self.prompt, **self.inputs, **steps, "output_type": "latent", **kwargs}
        return pipe(**args, generator=generator or gen(seed))

    # -- the calling convention ------------------------------------------------------------------------------------

    def test_signature_follows_the_stock_pipeline(self):
        ours = list(inspect.signature(self.pipeline_class.__call__).parameters.values())[1:]
        stock = list(inspect.signature(self.stock_class.__call__).parameters.values())[1:]
        assert [p.name for p in ours[: len(stock)]] == [p.name for p in stock], "stock arguments in the stock order"
        for mine, theirs in zip(ours, stock):
            assert mine.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD, mine.name
            if mine.name not in self.default_exceptions:
                assert mine.default == theirs.default, f"`{mine.name}` default {mine.default!r} != {theirs.default!r}"
        assert set(self.default_exceptions) <= {p.name for p in stock}
        extra = ours[len(stock) :]
        assert all(p.kind == inspect.Parameter.KEYWORD_ONLY for p in extra), [p.name for p in extra]
        assert {"subject_images", "subject_phrases", "routing", "return_routing_maps"} <= {p.name for p in extra}

    def test_components_and_optional_components(self, pipe):
        init = inspect.signature(self.pipeline_class.__init__).parameters
        assert set(pipe.components) <= set(init) and "id_router" in pipe.components
        assert "id_router" in self.pipeline_class._optional_components
        for name in self.pipeline_class._optional_components:
            assert init[name].default is None or name in self.stock_class._optional_components, name
        assert pipe.id_router is None
        stock_names = getattr(self.stock_class, "_callback_tensor_inputs", [])  # HunyuanVideo-1.5 has no callbacks
        assert set(stock_names) <= set(pipe._callback_tensor_inputs)

    def test_declares_the_training_hooks(self, pipe):
        assert isinstance(pipe, SubjectTrainingHooks)
        params = inspect.signature(pipe.prepare_routing).parameters.values()
        assert all(p.kind == inspect.Parameter.KEYWORD_ONLY for p in params)

    def test_no_subjects_is_the_stock_pipeline_called_positionally(self, pipe):
        """``pipe(prompt, negative_prompt, height, width, num_frames, ...)`` means what it means on the stock class:
        bit-identical frames, and the callback gets the same tensors at every step."""
        stock = self.configure(self.stock_class(**self.get_components()))
        has_callback = "callback_on_step_end" in inspect.signature(self.stock_class.__call__).parameters
        seen = {"stock": [], "ours": []}

        def recorder(name):
            def callback(p, i, t, kw):
                seen[name].append({k: v.clone() for k, v in kw.items() if v is not None})
                return kw

            return callback

        def run(p, name):
            kw = {k: v for k, v in self.inputs.items() if k not in ("height", "width", "num_frames")}
            if name == "stock":
                kw = {k: v for k, v in kw.items() if k not in self.diasr_only_inputs}
            if has_callback:
                kw.update(callback_on_step_end=recorder(name),
                          callback_on_step_end_tensor_inputs=list(self.stock_class._callback_tensor_inputs))  # fmt: skip
            h, w, f = self.inputs["height"], self.inputs["width"], self.inputs["num_frames"]
            return p(self.prompt, "blurry, dark", h, w, f, **kw, output_type="pt", generator=gen(1)).frames

        want, got = run(stock, "stock"), run(pipe, "ours")
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert len(seen["ours"]) == len(seen["stock"]) == (self.inputs["num_inference_steps"] if has_callback else 0)
        for a, b in zip(seen["ours"], seen["stock"]):
            assert a.keys() == b.keys()
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)

    # -- callbacks -------------------------------------------------------------------------------------------------

    def test_callback_inputs(self, pipe):
        """The callback receives exactly the tensors it asked for, and what it returns is used (routed branch)."""
        names = list(pipe._callback_tensor_inputs)
        steps = []

        def callback(p, i, t, kw):
            assert p is pipe and set(kw) == set(names)
            steps.append(i)
            if i == self.inputs["num_inference_steps"] - 1:
                kw["latents"] = torch.zeros_like(kw["latents"])
            return kw

        out = self.call(pipe, **self.subjects(), callback_on_step_end=callback, callback_on_step_end_tensor_inputs=names,
                        num_inference_steps=self.inputs["num_inference_steps"])  # fmt: skip
        assert steps == list(range(self.inputs["num_inference_steps"]))
        assert out.frames.abs().sum() == 0
        with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
            self.call(pipe, callback_on_step_end=lambda *a: a[-1], callback_on_step_end_tensor_inputs=["bogus"])

    def test_callback_cfg(self, pipe):
        """Diffusers' ``test_callback_cfg``: a callback raising ``pipe._guidance_scale`` each step takes effect."""

        def increase(p, i, t, kw):
            p._guidance_scale += 1.0
            return kw

        kw = dict(self.subjects(), guidance_scale=2.0, num_inference_steps=self.inputs["num_inference_steps"])
        scale = kw["guidance_scale"]
        plain = self.call(pipe, **kw).frames
        raised = self.call(pipe, **kw, callback_on_step_end=increase).frames
        assert pipe.guidance_scale == scale + pipe.num_timesteps
        assert (raised - plain).abs().max() > 1e-6  # the new scale guided the later steps

    def test_callback_returning_none_is_refused(self, pipe):
        with pytest.raises(TypeError, match="must return a dict of tensors"):
            self.call(pipe, callback_on_step_end=lambda p, i, t, kw: None)

    # -- outputs, batches, prompt_embeds ----------------------------------------------------------------------------

    def test_output_types_and_return_dict(self, pipe):
        pt = self.call(pipe, output_type="pt", guidance_scale=1.0).frames
        f, h, w = self.inputs["num_frames"], self.inputs["height"], self.inputs["width"]
        assert isinstance(pt, torch.Tensor) and pt.shape == (1, f, 3, h, w)
        frames, maps = self.call(pipe, output_type="np", guidance_scale=1.0, return_dict=False)
        assert maps is None and frames.shape == (1, f, h, w, 3)
        np.testing.assert_allclose(pt.permute(0, 1, 3, 4, 2).numpy(), frames, atol=1e-6)
        default = inspect.signature(self.stock_class.__call__).parameters["output_type"].default
        assert inspect.signature(self.pipeline_class.__call__).parameters["output_type"].default == default
        with pytest.raises(ValueError, match="output_type"):
            self.call(pipe, output_type="mp4")

    def test_batch_and_num_videos_per_prompt(self, pipe):
        """Two prompts x two videos: each video is the single call with its generator (Diffusers'
        ``test_inference_batch_single_identical``), routing maps per video."""
        both = self.call(pipe, prompt=[self.prompt, self.prompt], num_videos_per_prompt=2,
                         generator=[gen(i) for i in range(4)], return_routing_maps=True, **self.subjects())  # fmt: skip
        assert both.frames.shape[0] == 4 and both.routing_maps.shape[0] == 4
        alone = self.call(pipe, seed=2, return_routing_maps=True, **self.subjects())
        torch.testing.assert_close(both.frames[2:3], alone.frames, atol=1e-4, rtol=1e-4)
        assert torch.equal(both.routing_maps[2:3], alone.routing_maps)

    def test_prompt_embeds_path(self, pipe):
        """Precomputed embeddings give the frames the prompt gives (the stock ``encode_prompt``)."""
        kw = {**self.inputs, "num_inference_steps": self.fast_steps or self.inputs["num_inference_steps"]}
        text = pipe(self.prompt, "blurry", **kw, output_type="latent", generator=gen()).frames
        with torch.no_grad():  # as inside the pipeline (the text encoders' no-grad kernels round differently)
            embeds = self.encode_prompt_inputs(pipe, self.prompt, "blurry")
        got = pipe(**kw, **embeds, output_type="latent", generator=gen()).frames
        torch.testing.assert_close(got, text, rtol=1e-5, atol=1e-5)

    # -- routing, save / load --------------------------------------------------------------------------------------

    @pytest.mark.parametrize("routing", ["similarity", "router", "masks", "dense"])
    def test_routing_modes(self, pipe, router_pipe, routing):
        p = router_pipe if routing == "router" else pipe
        extra = {"subject_masks": self.halves()} if routing == "masks" else {}
        out = self.call(p, **self.subjects(), routing=routing, guidance_scale_ref=2.0, return_routing_maps=True,
                        **extra)  # fmt: skip
        assert torch.isfinite(out.frames).all() and not p.routing_state.active
        if routing == "dense":
            assert out.routing_maps is None
            return
        maps = out.routing_maps
        assert maps.dtype == torch.int64 and maps.ndim == 4 and maps.min() >= -1 and maps.max() <= 1
        if routing == "masks":  # the user's layout, exactly
            half = maps.shape[-1] // 2
            assert maps[..., :half].eq(0).all() and maps[..., half:].eq(1).all()

    def test_save_and_load_with_and_without_the_router(self, pipe, router_pipe, tmp_path):
        router_pipe.save_pretrained(tmp_path / "routed")
        index = json.loads((tmp_path / "routed" / "model_index.json").read_text())
        assert index["_class_name"] == self.pipeline_class.__name__
        assert index["id_router"] == ["diasr_diffusers.routing.router", "IDRouter"]
        loaded = self.configure(self.pipeline_class.from_pretrained(tmp_path / "routed"))
        assert all(proc.state is loaded.routing_state for proc in loaded.denoiser.attn_processors.values()
                   if hasattr(proc, "state"))  # fmt: skip
        kw = dict(**self.subjects(), routing="router", return_routing_maps=True)
        a, b = self.call(loaded, **kw), self.call(router_pipe, **kw)
        torch.testing.assert_close(a.frames, b.frames, rtol=1e-5, atol=1e-5)
        assert torch.equal(a.routing_maps, b.routing_maps)
        pipe.save_pretrained(tmp_path / "plain")  # the optional component left out
        index = json.loads((tmp_path / "plain" / "model_index.json").read_text())
        assert index.get("id_router") in (None, [None, None])
        assert self.pipeline_class.from_pretrained(tmp_path / "plain").id_router is None

    def test_rotary_table_limits_are_checked_before_work(self, pipe):
        frames, height, width = pipe.rotary_limits()
        if height is None:
            pytest.skip("positions computed for any size")
        s = pipe.vae_scale_factor_spatial * pipe.denoiser.config.patch_size[1]
        with pytest.raises(ValueError, match="`height`=.*rotary table"):
            self.call(pipe, height=(height + 1) * s)
