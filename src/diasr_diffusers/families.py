"""The model families diasr-diffusers supports, in one explicit registry.

A :class:`FamilySpec` states everything the rest of the library needs to know about one family of Diffusers video
models: which transformer and stock pipeline classes belong to it, our pipeline and attention-processor adapter for
it, where its tokens come from (VAE strides, patch size, text width: router sizing and subject masks), how its
checkpoints load, its training objective and its toy model. The installer
(:func:`~diasr_diffusers.processors.set_subject_sparse_attn_processor`), router sizing
(:meth:`~diasr_diffusers.routing.IDRouter.host_sizes`), masks (:func:`~diasr_diffusers.routing.token_grid_factors`),
the loader (:func:`~diasr_diffusers.pipelines.loading.load_pipeline`), the trainer and the command line read these
entries instead of probing models with ``getattr``.

Classes are named by dotted path (``"package.module:Name"``) and imported on first use, so importing this module
costs nothing (no torch, no diffusers) and no family registers itself as an import side effect.

Example:
    ```py
    >>> from diasr_diffusers.families import FAMILIES, family_for_pipeline, family_for_transformer
    >>> sorted(FAMILIES)
    ['cogvideox', 'hunyuan_video15', 'ingredients', 'ltx', 'wan']
    >>> family_for_pipeline("LTXPipeline").name  # a stock checkpoint's model_index.json `_class_name`
    'ltx'
    >>> family_for_transformer(pipe.transformer).token_grid(pipe.transformer.config, pipe.vae)
    {'temporal_compression': 4, 'spatial_compression': 8, 'patch_size': (1, 2, 2)}
    ```
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "FAMILIES",
    "FamilySpec",
    "UnsupportedFamilyError",
    "family_for_pipeline",
    "family_for_transformer",
    "family_for_vae",
    "resolve",
    "supported_transformer_classes",
]


class UnsupportedFamilyError(TypeError):
    """A model that belongs to no registered family, or a feature its family does not have."""


def resolve(dotted: str) -> Any:
    """The object a ``"package.module:Name"`` path names (imported now)."""
    module, _, name = dotted.partition(":")
    return getattr(importlib.import_module(module), name)


def _config(obj: Any) -> Mapping[str, Any]:
    """A model's config as a mapping: a ``ModelMixin`` (its ``config``), a ``FrozenDict`` or a parsed ``config.json``."""
    if obj is None:
        return {}
    config = obj if isinstance(obj, Mapping) else obj.config
    return config if isinstance(config, Mapping) else vars(config)  # a namespace standing in for a config


# -- token-grid facts, read from a config mapping (a loaded model's `config` or a checkpoint's config.json) ---------
# Each returns ``(temporal, spatial)`` VAE compression or the transformer's ``(p_t, p_h, p_w)`` patch; the defaults
# are the Diffusers classes' own defaults, for a config.json that omits a key.


def _wan_vae_strides(cfg: Mapping[str, Any]) -> tuple[int, int]:
    return int(cfg.get("scale_factor_temporal") or 4), int(cfg.get("scale_factor_spatial") or 8)


def _ltx_vae_strides(cfg: Mapping[str, Any]) -> tuple[int, int]:
    # AutoencoderKLLTXVideo stores None and derives the ratios from its patchify and its 2x scalings.
    scalings = sum(bool(s) for s in cfg.get("spatio_temporal_scaling", (True, True, True, False)))
    temporal = cfg.get("temporal_compression_ratio") or int(cfg.get("patch_size_t", 1)) * 2**scalings
    spatial = cfg.get("spatial_compression_ratio") or int(cfg.get("patch_size", 4)) * 2**scalings
    return int(temporal), int(spatial)


def _cogvideox_vae_strides(cfg: Mapping[str, Any]) -> tuple[int, int]:
    # AutoencoderKLCogVideoX halves space once per block after the first (Diffusers' CogVideoXPipeline reads it so).
    blocks = cfg.get("block_out_channels", (128, 256, 256, 512))
    return int(cfg.get("temporal_compression_ratio") or 4), 2 ** (len(blocks) - 1)


