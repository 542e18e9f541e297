"""Training configuration: one YAML file, checked completely before anything is loaded."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WEIGHTING_SCHEMES = ("none", "logit_normal", "mode")  # diffusers.training_utils.compute_density_for_timestep_sampling
STAGES = ("align", "route", "dense")
# diffusers.optimization.get_scheduler types the training loop can drive: `piecewise_constant` needs step rules the
# config has no key for.
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
MIXED_PRECISION = ("no", "fp16", "bf16")

# Every key's type and range, checked when the config is built (nothing is loaded before). Numbers: (lower bound,
# lower inclusive, upper bound, upper inclusive); None = unbounded.
_POSITIVE_INTS = ("height", "width", "num_frames", "frame_stride", "batch_size", "gradient_accumulation_steps",
                  "max_steps", "lora_rank", "lora_alpha", "max_sequence_length", "checkpointing_steps",
                  "checkpoints_total_limit", "log_every")  # fmt: skip
_FLOATS: dict[str, tuple[float | None, bool, float | None, bool]] = {
    "eval_fraction": (0.0, True, 1.0, False),
    "learning_rate": (0.0, False, None, False),
    "weight_decay": (0.0, True, None, False),
    "max_grad_norm": (0.0, True, None, False),  # 0: no clipping
    "lambda_diffusion": (0.0, True, None, False),
    "lambda_route": (0.0, True, None, False),
    "lambda_mask": (0.0, True, None, False),
    "lambda_align": (0.0, True, None, False),
    "logit_mean": (None, False, None, False),
    "logit_std": (0.0, False, None, False),
    "mode_scale": (0.0, True, None, False),
    "caption_dropout": (0.0, True, 1.0, False),
    "reference_dropout": (0.0, True, 1.0, False),
    "subject_dropout": (0.0, True, 1.0, False),
}
# Condition dropout (`DiasRTrainer.drop_conditions`): the keys, and their values in runs that predate them (none).
DROPOUT_KEYS = ("caption_dropout", "reference_dropout", "subject_dropout")
_BOOLS = (
    "allow_scratch",
    "train_lora",
    "train_transformer",
    "route_background",
    "route_text",
    "cache_latents",
    "gradient_checkpointing",
)
_PATHS = ("train_data", "model", "init_from", "eval_data", "latent_cache")
# Keys of IDRouter's constructor a config may set; the others are read off the transformer.
_ROUTER_FROM_TRANSFORMER = ("hidden_dim", "text_dim", "num_layers")
_ROUTER_INTS = (
    "router_dim",
    "num_identity_queries",
    "num_heads",
    "num_null_anchors",
    "max_subjects",
    "context_kernel",
)
_MAX_ROUTER_PARAMS = 2**31  # far above any real router (Wan 14B, dim 1024: ~0.2B); stops a typo from eating all RAM
_MAX_LAYERS = 1024  # Wan2.1 14B has 40; an untrusted config.json must not make us build millions of modules
_LORA_MODULE_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d", "Embedding")  # what peft's LoRA can wrap


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_float(key: str, value: Any) -> float:
    """A number, or a numeric string: YAML 1.1 reads ``1e-3`` (no dot) as the string ``"1e-3"``."""
    if isinstance(value, bool):
        raise ConfigError(f"`{key}` must be a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ConfigError(f"`{key}` must be a number, got {value!r}") from None
    if not isinstance(value, (int, float)):
        raise ConfigError(f"`{key}` must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"`{key}` must be a finite number, got {value!r}")
    return float(value)


def _check_range(key: str, value: float, bounds: tuple[float | None, bool, float | None, bool]) -> None:
    lo, lo_in, hi, hi_in = bounds
    if (lo is not None and (value < lo or (value == lo and not lo_in))) or (
        hi is not None and (value > hi or (value == hi and not hi_in))
    ):
        left = "(-inf" if lo is None else ("[" if lo_in else "(") + f"{lo:g}"
        right = "inf)" if hi is None else f"{hi:g}" + ("]" if hi_in else ")")
        raise ConfigError(f"`{key}` must be in {left}, {right}, got {value!r}")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{what}: cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: {path} is not a JSON object")
    return data


class ConfigError(ValueError):
    """A bad training config: unknown key, missing file, wrong value."""


def _family_of_model_folder(model: str) -> str:
    """``model_family`` of a ``model`` folder, from its ``model_index.json`` (the family registry); ``"wan"`` when it
    cannot be read here (the model checks then say what is wrong with the folder)."""
    import json

    from ..families import UnsupportedFamilyError, family_for_pipeline

    try:
        index = json.loads((Path(model).expanduser() / "model_index.json").read_text())
        return family_for_pipeline(str(index.get("_class_name"))).name
    except (OSError, ValueError, AttributeError, UnsupportedFamilyError):
        return "wan"


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
        ``dense``: the Phantom-style baseline: every video token attends to every reference; flow-matching loss only,
            the router is not used or trained. Train it with the same data and budget as ``align`` + ``route`` for a
            fair comparison.

    Condition dropout (so the branches guidance samples with are trained; ``docs/training.md``), drawn per sample
    from ``(seed, step, sample)`` like the noise, so a resumed run drops exactly what an uninterrupted one did:
        ``caption_dropout`` (0.1): the caption becomes the empty prompt, encoded as the pipeline encodes its
            negative prompt; text is then not routed (as the pipeline's reference-only branch).
        ``reference_dropout`` (0.1, Phantom's rate): every reference goes, as the pipeline's negative branch feeds
            them: absent (video-only attention) for the ``diasr`` reference style and every non-Wan family, zero
            frames for ``phantom`` / ``skyreels_v3`` (``zero_negative_references``).
        ``subject_dropout`` (0.0): each subject independently loses its reference, as a call without that subject:
            its reference frames are removed, its phrase is no longer routed and its video tokens become background
            (null) in the routing targets. Dropping every subject drops every reference.
    By default every base-model weight stays frozen and a LoRA trains. ``train_transformer: true`` trains every
    weight of the video transformer instead (no LoRA; with ``tiny_model`` that is training it from scratch): the
    outputs then hold ``transformer/`` and ``pipeline/`` (a complete Diffusers folder:
    ``DiasRPipeline.from_pretrained(DIR / "pipeline")``).

    Sampling and speed:
        ``weighting_scheme`` (``none`` = uniform, ``logit_normal``, ``mode``), ``logit_mean``, ``logit_std``,
            ``mode_scale``: how noise levels are drawn (Diffusers' ``compute_density_for_timestep_sampling``).
        ``cache_latents``: run the frozen VAE and text encoder once per training clip (its epoch-0 clip window, crop
            and reference augmentation) and keep the results in memory. Faster, less augmentation.
        ``latent_cache``: a folder written by ``diasr cache-latents`` (same frames, size and VAE): training clips are
            read from it (first clip window, centre crop, no reference augmentation) and the VAE never runs on them.
        ``max_sequence_length``: text tokens the prompt is padded to (Wan: 512). Use the same value when generating
            with the trained weights (``DiasRPipeline(..., max_sequence_length=...)``).
        ``tiny_model``: a toy model built in-process: arguments of ``utils.tiny.tiny_wan_components`` (plus
            ``wan22: a14b | ti2v`` for a toy Wan2.2, ``tiny_wan22_components``), or of ``tiny_ltx_components`` /
            ``tiny_cogvideox_components`` / ``tiny_hunyuan_video15_components`` with ``model_family: ltx`` /
            ``cogvideox`` / ``hunyuan_video15``. With Wan's random VAE (``vae``
            unset) the VAE's latent statistics are measured on the first training clips.
        ``model_family``: ``wan`` (Wan2.1 and Wan2.2, flow matching; a Wan2.2 A14B folder trains both experts),
            ``ltx`` (LTX-Video, flow matching), ``cogvideox`` (CogVideoX 1.0 text-to-video, v-prediction) or
            ``hunyuan_video15`` (HunyuanVideo-1.5 text-to-video, flow matching); ``model``
            is then a stock or DiasR Diffusers folder of that family. Left out with a ``model`` folder: the family
            of its ``model_index.json`` (``diasr_diffusers.families``), so any family's checkpoint trains with the
            same config keys. See ``training/families.py``.
    """

    stage: str
    train_data: str
    model_family: str = "wan"
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
    train_transformer: bool = False
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
    caption_dropout: float = 0.1
    reference_dropout: float = 0.1
    subject_dropout: float = 0.0

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        """A checked config from a mapping of keys (as in the YAML file) to values."""
        if not isinstance(raw, dict):
            raise ConfigError(f"the config must be a mapping of keys to values, got {type(raw).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted((k for k in raw if k not in known), key=str)
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; known keys: {sorted(known)}")
        missing = [k for k in ("stage", "train_data") if k not in raw]
        if missing:
            raise ConfigError(f"missing required config key(s) {missing}")
        from .families import FAMILIES

        if "model_family" not in raw and isinstance(raw.get("model"), str):
            raw = {**raw, "model_family": _family_of_model_folder(raw["model"])}  # any family's checkpoint as is
        family = (
            FAMILIES.get(raw.get("model_family", "wan")) if isinstance(raw.get("model_family", "wan"), str) else None
        )
        return cls(
            **{**getattr(family, "config_defaults", {}), **raw}
        )  # a family's own defaults (Ingredients: no LoRA)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """A checked config from a YAML file. ``overrides`` (e.g. command-line options) replace the file's keys
        before anything is checked, so a key that is overridden need not be valid in the file."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not a YAML text file (not UTF-8)") from None
        try:
            raw = yaml.load(text, Loader=_unique_key_loader())  # a SafeLoader: no python/object tags
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if raw is None:
            raise ConfigError(f"{path} is empty; a training config needs at least `stage` and `train_data`")
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of keys to values, got a {type(raw).__name__}")
        return cls.from_dict({**raw, **(overrides or {})})

    @property
    def random_toy_vae(self) -> bool:
        """The toy model with its random VAE (no fixed latents; statistics measured on the training clips)."""
        return self.model_family == "wan" and self.tiny_model is not None and self.tiny_model.get("vae") is None

    @property
    def family(self) -> Any:
        """The :class:`~diasr_diffusers.training.families.TrainingFamily` of ``model_family``."""
        from .families import FAMILIES

        return FAMILIES[self.model_family]

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

    def to_dict(self) -> dict[str, Any]:
        """The keys and values, as a YAML/JSON mapping ``from_dict`` reads back."""
        return dataclasses.asdict(self)

    # -- checks ---------------------------------------------------------------------------------------------------

    def _validate_types(self) -> None:
        for key in ("stage", "lr_scheduler", "mixed_precision", "weighting_scheme"):
            if not isinstance(getattr(self, key), str):
                raise ConfigError(f"`{key}` must be a string, got {getattr(self, key)!r}")
        for key in _PATHS:
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(f"`{key}` must be a path (a non-empty string), got {value!r}")
        for key in _BOOLS:
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"`{key}` must be true or false, got {getattr(self, key)!r}")
        for key in _POSITIVE_INTS:
            if not _is_int(getattr(self, key)) or getattr(self, key) < 1:
                raise ConfigError(f"`{key}` must be a positive integer, got {getattr(self, key)!r}")
        if not _is_int(self.lr_warmup_steps) or self.lr_warmup_steps < 0:
            raise ConfigError(f"`lr_warmup_steps` must be an integer >= 0, got {self.lr_warmup_steps!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**32:
            raise ConfigError(f"`seed` must be an integer in [0, 2**32), got {self.seed!r}")
        for key, bounds in _FLOATS.items():
            value = _as_float(key, getattr(self, key))
            _check_range(key, value, bounds)
            setattr(self, key, value)
        if self.router_learning_rate is not None:
            # 0 is honoured (a frozen router), not replaced by `learning_rate`.
            self.router_learning_rate = _as_float("router_learning_rate", self.router_learning_rate)
            _check_range("router_learning_rate", self.router_learning_rate, (0.0, True, None, False))
        if not isinstance(self.balanced_routing_loss, bool):
            try:
                power = _as_float("balanced_routing_loss", self.balanced_routing_loss)
                _check_range("balanced_routing_loss", power, (0.0, True, 1.0, True))
            except ConfigError:
                raise ConfigError(
                    f"`balanced_routing_loss` must be true, false or a float in [0, 1], got {self.balanced_routing_loss!r}"
                ) from None
            self.balanced_routing_loss = power
        if not isinstance(self.eval_sigmas, (list, tuple)) or not self.eval_sigmas:
            raise ConfigError(
                f"`eval_sigmas` must be a non-empty list of noise levels in (0, 1], got {self.eval_sigmas!r}"
            )
        sigmas = [_as_float("eval_sigmas", s) for s in self.eval_sigmas]
        for s in sigmas:
            _check_range("eval_sigmas", s, (0.0, False, 1.0, True))
        if len(set(sigmas)) != len(sigmas):  # eval.json keys results by sigma: a repeat would hide one
            raise ConfigError(f"`eval_sigmas` has repeated values: {self.eval_sigmas!r}")
        self.eval_sigmas = sigmas
        targets = self.lora_targets
        if not isinstance(targets, (list, tuple)) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise ConfigError(
                f"`lora_targets` must be a non-empty list of module names (e.g. ['to_q', 'to_v']), got {targets!r}"
            )
        self.lora_targets = list(targets)
        if not isinstance(self.router, dict):
            raise ConfigError(f"`router` must be a mapping of IDRouter arguments, got {self.router!r}")
        if self.tiny_model is not None and not isinstance(self.tiny_model, dict):
            raise ConfigError(
                f"`tiny_model` must be a mapping of toy-model arguments (utils.tiny), got {self.tiny_model!r}"
            )

    def _validate_choices(self) -> None:
        from .families import FAMILIES

        if not isinstance(self.model_family, str) or self.model_family not in FAMILIES:
            raise ConfigError(f"`model_family` must be one of {sorted(FAMILIES)}, got {self.model_family!r}")
        if self.stage not in STAGES:
            raise ConfigError(f"`stage` must be one of {STAGES}, got {self.stage!r}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ConfigError(f"`lr_scheduler` must be one of {LR_SCHEDULERS}, got {self.lr_scheduler!r}")
        if self.lr_scheduler == "constant" and self.lr_warmup_steps:
            # diffusers' get_scheduler ignores the warmup of `constant`.
            raise ConfigError(
                "`lr_warmup_steps` has no effect with `lr_scheduler: constant`; use `constant_with_warmup`"
            )
        if self.lr_warmup_steps > self.max_steps:
            warnings.warn(
                f"`lr_warmup_steps` ({self.lr_warmup_steps}) > `max_steps` ({self.max_steps}): the warmup never ends",
                stacklevel=3,
            )
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ConfigError(f"`weighting_scheme` must be one of {WEIGHTING_SCHEMES}, got {self.weighting_scheme!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"`mixed_precision` must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        frames, pixels = self.family.frame_multiple, self.family.size_multiple
        if (self.num_frames - 1) % frames:
            raise ConfigError(
                f"`num_frames` must be 1 + {frames}k for the VAE of model_family {self.model_family}, "
                f"got {self.num_frames}"
            )
        if self.height % pixels or self.width % pixels:
            raise ConfigError(
                f"`height` and `width` must be multiples of {pixels} (model_family {self.model_family}), "
                f"got {self.height}x{self.width}"
            )
        if self.train_transformer and self.train_lora:
            raise ConfigError("`train_transformer: true` trains every transformer weight: set `train_lora: false`")
        if self.stage == "dense" and not (self.train_lora or self.train_transformer):
            raise ConfigError(
                "nothing to train: stage `dense` trains no router; set `train_lora` or `train_transformer`"
            )
        if self.router_learning_rate == 0 and not (self.train_lora or self.train_transformer):
            raise ConfigError("nothing to train: `router_learning_rate` is 0 and `train_lora` is false")
        if self.cache_latents and self.latent_cache is not None:
            raise ConfigError(
                "`cache_latents` and `latent_cache` exclude each other (a latent cache is already encoded)"
            )

    def _validate_tiny_model(self) -> None:
        from ..utils.tiny import SPRITES_VAE, toy_vae_path

        allowed = self.family.tiny_parameters()
        unknown = sorted((k for k in self.tiny_model if k not in allowed), key=str)
        if unknown:
            raise ConfigError(f"unknown `tiny_model` key(s) {unknown}; allowed: {sorted(allowed)}")
        self.family.check_tiny_model(self.tiny_model)
        for key, value in self.tiny_model.items():
            if key == "seed" and not (_is_int(value) and value >= 0):
                raise ConfigError(f"`tiny_model.seed` must be an integer >= 0, got {value!r}")
            if key == "patch_size" and not (
                isinstance(value, (list, tuple)) and len(value) == 3 and all(_is_int(v) and v >= 1 for v in value)
            ):
                raise ConfigError(f"`tiny_model.patch_size` must be 3 positive integers, got {value!r}")
            if key == "use_rotary_positional_embeddings":
                if not isinstance(value, bool):
                    raise ConfigError(f"`tiny_model.{key}` must be true or false, got {value!r}")
                continue
            if key not in ("seed", "patch_size", "vae", "wan22") and not (_is_int(value) and value >= 1):
                raise ConfigError(f"`tiny_model.{key}` must be a positive integer, got {value!r}")
        vae = self.tiny_model.get("vae")
        if vae is not None:
            try:
                toy_vae_path(vae)
            except (ValueError, TypeError):
                raise ConfigError(
                    f"`tiny_model.vae` must be null, {SPRITES_VAE!r} or a saved AutoencoderKLWan folder, got {vae!r}"
                ) from None

    def transformer_config(self) -> dict[str, Any]:
        """The config of the transformer training will use (read from ``model``'s folder, nothing loaded)."""
        if self.tiny_model is not None and self.model_family != "wan":
            import torch

            with torch.device("meta"):  # the toy's exact config, no weights
                transformer = self.family.tiny_components(self.tiny_model)["transformer"]
            return {"_class_name": type(transformer).__name__, **transformer.config}
        if self.tiny_model is not None:
            import inspect

            from ..utils.tiny import tiny_wan_components

            defaults = {k: p.default for k, p in inspect.signature(tiny_wan_components).parameters.items()}
            return {
                "_class_name": "WanTransformer3DModel",
                **{k: v for k, v in {**defaults, **self.tiny_model}.items() if k not in ("seed", "vae", "wan22")},
            }
        return _read_json(self.resolve(self.model) / "transformer" / "config.json", "`model`")

    def _validate_model(self) -> None:
        model = self.resolve(self.model)
        if not model.is_dir():
            raise ConfigError(f"`model` folder not found: {model}")
        index = _read_json(model / "model_index.json", "`model` (a Wan2.1 or DiasR Diffusers folder)")
        expected = self.family.pipeline_classes
        if index.get("_class_name") not in expected:
            raise ConfigError(
                f"`model` {model} is a {index.get('_class_name')!r}; expected a {' or '.join(expected)} folder "
                f"(model_family: {self.model_family})"
            )

    def _validate_router_and_lora(self) -> None:
        """Router arguments and LoRA targets against the model's transformer, built on the meta device (no memory,
        no weights): what would otherwise fail only after the model is loaded."""
        import inspect

        import diffusers
        import torch

        from ..routing import IDRouter

        allowed = [k for k in inspect.signature(IDRouter.__init__).parameters if k != "self"]
        settable = [k for k in allowed if k not in _ROUTER_FROM_TRANSFORMER]
        unknown = sorted((k for k in self.router if k not in settable), key=str)
        if unknown:
            raise ConfigError(f"unknown or fixed `router` key(s) {unknown}; allowed: {settable}")
        for key in _ROUTER_INTS:
            if key in self.router and not (_is_int(self.router[key]) and self.router[key] >= 1):
                raise ConfigError(f"`router.{key}` must be a positive integer, got {self.router[key]!r}")
        routed = self.router.get("routed_layers", "all")
        if isinstance(routed, bool) or not (
            routed == "all" or _is_int(routed) or (isinstance(routed, list) and all(_is_int(i) for i in routed))
        ):
            raise ConfigError(
                f"`router.routed_layers` must be 'all', a stride (int) or a list of layer indices, got {routed!r}"
            )

        tcfg = self.transformer_config()
        cls_name = tcfg.get("_class_name", "WanTransformer3DModel")
        transformer_cls = getattr(diffusers, cls_name, None) if isinstance(cls_name, str) else None
        if transformer_cls is None:
            raise ConfigError(f"`model`'s transformer is a {cls_name!r}, not a Diffusers model class")
        init_keys = set(inspect.signature(transformer_cls.__init__).parameters)
        one_block = {
            k: (tuple(v) if k == "patch_size" and isinstance(v, list) else v)
            for k, v in tcfg.items()
            if k in init_keys
        }
        num_layers = one_block.get("num_layers", 1)
        if not _is_int(num_layers) or not 1 <= num_layers <= _MAX_LAYERS:
            raise ConfigError(
                f"the transformer config's `num_layers` must be an integer in [1, {_MAX_LAYERS}], got {num_layers!r}"
            )
        one_block["num_layers"] = 1  # module names repeat per block: one block is enough to match targets
        try:
            with torch.device("meta"):
                transformer = transformer_cls(**one_block)
                hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
                text_dim = IDRouter.host_sizes(transformer)["text_dim"]
                router = IDRouter(hidden_dim=hidden, text_dim=text_dim, num_layers=num_layers, **self.router)
        except ConfigError:
            raise
        except (ValueError, TypeError, AttributeError, AssertionError, RuntimeError) as e:
            where = "`router`" if "transformer" in locals() else "the transformer config"
            raise ConfigError(f"{where} is unusable: {e}") from None
        n_params = sum(p.numel() for p in router.parameters())
        if n_params > _MAX_ROUTER_PARAMS:
            raise ConfigError(
                f"`router` would have {n_params:,} parameters; check its sizes (router_dim, num_identity_queries, ...)"
            )
        self._router_init = {k: router.config[k] for k in allowed}
        self._router_init["routed_layers"] = router.routed_layer_indices

        modules = [(name, type(m).__name__) for name, m in transformer.named_modules()]
        for target in self.lora_targets:
            hits = [kind for name, kind in modules if name == target or name.endswith("." + target)]
            if not hits:
                raise ConfigError(
                    f"`lora_targets`: no module of the transformer is named {target!r} (e.g. to_q, to_k, to_v, to_out.0, ffn.net.2)"
                )
            if not any(kind in _LORA_MODULE_TYPES for kind in hits):
                raise ConfigError(
                    f"`lora_targets`: {target!r} names a {hits[0]}, which LoRA cannot wrap (use its Linear layers)"
                )

    def _validate_init_from(self) -> None:
        """``init_from`` must be a ``diasr train`` output whose router and LoRA fit this config."""
        folder = self.resolve(self.init_from)
        if not folder.is_dir():
            raise ConfigError(f"`init_from` checkpoint folder not found: {folder}")
        saved = _read_json(
            folder / "router" / "config.json", "`init_from` (expected a diasr train output with router/)"
        )
        from ..routing import resolve_routed_layers

        diffs = []
        for key, ours in self._router_init.items():
            theirs = saved.get(key)
            if key == "routed_layers":
                try:
                    theirs = resolve_routed_layers(theirs, saved.get("num_layers", 0))
                except (ValueError, TypeError):
                    pass
            if theirs != ours:
                diffs.append(f"{key}: {theirs!r} there, {ours!r} here")
        if diffs:
            raise ConfigError(f"`init_from` router does not fit this config ({'; '.join(diffs)})")
        if self.train_transformer and not (folder / "transformer" / "config.json").is_file():
            raise ConfigError(
                f"`init_from` {folder} has no transformer/ (`train_transformer: true` continues a run that trained it)"
            )
        lora = folder / "pytorch_lora_weights.safetensors"
        if lora.is_file() and self.train_lora:
            from safetensors import safe_open

            try:
                with safe_open(str(lora), "pt") as f:
                    shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
            except Exception as e:  # safetensors raises its own error types for a damaged header
                raise ConfigError(f"`init_from`: cannot read {lora}: {e}") from None
            ranks = {s[0] for k, s in shapes.items() if ".lora_A." in k}
            if ranks and ranks != {self.lora_rank}:
                raise ConfigError(
                    f"`init_from` LoRA has rank {sorted(ranks)}, the config's `lora_rank` is {self.lora_rank}"
                )
            modules = {k.split(".lora_")[0] for k in shapes}
            uncovered = sorted(m for m in modules if not any(m == t or m.endswith("." + t) for t in self.lora_targets))
            if uncovered:
                raise ConfigError(
                    f"`init_from` LoRA covers modules `lora_targets` leaves out (their training would be lost): {uncovered[:4]}"
                )

    def validate(self) -> None:
        """Check every key's type and range, and every path, without loading anything. Raises :class:`ConfigError`."""
        self._validate_types()
        self._validate_choices()
        if (self.model is None) == (self.tiny_model is None):
            raise ConfigError("give exactly one of `model` (a Wan2.1/DiasR Diffusers folder) or `tiny_model` (toy)")
        if self.model is not None:
            self._validate_model()
        else:
            self._validate_tiny_model()
        for key in ("train_data", "eval_data"):
            value = getattr(self, key)
            if value is not None and not self.manifest_path(value).is_file():
                raise ConfigError(
                    f"`{key}` not found: {self.manifest_path(value)} (a manifest or a folder with manifest.jsonl)"
                )
        if self.latent_cache is not None:
            if not (self.resolve(self.latent_cache) / "index.json").is_file():
                raise ConfigError(
                    f"`latent_cache` has no index.json: {self.resolve(self.latent_cache)} (run `diasr cache-latents`)"
                )
            if self.random_toy_vae:
                raise ConfigError(
                    "`latent_cache` needs a fixed VAE; the random toy VAE (tiny_model without `vae`) has none"
                )
        if (
            self.stage == "route"
            and self.init_from is None
            and not self.allow_scratch
            and self.family.route_needs_align
        ):
            raise ConfigError(
                "stage `route` starts from an `align` checkpoint: set `init_from: <align output dir>` "
                "(or `allow_scratch: true` to train the router from scratch)"
            )
        if hasattr(self.family, "validate_config"):  # a family with its own routers (Ingredients) checks them itself
            self.family.validate_config(self)
            return
        self._validate_router_and_lora()
        if self.init_from is not None:
            self._validate_init_from()


@functools.cache
def _unique_key_loader() -> type:
    """PyYAML's SafeLoader (no python/object tags), but a key given twice is an error: PyYAML keeps the last one,
    so a repeated ``learning_rate:`` would silently win."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then overriding a key is intended
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    repeated = key in seen
                except TypeError:  # unhashable: SafeLoader reports it below
                    continue
                if repeated:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice", key_node.start_mark
                    )
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader
