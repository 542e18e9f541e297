"""DiasRHunyuanVideo15Pipeline: multi-subject video generation on HunyuanVideo-1.5 (text-to-video) with
subject-sparse routed joint attention."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.loaders import HunyuanVideoLoraLoaderMixin
from diffusers.models import AutoencoderKLHunyuanVideo15, HunyuanVideo15Transformer3DModel
from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import (
    HunyuanVideo15Pipeline,
    format_text_input,
    retrieve_timesteps,
)
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler
from diffusers.utils import logging
from transformers import ByT5Tokenizer, Qwen2_5_VLTextModel, Qwen2Tokenizer, T5EncoderModel

from ..processors import SubjectRoutingState, TextSegments
from ..routing import IDRouter
from ..routing.phrases import check_phrases, clean_prompt, phrase_owners_from_offsets, phrase_spans
from ..utils.images import letterbox
from ..utils.latents import encode_latents
from .subjects import DenoiseCall, DiasRPipelineOutput, SubjectPipelineMixin, _sigma_array

logger = logging.get_logger(__name__)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers.utils import export_to_video, load_image
        >>> from diasr_diffusers import DiasRHunyuanVideo15Pipeline

        >>> pipe = DiasRHunyuanVideo15Pipeline.from_pretrained(
        ...     "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v", torch_dtype=torch.bfloat16
        ... ).to("cuda")
        >>> pipe.vae.enable_tiling()
        >>> out = pipe(
        ...     prompt="The man and the woman dance in a sunlit kitchen.",
        ...     subject_images=[load_image("man.png"), load_image("woman.png")],
        ...     subject_phrases=["the man", "the woman"],
        ...     height=480, width=848, num_frames=61,
        ...     return_routing_maps=True,
        ... )
        >>> export_to_video(out.frames[0], "dance.mp4", fps=24)
        ```
"""