def _hunyuan_video15_vae_strides(cfg: Mapping[str, Any]) -> tuple[int, int]:
    return int(cfg.get("temporal_compression_ratio") or 4), int(cfg.get("spatial_compression_ratio") or 16)


def _tuple_patch(cfg: Mapping[str, Any]) -> tuple[int, int, int]:
    return tuple(int(p) for p in cfg.get("patch_size", (1, 2, 2)))  # Wan: (p_t, p_h, p_w)


def _int_patch(default: int) -> Callable[[Mapping[str, Any]], tuple[int, int, int]]:
    def patch(cfg: Mapping[str, Any]) -> tuple[int, int, int]:
        spatial = int(cfg.get("patch_size", default))  # a spatial patch, `patch_size_t` apart (None: 1)
        return int(cfg.get("patch_size_t") or 1), spatial, spatial

    return patch


@dataclass(frozen=True)
class FamilySpec:
    """What diasr-diffusers knows about one family of Diffusers video models.

    Class fields are dotted paths (``"package.module:Name"``), imported on first use.

    Args:
        name: the registry key (also ``model_family`` in training configs).
        title: the family's name in messages and docs.
        transformer_classes: the Diffusers transformer classes this family's processors and routers serve
            (subclasses match too; the most specific registered class wins).
        vae_classes: its VAE classes (:func:`family_for_vae`).
        stock_pipelines: the ``model_index.json`` class names of stock checkpoints our pipeline converts.
        pipeline: our pipeline class (its class name is the ``_class_name`` of a saved DiasR checkpoint).
        convert: the classmethod of ``pipeline`` that builds it from a stock checkpoint folder (``"from_wan"``);
            ``None`` when ``pipeline.from_pretrained`` reads a stock folder as it is.
        processor: the attention-processor adapter (``None``: subject-sparse attention does not apply).
        processor_prefix: only attention modules whose name starts with this are routed (``None``: all).
        installer: the family's own installer, kept as an alias of
            :func:`~diasr_diffusers.processors.set_subject_sparse_attn_processor`.
        no_processor_reason: why ``processor`` is ``None`` (the installer's refusal).
        text_dim_key: the transformer config key of the text-encoder width (router sizing).
        vae_strides: ``(temporal, spatial)`` compression from the VAE config.
        patch_size: ``(p_t, p_h, p_w)`` from the transformer config.
        rope_limit_key: transformer config key bounding the tokens per axis (Wan's ``rope_max_seq_len``), if any.
        max_sequence_length: the family pipeline's default prompt length (tokens).
        max_frames: the longest clip offered by ``diasr app`` when the config states no bound.
        context_parallel: routed attention runs under Diffusers' context parallelism (Ulysses).
        reference_styles: the pipeline has reference-style presets (``pipe.reference_style``; Wan), which then give
            the sampling defaults.
        sampling_defaults: ``height``, ``width``, ``num_frames``, ``num_inference_steps``, ``guidance_scale`` and
            ``fps`` of the family's stock pipeline and model card (``diasr app``'s starting values).
        training_family: the :class:`~diasr_diffusers.training.families.TrainingFamily` for ``model_family``.
        tiny_components: builder of the toy model's components (tests, ``tiny_model`` in training configs).
        lacks: what the family does not offer, ``{feature: reason}``; features: ``"generate"`` (``diasr generate``
            and ``diasr app``), ``"masks"`` (layout masks), ``"lora"``.
    """

    name: str
    title: str
    transformer_classes: tuple[str, ...]
    vae_classes: tuple[str, ...]
    stock_pipelines: tuple[str, ...]
    pipeline: str
    convert: str | None
    processor: str | None
    processor_prefix: str | None
    installer: str | None
    text_dim_key: str
    vae_strides: Callable[[Mapping[str, Any]], tuple[int, int]]
    patch_size: Callable[[Mapping[str, Any]], tuple[int, int, int]]
    training_family: str
    tiny_components: str
    max_sequence_length: int
    max_frames: int
    rope_limit_key: str | None = None
    no_processor_reason: str | None = None
    context_parallel: bool = False
    reference_styles: bool = False
    sampling_defaults: Mapping[str, Any] = field(default_factory=dict)
    lacks: Mapping[str, str] = field(default_factory=dict)

    # -- classes -------------------------------------------------------------------------------------------------

    def transformer_types(self) -> tuple[type, ...]:
        return tuple(resolve(c) for c in self.transformer_classes)

    def pipeline_class(self) -> type:
        return resolve(self.pipeline)

    def processor_class(self) -> type:
        """The adapter; raises :class:`UnsupportedFamilyError` (with the reason) for a family without one."""
        if self.processor is None:
            raise UnsupportedFamilyError(f"subject-sparse attention does not apply to {self.title}: it {self.no_processor_reason}")  # fmt: skip
        return resolve(self.processor)

    def training(self) -> Any:
        """This family's :class:`~diasr_diffusers.training.families.TrainingFamily` (an instance)."""
        return resolve(self.training_family)()

    def tiny_builder(self) -> Callable[..., dict[str, Any]]:
        return resolve(self.tiny_components)

    @property
    def pipeline_class_name(self) -> str:
        return self.pipeline.rpartition(":")[2]

    @property
    def checkpoint_classes(self) -> tuple[str, ...]:
        """``model_index.json`` class names this family loads: our pipeline's, then the stock ones."""
        return (self.pipeline_class_name, *self.stock_pipelines)

    # -- facts ---------------------------------------------------------------------------------------------------

    def token_grid(self, transformer_config: Any = None, vae: Any = None) -> dict[str, Any]:
        """``temporal_compression``, ``spatial_compression`` and ``patch_size`` of the token grid, from the
        transformer's config and the VAE (a model or a config mapping; ``None``: the Diffusers class defaults)."""
        temporal, spatial = self.vae_strides(_config(vae))
        return {
            "temporal_compression": temporal,
            "spatial_compression": spatial,
            "patch_size": self.patch_size(_config(transformer_config)),
        }

    def text_dim(self, transformer_config: Any) -> int | None:
        """The width of the text-encoder features the transformer takes."""
        return _config(transformer_config).get(self.text_dim_key)

    def check_supports(self, feature: str, what: str) -> None:
        """Refuse ``feature`` (a key of :attr:`lacks`) by name: ``UnsupportedFamilyError`` starting with ``what``."""
        if feature in self.lacks:
            raise UnsupportedFamilyError(f"{what}: {self.title} {self.lacks[feature]}")


