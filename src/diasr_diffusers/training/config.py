"""Training configuration: one YAML file, checked completely before anything is loaded."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WEIGHTING_SCHEMES = ("none", "logit_normal", "mode")  # diffusers.training_utils.compute_density_for_timestep_sampling
STAGES = ("align", "route")


class ConfigError(ValueError):
    """A bad training config: unknown key, missing file, wrong value."""


@dataclass
class TrainConfig:
    """What ``diasr train`` reads from ``--config FILE.yaml``. Relative paths are relative to the working directory;
    a data path may be a manifest (``.jsonl``) or a folder holding ``manifest.jsonl`` (``diasr make-synthetic``'s output).

    Stages (DiasR two-stage recipe, Ingredients-style supervision):
        ``align``: identity anchors + LoRA; flow-matching loss + ``lambda_mask * L_mask`` (router similarity maps vs
            subject masks) + ``lambda_align`` * (1 - cos(image anchor, text anchor)). Attention is routed by the
            ground-truth masks (teacher forcing) while the router learns to predict them.
        ``route``: router + LoRA; flow-matching loss + ``lambda_route`` * routing cross-entropy; attention routed by
            the router itself (hard), with the straight-through log-probability bias so the diffusion loss also
            reaches the router. ``route_background`` teaches background tokens to the null anchor (Ingredients
            ignores them: set it false to match); ``balanced_routing_loss`` weights every class present equally
            (``true``), by ``count ** -p`` (a float ``p``), or not at all (``false``).
    All base-model weights stay frozen.

    Sampling and speed:
        ``weighting_scheme`` (``none`` = uniform, ``logit_normal``, ``mode``), ``logit_mean``, ``logit_std``,
            ``mode_scale``: how noise levels are drawn (Diffusers' ``compute_density_for_timestep_sampling``).
        ``cache_latents``: run the frozen VAE and text encoder once per training clip (its epoch-0 clip window, crop
            and reference augmentation) and keep the results in memory. Faster, less augmentation.
        ``latent_cache``: a folder written by ``diasr cache-latents`` (same frames, size and VAE): training clips are
            read from it (first clip window, centre crop, no reference augmentation) and the VAE never runs on them.
        ``max_sequence_length``: text tokens the prompt is padded to (Wan: 512). Use the same value when generating
            with the trained weights (``DiasRPipeline(..., max_sequence_length=...)``).
        ``tiny_model``: arguments of ``utils.tiny.tiny_wan_components`` (toy model built in-process); with its random
            VAE (``vae`` unset) the VAE's latent statistics are measured on the first training clips.
    """

    stage: str
    train_data: str
    model: str | None = None
    tiny_model: dict[str, Any] | None = None
    init_from: str | None = None
    allow_scratch: bool = False
    eval_data: str | None = None
    eval_fraction: float = 0.1
    height: int = 64
    width: int = 64
    num_frames: int = 9
    frame_stride: int = 1
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_steps: int = 100
    learning_rate: float = 1e-4
    router_learning_rate: float | None = None
    weight_decay: float = 0.0
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0
    lora_rank: int = 16
    lora_alpha: int = 16
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    train_lora: bool = True
    router: dict[str, Any] = field(default_factory=dict)
    lambda_diffusion: float = 1.0
    lambda_route: float = 1.0
    lambda_mask: float = 1.0
    lambda_align: float = 0.1
    route_background: bool = True
    balanced_routing_loss: bool | float = True
    route_text: bool = True
    max_sequence_length: int = 512
    cache_latents: bool = False
    latent_cache: str | None = None
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    checkpointing_steps: int = 50
    checkpoints_total_limit: int = 2
    log_every: int = 1
    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    eval_sigmas: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7])
    seed: int = 0

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        if not isinstance(raw, dict):
            raise ConfigError(f"the config must be a mapping of keys to values, got {type(raw).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; known keys: {sorted(known)}")
        missing = [k for k in ("stage", "train_data") if k not in raw]
        if missing:
            raise ConfigError(f"missing required config key(s) {missing}")
        cfg = cls(**raw)
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        return cls.from_dict(raw or {})

    @property
    def random_toy_vae(self) -> bool:
        """The toy model with its random VAE (no fixed latents; statistics measured on the training clips)."""
        return self.tiny_model is not None and self.tiny_model.get("vae") is None

    @staticmethod
    def resolve(value: str | None) -> Path | None:
        return None if value is None else Path(value).expanduser()

    @staticmethod
    def manifest_path(value: str) -> Path:
        """A manifest file, or ``manifest.jsonl`` inside a folder (the rule ``diasr validate-data`` applies too)."""
        from ..data.manifest import resolve_manifest_path

        try:
            return resolve_manifest_path(value)
        except FileNotFoundError:  # the caller reports the missing path in its own words
            p = Path(value).expanduser()
            return p / "manifest.jsonl" if p.is_dir() else p

    def _validate_tiny_model(self) -> None:
        import inspect

        from ..utils.tiny import SPRITES_VAE, tiny_wan_components, toy_vae_path

        if not isinstance(self.tiny_model, dict):
            raise ConfigError(f"`tiny_model` must be a mapping of tiny_wan_components arguments, got {self.tiny_model!r}")
        allowed = set(inspect.signature(tiny_wan_components).parameters)
        unknown = sorted(set(self.tiny_model) - allowed)
        if unknown:
            raise ConfigError(f"unknown `tiny_model` key(s) {unknown}; allowed: {sorted(allowed)}")
        vae = self.tiny_model.get("vae")
        if vae is not None:
            try:
                toy_vae_path(vae)
            except ValueError:
                raise ConfigError(f"`tiny_model.vae` must be null, {SPRITES_VAE!r} or a saved AutoencoderKLWan folder, got {vae!r}") from None

    def validate(self) -> None:
        if self.stage not in STAGES:
            raise ConfigError(f"`stage` must be one of {STAGES}, got {self.stage!r}")
        if (self.model is None) == (self.tiny_model is None):
            raise ConfigError("give exactly one of `model` (a Wan2.1/DiasR Diffusers folder) or `tiny_model` (toy)")
        if self.model is not None and not self.resolve(self.model).is_dir():
            raise ConfigError(f"`model` folder not found: {self.resolve(self.model)}")
        if self.tiny_model is not None:
            self._validate_tiny_model()
        for key in ("train_data", "eval_data"):
            value = getattr(self, key)
            if value is not None and not self.manifest_path(value).is_file():
                raise ConfigError(f"`{key}` not found: {self.manifest_path(value)} (a manifest or a folder with manifest.jsonl)")
        if self.latent_cache is not None:
            if not (self.resolve(self.latent_cache) / "index.json").is_file():
                raise ConfigError(f"`latent_cache` has no index.json: {self.resolve(self.latent_cache)} (run `diasr cache-latents`)")
            if self.random_toy_vae:
                raise ConfigError("`latent_cache` needs a fixed VAE; the random toy VAE (tiny_model without `vae`) has none")
        if self.init_from is not None and not self.resolve(self.init_from).is_dir():
            raise ConfigError(f"`init_from` checkpoint folder not found: {self.resolve(self.init_from)}")
        if self.stage == "route" and self.init_from is None and not self.allow_scratch:
            raise ConfigError(
                "stage `route` starts from an `align` checkpoint: set `init_from: <align output dir>` "
                "(or `allow_scratch: true` to train the router from scratch)"
            )
        positive = ("height", "width", "num_frames", "batch_size", "gradient_accumulation_steps", "max_steps",
                    "checkpointing_steps", "checkpoints_total_limit", "lora_rank", "log_every", "frame_stride", "max_sequence_length")  # fmt: skip
        for key in positive:
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"`{key}` must be a positive integer, got {getattr(self, key)!r}")
        if (self.num_frames - 1) % 4:
            raise ConfigError(f"`num_frames` must be 1 + 4k for Wan's VAE, got {self.num_frames}")
        if self.height % 16 or self.width % 16:
            raise ConfigError(f"`height` and `width` must be multiples of 16, got {self.height}x{self.width}")
        if isinstance(self.balanced_routing_loss, str) or not 0.0 <= float(self.balanced_routing_loss) <= 1.0:
            raise ConfigError(f"`balanced_routing_loss` must be true, false or a float in [0, 1], got {self.balanced_routing_loss!r}")
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ConfigError(f"`weighting_scheme` must be one of {WEIGHTING_SCHEMES}, got {self.weighting_scheme!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"`mixed_precision` must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"`eval_fraction` must be in [0, 1), got {self.eval_fraction}")
        if self.learning_rate <= 0:
            raise ConfigError(f"`learning_rate` must be positive, got {self.learning_rate}")