class DiasRHunyuanVideo15Pipeline(SubjectPipelineMixin, HunyuanVideo15Pipeline, HunyuanVideoLoraLoaderMixin):
    r"""Multi-subject text-to-video with HunyuanVideo-1.5 and DiasR subject-sparse routed attention.

    Reference images are VAE-encoded to one clean latent frame each and appended after the video latents on the frame
    axis, so each dual-stream block attends over ``[video | ref_0 | ... | ref_{N-1} | text]`` (the transformer's
    rotary embedding gives the references the temporal positions after the video). Every video token is routed to one
    subject (or to none) and sees the text, the video and that subject's references only; with text routing it sees
    the general prompt plus that subject's phrase (see
    :class:`~diasr_diffusers.processors.HunyuanVideo15SubjectSparseAttnProcessor`). Without subjects it is exactly
    :class:`~diffusers.HunyuanVideo15Pipeline` (same frames for the same weights and seed).

    **Reference frames and the conditioning channels.** HunyuanVideo-1.5's transformer takes
    ``2 * latent_channels + 1`` channels per frame: the noisy latent, a condition latent and a condition mask
    (image-to-video puts the clean first frame in the condition channels with mask 1; text-to-video gives zeros). A
    reference frame carries its clean latent in the latent channels (as DiasR references on every family) *and* in
    the condition channels, with mask 1: in HunyuanVideo's own terms "a given, clean frame", which also tells the
    model reference frames from video frames (whose condition channels and mask stay zero, as stock text-to-video).
    References share the video's timestep; their outputs are discarded.

    **Text routing.** The prompt reaches Qwen2.5-VL inside a chat template whose first ``crop_start`` tokens
    (``prompt_template_encode_start_idx``, 108) are dropped, and the transformer reorders each sample's text as
    ``[valid image | valid ByT5 | valid Qwen | padding]``; phrase tokens are located in the templated text by
    character offsets and mapped through both (:meth:`text_segments`).

    Same call signature and outputs as :class:`~diasr_diffusers.DiasRPipeline`, with HunyuanVideo-1.5's defaults
    (121 frames, 50 steps, the size from ``target_size`` at 16:9, guidance from the ``guider``, 1000 Qwen tokens),
    plus the stock pipeline's extra text inputs (``prompt_embeds_mask``, ``prompt_embeds_2`` ...).

    **LoRA.** ``load_lora_weights`` / ``save_lora_weights`` are Diffusers' ``HunyuanVideoLoraLoaderMixin`` (the
    stock HunyuanVideo-1.5 pipeline has none): Diffusers-format files, as ``diasr train`` writes them. A file in the
    original HunyuanVideo layout (``img_attn_qkv`` keys) would be converted by HunyuanVideo 1.0's rules: untested.

    Components:
        text_encoder, tokenizer, transformer, vae, scheduler, text_encoder_2, tokenizer_2, guider: as in
            ``HunyuanVideo15Pipeline`` (a text-to-video transformer; ``tokenizer`` must be a fast tokenizer with
            offsets for ``subject_phrases``).
        id_router (:class:`~diasr_diffusers.IDRouter`, optional): the trained router
            (``IDRouter.from_transformer(pipe.transformer)``); without it the training-free similarity router is used.
    """

    _exclude_from_cpu_offload = ["id_router"]
    _optional_components = ["id_router"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    _guidance_scale = 1.0
    _transformer_class = HunyuanVideo15Transformer3DModel

    def __init__(
        self,
        text_encoder: Qwen2_5_VLTextModel,
        tokenizer: Qwen2Tokenizer,
        transformer: HunyuanVideo15Transformer3DModel,
        vae: AutoencoderKLHunyuanVideo15,
        scheduler: FlowMatchEulerDiscreteScheduler,
        text_encoder_2: T5EncoderModel,
        tokenizer_2: ByT5Tokenizer,
        guider: ClassifierFreeGuidance,
        id_router: IDRouter | None = None,
    ):
        if transformer is not None:
            cfg = transformer.config
            if cfg.patch_size_t != 1:
                raise ValueError(
                    f"DiasRHunyuanVideo15Pipeline needs patch_size_t=1 (got {cfg.patch_size_t}): a temporal patch "
                    "would pair a reference frame with another frame"
                )
            if vae is not None and cfg.in_channels != 2 * vae.config.latent_channels + 1:
                raise ValueError(
                    f"the transformer takes {cfg.in_channels} input channels; HunyuanVideo-1.5 takes "
                    f"2 * latent_channels + 1 = {2 * vae.config.latent_channels + 1} (latents, condition latents, mask)"
                )
        if id_router is not None and transformer is not None:
            id_router.check_compatible(transformer)
        super().__init__(
            text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae, scheduler=scheduler,
            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, guider=guider,
        )  # fmt: skip
        self.register_modules(id_router=id_router)
        self.routing_state = SubjectRoutingState()
        self._install_processors()

    # ------------------------------------------------------------------------------------------------------------
    # HunyuanVideo-1.5's layout: latents (B, C, F, h, w), the transformer's input 2C + 1 channels.

    def latents_shape(self, num_videos: int, num_frames: int, height: int, width: int) -> tuple[tuple[int, ...], str]:
        s = self.vae_scale_factor_spatial
        latent_frames = (num_frames - 1) // self.vae_scale_factor_temporal + 1
        shape = (num_videos, self.num_channels_latents, latent_frames, height // s, width // s)
        return shape, f"(videos, latent channels, latent frames, height / {s}, width / {s})"

    def encode_references(
        self, subjects: list[list[PIL.Image.Image]], height: int, width: int, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """The transformer's input for the reference frames: ``(1, 2C + 1, K, h, w)``, one frame per image (subjects
        in order), each ``[clean latent | clean latent (condition) | 1 (condition mask)]``; latents are the posterior
        mean times ``scaling_factor``, as HunyuanVideo-1.5 encodes its image condition. Images are letterboxed onto
        white at the video size."""
        frames = [letterbox(img, height, width) for images in subjects for img in images]
        pixels = self.video_processor.preprocess(frames, height=height, width=width)  # (K, 3, H, W) in [-1, 1]
        latents = self.encode_video_latents(pixels[:, :, None])  # (K, C, 1, h, w)
        return self.reference_input(latents[:, :, 0].transpose(0, 1)[None]).to(device, dtype)

    @staticmethod
    def reference_input(ref_latents: torch.Tensor) -> torch.Tensor:
        """``[clean latent | clean latent (condition) | 1 (condition mask)]`` on the channel axis of
        ``(B, C, K, h, w)`` reference latents: the transformer's ``(B, 2C + 1, K, h, w)`` input for reference frames
        (inference and training build it here)."""
        return torch.cat([ref_latents, ref_latents, torch.ones_like(ref_latents[:, :1])], dim=1)

    # ------------------------------------------------------------------------------------------------------------
    # Training hooks (DiasRTrainer, training/families.py): the trainer holds (B, C, F, h, w) latents; these build the
    # transformer's inputs exactly as `__call__` does for its conditional branch.

    def encode_video_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, C, F, h, w)`` latents of ``(B, 3, F, H, W)`` pixels in [-1, 1]: posterior mean × ``scaling_factor``
        (no shift), as HunyuanVideo-1.5 encodes its image condition and as ``__call__`` decodes (``/ scaling_factor``)."""
        # One clip per call: the VAE's mid-block attention mask broadcasts wrongly over a batch (diffusers 0.42).
        return torch.cat([encode_latents(self.vae, clip[None]) for clip in pixels], dim=0)

    def encode_training_prompt(
        self, caption: str, max_sequence_length: int, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(Qwen embeddings (1, max_sequence_length, D), the other text inputs)`` of ``caption`` as ``__call__``
        encodes a prompt with subject phrases (``clean_prompt``; chat template, crop). The second item goes to
        :meth:`denoiser_inputs` and :meth:`drop_padding_tokens`: the Qwen mask and the ByT5 embeddings and mask."""
        embeds, mask, embeds_2, mask_2 = self.encode_text([clean_prompt(caption)], 1, 1, max_sequence_length, device)
        return embeds, {"encoder_attention_mask": mask, "encoder_hidden_states_2": embeds_2, "encoder_attention_mask_2": mask_2}  # fmt: skip

    def drop_padding_tokens(self, segments: list[TextSegments], text: dict[str, torch.Tensor]) -> list[TextSegments]:
        """The trainer's hook for routed text: segments over Qwen positions (``phrase_owners``) mapped into the
        transformer's reordered joint text (:meth:`text_segments`, as ``__call__`` maps them); ``text`` is the second
        item of :meth:`encode_training_prompt`. Padded tokens stay masked by the transformer's own text mask."""
        return self.text_segments(
            segments, text["encoder_attention_mask"], text["encoder_attention_mask_2"], self.vision_num_semantic_tokens
        )

    def denoiser_inputs(
        self, noisy: torch.Tensor, refs: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor,
        text: dict[str, torch.Tensor],
    ) -> dict[str, Any]:  # fmt: skip
        """The transformer's keyword inputs for ``[video | refs]`` on the frame axis: video frames
        ``[x_t | 0 | 0]`` (text-to-video's zero condition latents and mask), reference frames
        :meth:`reference_input` of ``refs`` ``(1 or B, C, K, h, w)``; one timestep ``t`` per sample, shared by the
        reference frames (as ``__call__``); zero ``image_embeds``; the Qwen and ByT5 text of ``text``."""
        b = noisy.shape[0]
        video = torch.cat([noisy, noisy.new_zeros(b, noisy.shape[1] + 1, *noisy.shape[2:])], dim=1)
        refs = self.reference_input(refs.to(noisy.dtype)).expand(b, -1, -1, -1, -1)
        dtype = prompt_embeds.dtype
        return {
            "hidden_states": torch.cat([video, refs], dim=2), "timestep": t.reshape(-1).expand(b).to(noisy.dtype),
            "encoder_hidden_states": prompt_embeds, "encoder_attention_mask": text["encoder_attention_mask"],
            "encoder_hidden_states_2": text["encoder_hidden_states_2"].to(dtype),
            "encoder_attention_mask_2": text["encoder_attention_mask_2"],
            "image_embeds": prompt_embeds.new_zeros(b, self.vision_num_semantic_tokens, self.vision_states_dim),
        }  # fmt: skip

    def video_prediction(self, pred: torch.Tensor, video_shape: torch.Size) -> torch.Tensor:
        """The video frames of the transformer's ``(B, C, F + K, h, w)`` output (the reference frames dropped)."""
        return pred[:, :, : video_shape[2]]

    # ------------------------------------------------------------------------------------------------------------
    # The denoising loop's hooks (SubjectPipelineMixin.denoise): video frames [x_t | condition latents | mask],
    # reference frames appended on the frame axis; the guider component guides (a callback changing
    # `pipe._guidance_scale` gets a guider with that scale).

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    def transformer_inputs(self, call, latents, t, text, references):
        hidden = torch.cat([latents, call.inputs["condition"]], dim=1)
        if references is not None:
            hidden = torch.cat([hidden, references], dim=2)
        return {
            "hidden_states": hidden, "image_embeds": call.inputs["image_embeds"],
            "timestep": t.expand(hidden.shape[0]).to(hidden.dtype), **text,
        }  # fmt: skip

    def video_output(self, call, pred, latents):
        return pred[:, :, : latents.shape[2]]

    def step_guidance(self, call, i, t, low_noise):
        guider = call.inputs["guider"]
        if guider.config.get("guidance_scale") != self._guidance_scale:
            guider = call.inputs["guider"] = guider.new(guidance_scale=self._guidance_scale)
        guider.set_state(step=i, num_inference_steps=call.inputs["num_inference_steps"], timestep=t)
        return self._guidance_scale if call.negative is not None and guider.num_conditions > 1 else None

    def combine_guidance(self, call, pred_cond, pred_uncond, guidance_scale):
        guider = call.inputs["guider"]
        return (guider.forward(pred_cond) if pred_uncond is None else guider.forward(pred_cond, pred_uncond)).pred

    # ------------------------------------------------------------------------------------------------------------
    # Text: Qwen2.5-VL behind a chat template (cropped), ByT5 glyphs; the transformer reorders the joint text.

    def encode_text(
        self,
        prompt: list[str] | None,
        batch_size: int,
        num_videos_per_prompt: int,
        max_sequence_length: int,
        device: torch.device,
        prompt_embeds: torch.Tensor | None = None,
        prompt_embeds_mask: torch.Tensor | None = None,
        prompt_embeds_2: torch.Tensor | None = None,
        prompt_embeds_mask_2: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``encode_prompt`` of the stock pipeline with ``max_sequence_length`` Qwen tokens (the stock pipeline reads
        ``self.tokenizer_max_length``), each prompt's tensors repeated for its ``num_videos_per_prompt`` videos.
        ``prompt=None``: the empty prompt, as the stock negative branch. Returns ``(qwen embeds, qwen mask, ByT5
        embeds, ByT5 mask)``."""
        prompt = prompt if prompt is not None else [""] * batch_size
        if prompt_embeds is None:
            prompt_embeds, prompt_embeds_mask = self._get_mllm_prompt_embeds(
                tokenizer=self.tokenizer, text_encoder=self.text_encoder, prompt=prompt, device=device,
                tokenizer_max_length=max_sequence_length, system_message=self.system_message,
                crop_start=self.prompt_template_encode_start_idx,
            )  # fmt: skip
        encoded = self.encode_prompt(
            prompt=prompt, device=device, dtype=self.transformer.dtype, batch_size=batch_size,
            num_videos_per_prompt=1, prompt_embeds=prompt_embeds, prompt_embeds_mask=prompt_embeds_mask,
            prompt_embeds_2=prompt_embeds_2, prompt_embeds_mask_2=prompt_embeds_mask_2,
        )  # fmt: skip
        # Repeated here, not by `encode_prompt`: its `mask.repeat(1, n, 1)` on a 2-D mask interleaves the prompts'
        # masks ([m0, m1, m0, m1]) while the embeddings are grouped ([e0, e0, e1, e1]) (diffusers 0.42).
        return tuple(x.repeat_interleave(num_videos_per_prompt, dim=0) for x in encoded)

    def phrase_owners(
        self, prompt: str, phrases: list[str], max_sequence_length: int, what: str = "prompt"
    ) -> list[int]:
        """The subject owning each of the ``max_sequence_length`` Qwen positions the transformer receives for
        ``prompt`` (``-1``: general text), i.e. after the chat template and its ``crop_start`` crop. These index
        ``prompt_embeds`` (the router's phrase features); :meth:`text_segments` maps the segments built from them
        into the transformer's reordered text.

        The templated text of the cleaned prompt (``clean_prompt``, what ``__call__`` encodes) is tokenized with
        offsets and checked to give exactly the ids the text encoder gets, so the mapping cannot drift from what is
        encoded.
        """
        check_phrases(prompt, phrases, what)
        prompt = clean_prompt(prompt)
        if not getattr(self.tokenizer, "is_fast", False):
            raise TypeError(
                f"phrase routing needs a fast tokenizer (with offsets), got {type(self.tokenizer).__name__}; "
                "load it with `AutoTokenizer.from_pretrained(..., use_fast=True)`"
            )
        crop = self.prompt_template_encode_start_idx or 0
        length = max_sequence_length + crop
        chat = format_text_input([prompt], self.system_message)
        text = self.tokenizer.apply_chat_template(chat[0], add_generation_prompt=True, tokenize=False)
        encoded = self.tokenizer.apply_chat_template(
            chat, add_generation_prompt=True, tokenize=True, return_dict=True, padding="max_length",
            max_length=length, truncation=True,
        )  # fmt: skip
        enc = self.tokenizer(
            text, add_special_tokens=False, padding="max_length", max_length=length, truncation=True,
            return_offsets_mapping=True,
        )  # fmt: skip
        if list(enc["input_ids"]) != list(encoded["input_ids"][0]):
            raise ValueError(
                "cannot locate the subject phrases: tokenizing the rendered chat template does not give the ids "
                "`apply_chat_template` gives, so token offsets do not describe what the text encoder sees"
            )
        start = text.rfind(prompt)  # the user turn comes after the system message
        end = start + len(prompt)
        offsets = []
        for a, b in enc["offset_mapping"][crop:length]:
            a, b = max(a, start) - start, min(b, end) - start
            offsets.append((a, b) if b > a else (0, 0))  # template tokens belong to no phrase
        kept_from = enc["offset_mapping"][crop][0] if enc["offset_mapping"][crop][1] > 0 else len(text)
        if any(start + a < kept_from for p in phrases for a, _ in phrase_spans(prompt, p)):
            raise ValueError(
                f"the chat template's crop (crop_start={crop}) cuts into the prompt before a subject phrase: "
                "the text encoder's output never holds it"
            )
        return phrase_owners_from_offsets(prompt, phrases, offsets, max_sequence_length, what)

    @staticmethod
    def text_segments(
        qwen_segments: list[TextSegments],
        prompt_embeds_mask: torch.Tensor,
        prompt_embeds_mask_2: torch.Tensor,
        image_tokens: int,
    ) -> list[TextSegments]:
        """Map per-sample :class:`TextSegments` over Qwen positions into the transformer's joint text.

        ``HunyuanVideo15Transformer3DModel`` concatenates, per sample, ``[valid image | valid ByT5 | valid Qwen |
        padding image | padding ByT5 | padding Qwen]`` (image tokens are all padding for text-to-video). A valid
        Qwen token of rank ``r`` among the valid ones sits at ``n_valid_byt5 + r``; the image and ByT5 tokens are
        general text.
        """
        out = []
        for b, seg in enumerate(qwen_segments):
            m1, m2 = prompt_embeds_mask[b].bool().cpu(), prompt_embeds_mask_2[b].bool().cpu()
            n1, n2, l1, l2 = int(m1.sum()), int(m2.sum()), len(m1), len(m2)
            valid_rank, pad_rank = torch.cumsum(m1, 0) - 1, torch.cumsum(~m1, 0) - 1
            qwen_pos = torch.where(m1, n2 + valid_rank, n2 + n1 + image_tokens + (l2 - n2) + pad_rank)
            general = len(seg.order) - sum(seg.lengths)
            phrase_tokens = seg.order[general:]
            if not m1[phrase_tokens].all():
                raise ValueError(f"sample {b}: a subject phrase token is padding in `prompt_embeds_mask`")
            phrase_pos = qwen_pos[phrase_tokens]
            is_phrase = torch.zeros(image_tokens + l2 + l1, dtype=torch.bool)
            is_phrase[phrase_pos] = True
            order = torch.cat([torch.nonzero(~is_phrase)[:, 0], phrase_pos])
            out.append(TextSegments(order=order, lengths=list(seg.lengths)))
        return out

    # ------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int = 121,
        num_inference_steps: int | None = None,
        sigmas: list[float] | None = None,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_embeds_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds_mask: torch.Tensor | None = None,
        prompt_embeds_2: torch.Tensor | None = None,
        prompt_embeds_mask_2: torch.Tensor | None = None,
        negative_prompt_embeds_2: torch.Tensor | None = None,
        negative_prompt_embeds_mask_2: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        *,
        guidance_scale: float | None = None,
        callback_on_step_end: Callable[[Any, int, int, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        max_sequence_length: int = 1000,
        subject_images: list[Any] | None = None,
        subject_phrases: list[str] | None = None,
        guidance_scale_ref: float | None = None,
        routing: str = "auto",
        route_text: bool = True,
        subject_masks: torch.Tensor | np.ndarray | None = None,
        similarity_threshold: float = 0.0,
        return_routing_maps: bool = False,
    ) -> DiasRPipelineOutput | tuple:
        r"""Generate a video in which each reference subject keeps its identity.

        The stock ``HunyuanVideo15Pipeline`` arguments come first, in its order; the rest (``guidance_scale``, the
        callbacks, the subject arguments) are keyword-only. Arguments as in
        :meth:`DiasRPipeline.__call__ <diasr_diffusers.DiasRPipeline.__call__>`; ``None`` means
        HunyuanVideo-1.5's default: ``num_frames=121``, ``num_inference_steps=50``, ``height``/``width`` from the
        transformer's ``target_size`` at 16:9, ``guidance_scale`` the ``guider``'s (another value, or a
        ``callback_on_step_end`` changing ``pipe._guidance_scale``, guides with ``guider.new(guidance_scale=...)``), an empty ``negative_prompt``. ``max_sequence_length``: Qwen tokens after
        the chat template's crop (the stock pipeline's ``tokenizer_max_length``). ``latents`` are
        ``(videos, latent channels, latent frames, h, w)``. ``sigmas``: the noise levels the loop uses, exactly as
        for ``DiasRPipeline`` (the scheduler's shift undone; :meth:`~SubjectPipelineMixin.set_exact_sigmas`); ``None``:
        HunyuanVideo's ``linspace(1, 0, steps + 1)[:-1]`` given to the scheduler, which shifts it (as stock). The ``*_mask`` / ``*_2`` embedding arguments
        are the stock pipeline's (Qwen mask, ByT5 glyph embeddings and mask). With ``subject_phrases`` the prompt
        is encoded as the phrase matcher reads it (``routing.phrases.clean_prompt``).

        Examples:
        """
        if (height is None) != (width is None):
            raise ValueError("Give both `height` and `width`, or neither (HunyuanVideo-1.5's size from target_size)")
        if height is None:
            height, width = self.video_processor.calculate_default_height_width(
                self.default_aspect_ratio[1], self.default_aspect_ratio[0], self.target_size
            )
        if num_inference_steps is None:
            num_inference_steps = 50 if sigmas is None else len(_sigma_array(sigmas))
        guider = self.guider
        if guidance_scale is not None:
            if not isinstance(guider, ClassifierFreeGuidance):
                raise ValueError(
                    f"`guidance_scale` needs a ClassifierFreeGuidance guider, got {type(guider).__name__}"
                )
            guider = guider.new(guidance_scale=guidance_scale)
        scale = guider.config.get("guidance_scale", 1.0)
        guider.set_state(step=0, num_inference_steps=num_inference_steps, timestep=None)
        if guider.num_conditions > 2:
            raise ValueError(
                f"the guider {type(guider).__name__} needs {guider.num_conditions} branches; DiasR pipelines run two "
                "(ClassifierFreeGuidance and guiders combining a conditional and an unconditional prediction)"
            )
        # The stock pipeline's own pairing rules for its extra text inputs (mask with embeds, ByT5 with prompt).
        HunyuanVideo15Pipeline.check_inputs(
            self, prompt, height, width, negative_prompt, prompt_embeds, negative_prompt_embeds, prompt_embeds_mask,
            negative_prompt_embeds_mask, prompt_embeds_2, prompt_embeds_mask_2, negative_prompt_embeds_2,
            negative_prompt_embeds_mask_2,
        )  # fmt: skip

        # 1. Check everything before any expensive work.
        num_frames, prompts, subjects, routing = self.prepare_subject_call(
            prompt=prompt, subject_images=subject_images, subject_phrases=subject_phrases,
            negative_prompt=negative_prompt, height=height, width=width, num_frames=num_frames,
            num_inference_steps=num_inference_steps, guidance_scale=scale, guidance_scale_ref=guidance_scale_ref,
            routing=routing, route_text=route_text, subject_masks=subject_masks,
            similarity_threshold=similarity_threshold, num_videos_per_prompt=num_videos_per_prompt,
            generator=generator, latents=latents, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, output_type=output_type,
            return_routing_maps=return_routing_maps, attention_kwargs=attention_kwargs,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length, sigmas=sigmas,
        )  # fmt: skip
        if subjects and not isinstance(guider, ClassifierFreeGuidance):
            raise ValueError(
                f"with `subject_images` the guider must be ClassifierFreeGuidance (got {type(guider).__name__}): the "
                "conditional branch runs with references, the unconditional one without"
            )
        if subjects and subject_phrases is not None:  # encoded as the phrase owners were found (`phrase_owners`)
            prompts = [clean_prompt(p) for p in prompts]

        self._guidance_scale = scale
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device
        batch_size = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        num_videos = batch_size * num_videos_per_prompt
        dtype = self.transformer.dtype

        # 2. Text: the Qwen embeddings and mask, the ByT5 embeddings and mask of each branch.
        names = ("encoder_hidden_states", "encoder_attention_mask", "encoder_hidden_states_2", "encoder_attention_mask_2")  # fmt: skip
        positive = self.encode_text(
            prompts, batch_size, num_videos_per_prompt, max_sequence_length, device, prompt_embeds,
            prompt_embeds_mask, prompt_embeds_2, prompt_embeds_mask_2,
        )  # fmt: skip
        negative = None
        if guider.get_state()["enabled"]:
            negatives = [negative_prompt] * batch_size if isinstance(negative_prompt, str) else negative_prompt
            negative = self.encode_text(
                negatives, batch_size, num_videos_per_prompt, max_sequence_length, device, negative_prompt_embeds,
                negative_prompt_embeds_mask, negative_prompt_embeds_2, negative_prompt_embeds_mask_2,
            )  # fmt: skip

        # 3. Timesteps, latents, references.
        if sigmas is None:  # HunyuanVideo15Pipeline's schedule (shifted by the scheduler)
            schedule = np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1]
            timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, sigmas=schedule)  # fmt: skip
        else:  # the exact noise levels, as DiasRPipeline takes them (the scheduler's shift undone)
            self.set_exact_sigmas(sigmas, device)
            timesteps = self.scheduler.timesteps
        latents = self.prepare_latents(
            num_videos, self.num_channels_latents, height, width, num_frames, dtype, device, generator, latents
        )
        call = DenoiseCall(
            prompt=dict(zip(names, positive)), negative=None if negative is None else dict(zip(names, negative)),
            attention_kwargs=attention_kwargs,
            inputs={
                "condition": torch.cat(self.prepare_cond_latents_and_mask(latents, dtype, device), dim=1),
                "image_embeds": torch.zeros(num_videos, self.vision_num_semantic_tokens, self.vision_states_dim, dtype=dtype, device=device),
                "guider": guider, "num_inference_steps": num_inference_steps,
            },
        )  # fmt: skip
        if subjects:
            call.references, call.num_ref_frames, call.routing_inputs = self.prepare_references(
                subjects, subject_phrases=subject_phrases, prompts=prompts, prompt=call.prompt, video_latents=latents,
                routing=routing, route_text=route_text, subject_masks=subject_masks,
                similarity_threshold=similarity_threshold, num_videos_per_prompt=num_videos_per_prompt,
                num_frames=num_frames, max_sequence_length=max_sequence_length, height=height, width=width,
                device=device, dtype=dtype,
            )  # fmt: skip
            call.guidance_scale_ref, call.return_routing_maps = guidance_scale_ref, return_routing_maps

        # 4. Denoise.
        latents, routing_maps = self.denoise(
            latents, timesteps, num_inference_steps, call, callback_on_step_end, callback_on_step_end_tensor_inputs
        )

        # 5. Decode (as HunyuanVideo15Pipeline).
        if output_type != "latent":
            video = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
            video = self.video_processor.postprocess_video(video, output_type=output_type)
        else:
            video = latents
        self.maybe_free_model_hooks()

        if not return_dict:
            return (video, routing_maps)
        return DiasRPipelineOutput(frames=video, routing_maps=routing_maps)
