"""Reference conventions of public reference-trained Wan2.1 weights, as named presets of :class:`DiasRPipeline`.

Each preset records what the original sampler does with the reference images (how they are fitted and encoded,
what the negative branch sees, the guidance formula, the schedule, the sizes the weights were trained at), so that
``DiasRPipeline(routing="dense")`` reproduces it exactly. Sources, with file and line, are in the project's
design notes (``PUBLIC_WEIGHTS.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Wan2.1's default negative prompt (`wan/configs/shared_config.py` `sample_neg_prompt`), used by Phantom-Wan.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)


@dataclass(frozen=True)
class ReferenceStyle:
    r"""How a family of weights expects its reference frames. Presets: :data:`REFERENCE_STYLES`.

    Args:
        name: the preset name recorded in the pipeline config (``reference_style``).
        resample: PIL filter fitting each reference inside the video size (``"bicubic"`` or ``"lanczos"``).
        floor_size: the fitted size is truncated (``int()``, as Phantom and SkyReels do) instead of rounded.
        sample_references: encode references by sampling the VAE posterior with the call's generator (SkyReels)
            instead of taking its mean.
        pad_references_to: append zero latent frames until there are this many reference frames (SkyReels: 4),
            also the most reference images accepted. ``None``: no padding.
        max_references: more reference images than this give a warning (the weights never saw more).
        zero_negative_references: the negative branch keeps the reference frames as zeros (Phantom, SkyReels)
            instead of dropping them (DiasR's cheaper choice, exact for a model trained that way).
        always_guide: run the guidance passes whatever ``guidance_scale`` is (Phantom); otherwise only when
            ``guidance_scale > 1`` (Diffusers' and SkyReels' rule).
        noise_covers_references: the initial noise is drawn for the video *and* reference frames in one tensor and
            the video part kept (Phantom), so a seed gives the original's noise.
        flow_shift: the shift of the ``UniPCMultistepScheduler(use_flow_sigmas=True)`` the weights are sampled with;
            ``None``: whatever scheduler the pipeline has.
        sigma_max: first sigma before shifting, passed as explicit ``sigmas`` (Phantom: 0.999); ``None``: the
            scheduler's own (1.0).
        guidance_scale, guidance_scale_ref, num_inference_steps, num_frames, negative_prompt: call defaults.
        fps: the frame rate the weights were trained at (for export; not used by the pipeline).
        trained_sizes: ``(height, width)`` pairs the weights were trained at; others warn. ``None``: no check.
    """

    name: str
    resample: str = "bicubic"
    floor_size: bool = False
    sample_references: bool = False
    pad_references_to: int | None = None
    max_references: int | None = None
    zero_negative_references: bool = False
    always_guide: bool = False
    noise_covers_references: bool = False
    flow_shift: float | None = None
    sigma_max: float | None = None
    guidance_scale: float = 5.0
    guidance_scale_ref: float | None = None
    num_inference_steps: int = 50
    num_frames: int = 81
    negative_prompt: str | None = None
    fps: int = 16
    trained_sizes: tuple[tuple[int, int], ...] | None = None

    def make_scheduler(self):
        """A fresh scheduler as the original samples with (``None`` when the preset does not fix one): both
        originals build ``UniPCMultistepScheduler`` from these four settings and Diffusers' defaults."""
        if self.flow_shift is None:
            return None
        from diffusers import UniPCMultistepScheduler

        return UniPCMultistepScheduler(
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            num_train_timesteps=1000,
            flow_shift=self.flow_shift,
        )

    def scheduler_matches(self, scheduler) -> bool:
        if self.flow_shift is None:
            return True
        cfg = scheduler.config
        return (
            type(scheduler).__name__ == "UniPCMultistepScheduler"
            and bool(cfg.get("use_flow_sigmas"))
            and cfg.get("prediction_type") == "flow_prediction"
            and float(cfg.get("flow_shift", 0.0)) == float(self.flow_shift)
        )

    def sigmas(self, num_inference_steps: int) -> np.ndarray | None:
        """Explicit unshifted sigmas for ``scheduler.set_timesteps(sigmas=...)`` (the scheduler applies the
        shift), or ``None`` for the scheduler's own."""
        if self.sigma_max is None:
            return None
        return np.linspace(self.sigma_max, 0.0, num_inference_steps + 1)[:-1].copy()


REFERENCE_STYLES: dict[str, ReferenceStyle] = {
    # Today's behaviour: defaults of a plain Wan2.1 base; the negative branch has no references.
    "diasr": ReferenceStyle(name="diasr"),
    # Phantom-Wan 1.3B / 14B (`generate.py`, `phantom_wan/subject2video.py`): 832x480 (14B also 1280x720).
    "phantom": ReferenceStyle(
        name="phantom",
        resample="lanczos",
        floor_size=True,
        max_references=4,
        zero_negative_references=True,
        always_guide=True,
        noise_covers_references=True,
        flow_shift=5.0,
        sigma_max=0.999,
        guidance_scale=7.5,
        guidance_scale_ref=5.0,
        num_inference_steps=50,
        num_frames=81,
        negative_prompt=WAN_NEGATIVE_PROMPT,
        fps=16,
        trained_sizes=((480, 832), (832, 480), (720, 1280), (1280, 720)),
    ),
    # SkyReels-V3 R2V 14B (`skyreels_v3/pipelines/reference_to_video_pipeline.py`): the shipped CLI's settings
    # (one pass, 8 steps, 121 frames at 24 fps); its `__call__` defaults are guidance 7.5 / 5.0 and 50 steps.
    # Sizes are aspect-ratio buckets chosen from the first reference, so no size check.
    "skyreels_v3": ReferenceStyle(
        name="skyreels_v3",
        resample="lanczos",
        floor_size=True,
        sample_references=True,
        pad_references_to=4,
        max_references=4,
        zero_negative_references=True,
        flow_shift=5.0,
        guidance_scale=1.0,
        guidance_scale_ref=1.0,
        num_inference_steps=8,
        num_frames=121,
        negative_prompt="",
        fps=24,
    ),
}


def get_reference_style(style: str | ReferenceStyle) -> ReferenceStyle:
    """The preset named ``style`` (a :class:`ReferenceStyle` must be one of the presets, so configs can name it)."""
    if isinstance(style, ReferenceStyle):
        if REFERENCE_STYLES.get(style.name) != style:
            raise ValueError(
                f"`reference_style` must be one of the presets {sorted(REFERENCE_STYLES)} (so that save_pretrained "
                f"can record it by name), got a custom ReferenceStyle named {style.name!r}"
            )
        return style
    if not isinstance(style, str) or style not in REFERENCE_STYLES:
        raise ValueError(f"`reference_style` must be one of {sorted(REFERENCE_STYLES)}, got {style!r}")
    return REFERENCE_STYLES[style]