_P = "diasr_diffusers.processors"
_T = "diasr_diffusers.training.families"

# The registry. Order matters only for messages (it lists the supported classes in this order).
FAMILIES: dict[str, FamilySpec] = {
    "wan": FamilySpec(
        name="wan",
        title="Wan2.1 / Wan2.2",
        transformer_classes=("diffusers:WanTransformer3DModel",),
        vae_classes=("diffusers:AutoencoderKLWan",),
        stock_pipelines=("WanPipeline",),
        pipeline="diasr_diffusers.pipelines.pipeline_diasr_wan:DiasRPipeline",
        convert="from_wan",
        processor=f"{_P}.wan:SubjectSparseAttnProcessor",
        processor_prefix=None,
        installer=f"{_P}.wan:set_wan_subject_sparse_attn_processor",
        text_dim_key="text_dim",
        vae_strides=_wan_vae_strides,
        patch_size=_tuple_patch,
        rope_limit_key="rope_max_seq_len",
        training_family=f"{_T}:TrainingFamily",
        tiny_components="diasr_diffusers.utils.tiny:tiny_wan_components",
        max_sequence_length=512,
        max_frames=81,
        context_parallel=True,
        reference_styles=True,
    ),
    "ltx": FamilySpec(
        name="ltx",
        title="LTX-Video",
        transformer_classes=("diffusers:LTXVideoTransformer3DModel",),
        vae_classes=("diffusers:AutoencoderKLLTXVideo",),
        stock_pipelines=("LTXPipeline",),
        pipeline="diasr_diffusers.pipelines.pipeline_diasr_ltx:DiasRLTXPipeline",
        convert="from_ltx",
        processor=f"{_P}.ltx:LTXSubjectSparseAttnProcessor",
        processor_prefix=None,
        installer=f"{_P}.ltx:set_ltx_subject_sparse_attn_processor",
        text_dim_key="caption_channels",
        vae_strides=_ltx_vae_strides,
        patch_size=_int_patch(1),
        training_family=f"{_T}:LTXTrainingFamily",
        tiny_components="diasr_diffusers.utils.tiny:tiny_ltx_components",
        max_sequence_length=128,
        max_frames=257,
        sampling_defaults={"height": 512, "width": 704, "num_frames": 161, "num_inference_steps": 50,
                           "guidance_scale": 3.0, "fps": 24},  # fmt: skip
    ),
    "cogvideox": FamilySpec(
        name="cogvideox",
        title="CogVideoX",
        transformer_classes=("diffusers:CogVideoXTransformer3DModel",),
        vae_classes=("diffusers:AutoencoderKLCogVideoX",),
        stock_pipelines=("CogVideoXPipeline",),
        pipeline="diasr_diffusers.pipelines.pipeline_diasr_cogvideox:DiasRCogVideoXPipeline",
        convert="from_cogvideox",
        processor=f"{_P}.cogvideox:CogVideoXSubjectSparseAttnProcessor",
        processor_prefix=None,
        installer=f"{_P}.cogvideox:set_cogvideox_subject_sparse_attn_processor",
        text_dim_key="text_embed_dim",
        vae_strides=_cogvideox_vae_strides,
        patch_size=_int_patch(2),
        training_family=f"{_T}:CogVideoXTrainingFamily",
        tiny_components="diasr_diffusers.utils.tiny:tiny_cogvideox_components",
        max_sequence_length=226,
        max_frames=49,
        sampling_defaults={"height": 480, "width": 720, "num_frames": 49, "num_inference_steps": 50,
                           "guidance_scale": 6.0, "fps": 8},  # fmt: skip
    ),
    "hunyuan_video15": FamilySpec(
        name="hunyuan_video15",
        title="HunyuanVideo-1.5",
        transformer_classes=("diffusers:HunyuanVideo15Transformer3DModel",),
        vae_classes=("diffusers:AutoencoderKLHunyuanVideo15",),
        stock_pipelines=("HunyuanVideo15Pipeline",),
        pipeline="diasr_diffusers.pipelines.pipeline_diasr_hunyuan_video15:DiasRHunyuanVideo15Pipeline",
        convert=None,  # a stock folder loads with from_pretrained as it is
        processor=f"{_P}.hunyuan_video15:HunyuanVideo15SubjectSparseAttnProcessor",
        processor_prefix="transformer_blocks.",  # the text refiner keeps its own processors
        installer=f"{_P}.hunyuan_video15:set_hunyuan_video15_subject_sparse_attn_processor",
        text_dim_key="text_embed_dim",
        vae_strides=_hunyuan_video15_vae_strides,
        patch_size=_int_patch(1),
        training_family=f"{_T}:HunyuanVideo15TrainingFamily",
        tiny_components="diasr_diffusers.utils.tiny:tiny_hunyuan_video15_components",
        max_sequence_length=1000,
        max_frames=121,
        sampling_defaults={"height": 480, "width": 848, "num_frames": 121, "num_inference_steps": 50,
                           "guidance_scale": 6.0, "fps": 24},  # fmt: skip
    ),
    "ingredients": FamilySpec(
        name="ingredients",
        title="Ingredients",
        transformer_classes=("diasr_diffusers.models.transformer_ingredients:IngredientsTransformer3DModel",),
        vae_classes=(),  # CogVideoX's VAE: `family_for_vae` answers cogvideox, whose grid facts these are
        stock_pipelines=(),
        pipeline="diasr_diffusers.pipelines.pipeline_ingredients:IngredientsPipeline",
        convert=None,
        processor=None,
        processor_prefix=None,
        installer=None,
        no_processor_reason=(
            "routes identities with its own per-layer routers (`router.{i}`, `routing='hard'|'soft'`) and takes the "
            "faces as features, not as reference tokens in the attention sequence: use IngredientsPipeline"
        ),
        text_dim_key="text_embed_dim",
        vae_strides=_cogvideox_vae_strides,
        patch_size=_int_patch(2),
        training_family="diasr_diffusers.training.ingredients:IngredientsTrainingFamily",
        tiny_components="diasr_diffusers.utils.tiny_ingredients:tiny_ingredients_components",
        max_sequence_length=226,
        max_frames=49,
        lacks={
            "generate": (
                "takes the subjects as faces (face images run through its face models, or precomputed features), "
                "not as --subject reference images with phrases; use IngredientsPipeline from Python "
                "(docs/models.md)"
            ),
            "masks": "routes with its own ID routers and takes no layout masks",
        },
    ),
}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def supported_transformer_classes(with_processor: bool = False) -> list[str]:
    """The class names :func:`family_for_transformer` accepts, with their family (for messages); ``with_processor``:
    only those :func:`~diasr_diffusers.processors.set_subject_sparse_attn_processor` accepts."""
    return [
        f"{c.rpartition(':')[2]} ({spec.title})"
        for spec in FAMILIES.values()
        if spec.processor is not None or not with_processor
        for c in spec.transformer_classes
    ]


def family_for_transformer(transformer: Any) -> FamilySpec:
    """The family of a Diffusers transformer (an instance or a class), by its class: the most specific registered
    class in its MRO decides. Raises :class:`UnsupportedFamilyError` listing the supported classes."""
    cls = transformer if isinstance(transformer, type) else type(transformer)
    # Compare classes only once their module is loaded (an instance of a class implies its module is), so a
    # lookup never imports every family's model code.
    for base in cls.__mro__:
        for spec in FAMILIES.values():
            for dotted in spec.transformer_classes:
                if dotted.rpartition(":")[2] == base.__name__ and resolve(dotted) is base:
                    return spec
    raise UnsupportedFamilyError(
        f"{cls.__name__} is not a supported transformer; supported: {', '.join(supported_transformer_classes())}"
    )


def family_for_vae(vae: Any) -> FamilySpec | None:
    """The family whose VAE class ``vae`` is an instance of (``None`` when no registered family has it)."""
    for base in type(vae).__mro__:
        for spec in FAMILIES.values():
            for dotted in spec.vae_classes:
                if dotted.rpartition(":")[2] == base.__name__ and resolve(dotted) is base:
                    return spec
    return None


def family_for_pipeline(pipe_or_class_name: Any) -> FamilySpec:
    """The family of a pipeline: an instance or class (ours or a stock Diffusers one, subclasses too) or a
    ``model_index.json`` ``_class_name``. Raises :class:`UnsupportedFamilyError` listing the known class names."""
    if isinstance(pipe_or_class_name, str):
        names = [pipe_or_class_name]
    else:
        cls = pipe_or_class_name if isinstance(pipe_or_class_name, type) else type(pipe_or_class_name)
        names = [base.__name__ for base in cls.__mro__]
    for name in names:
        for spec in FAMILIES.values():
            if name in spec.checkpoint_classes:
                return spec
    known = ", ".join(n for spec in FAMILIES.values() for n in spec.checkpoint_classes)
    raise UnsupportedFamilyError(f"{names[0]} is not a pipeline of a supported family; expected one of: {known}")
