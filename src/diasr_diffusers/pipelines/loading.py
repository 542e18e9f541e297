"""Loading a DiasR pipeline of any family from a checkpoint folder or Hub id: the library side of ``diasr generate``,
``diasr app`` and ``diasr train``.

The family is read from the checkpoint's ``model_index.json`` (``_class_name``) through the family registry
(:mod:`diasr_diffusers.families`): a saved DiasR pipeline loads with its class's ``from_pretrained``, a stock one
(``WanPipeline``, ``LTXPipeline``, ``CogVideoXPipeline``, ``HunyuanVideo15Pipeline``) is converted by its family's
``from_<family>`` (or loaded as it is where the DiasR class reads it). Everything a caller can get wrong is checked
against the JSON configs before any weights are read, and reported as a :class:`UsageError` of one sentence.

Example:
    ```py
    >>> from diasr_diffusers.pipelines import DiasRAutoPipeline, load_pipeline
    >>> pipe = DiasRAutoPipeline.from_pretrained("Lightricks/LTX-Video", torch_dtype=torch.bfloat16)  # DiasRLTXPipeline
    >>> pipe = load_pipeline("path/to/wan2.1", router="path/to/router", lora="lora.safetensors")  # DiasRPipeline
    ```
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..families import FamilySpec, UnsupportedFamilyError, family_for_pipeline

EXAMPLE_MODEL = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what `diasr train` writes, Diffusers' default name
# Wan2.2 A14B's low-noise expert: its own file, loaded as Diffusers does (`load_lora_weights(..., load_into_transformer_2=True)`).
LORA_2_WEIGHT_NAME = "pytorch_lora_weights_2.safetensors"


class UsageError(ValueError):
    """A mistake in what the user asked for (a path, a flag, sizes the model cannot make): one sentence, naming the
    flag or argument (the command line prints it on stderr with exit code 2)."""


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _shape_mismatch_sentence(err: BaseException) -> str | None:
    """One sentence for torch's multi-line ``size mismatch for ...`` load errors; ``None`` for other errors."""
    lines = [line.strip() for line in str(err).splitlines() if "size mismatch for" in line]
    if not lines:
        return None
    more = f" (and {len(lines) - 1} more tensors)" if len(lines) > 1 else ""
    return f"its tensor shapes do not fit this model: {lines[0].removeprefix('size mismatch for ')}{more}"


def resolve_checkpoint(name: str, flag: str) -> Path:
    """A local folder for ``name``: the folder itself, or a Hub snapshot. Errors say what was not found, where."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )
    from huggingface_hub.utils import validate_repo_id

    local = Path(name).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise UsageError(f"{flag} {name!r} is a file; expected a Diffusers folder or a Hub repo id")
    try:
        validate_repo_id(name)
    except HFValidationError:
        # Not a possible repo id, so it was meant as a local path.
        raise UsageError(f"{flag} {name!r}: no such folder ({local.absolute()})") from None
    from ..utils.checkpoint_paths import check_hub_repo

    try:  # at once, not after a minute of retries: offline and not cached, Hub unreachable, no such repo
        check_hub_repo(name, flag, f"expected a local Diffusers folder or a Hub repo id such as {EXAMPLE_MODEL}")
    except OSError as err:
        raise UsageError(str(err)) from None
    try:
        return Path(_download(name))
    except GatedRepoError:
        raise UsageError(f"{flag} {name!r}: the Hub repo is gated; accept its terms on huggingface.co and log in (hf auth login)") from None  # fmt: skip
    except RepositoryNotFoundError:
        raise UsageError(f"{flag} {name!r}: no local folder {local.absolute()} and no Hub repo {name} (or it is private: log in)") from None  # fmt: skip
    except LocalEntryNotFoundError:
        why = (
            "offline mode (HF_HUB_OFFLINE=1) forbids downloading it"
            if constants.HF_HUB_OFFLINE
            else "the Hub could not be reached to download it"
        )
        raise UsageError(
            f"{flag} {name!r}: no local folder {local.absolute()}; as a Hub repo id it is not in the cache "
            f"({constants.HF_HUB_CACHE}) and {why}. Expected a local Diffusers folder or a Hub repo id such as "
            f"{EXAMPLE_MODEL} (`hf download {EXAMPLE_MODEL}`)"
        ) from None
    except (OSError, ValueError) as err:
        raise UsageError(f"{flag} {name!r}: could not download it from the Hub: {_first_line(err)}") from None


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{what}: cannot read {path}: {_first_line(err)}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{what}: {path} is not a JSON object")
    return data


def checkpoint_class(folder: Path, flag: str = "--model") -> str:
    """The ``_class_name`` of a Diffusers pipeline folder, refused unless a registered family loads it."""
    return checkpoint_family(folder, flag)[1]


def checkpoint_family(folder: Path, flag: str = "--model") -> tuple[FamilySpec, str]:
    """``(family, model_index class name)`` of a Diffusers pipeline folder; only the JSON is read."""
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        raise UsageError(f"{flag} {str(folder)!r} has no model_index.json: not a Diffusers pipeline checkpoint")
    class_name = _read_json(index, flag).get("_class_name")
    if class_name is None:
        raise UsageError(f"{flag} {str(folder)!r}: its model_index.json names no pipeline class (_class_name)")
    try:
        return family_for_pipeline(str(class_name)), class_name
    except UnsupportedFamilyError as err:
        raise UsageError(f"{flag} {str(folder)!r} is a {class_name}: {err}") from None


def check_model_fits(
    folder: str | os.PathLike,
    router_folder: str | os.PathLike | None = None,
    *,
    num_frames: int,
    height: int,
    width: int,
    routing: str = "auto",
    num_references: int = 0,
    num_subjects: int = 0,
    has_masks: bool = False,
    router_name: str | None = None,
) -> None:
    """Check sizes and routing against a checkpoint's configs (any family), before its weights are loaded.

    Args:
        folder: the pipeline folder; router_folder: an ``IDRouter`` folder replacing the model's own.
        num_frames, height, width: the video asked for; routing: ``"auto"`` or a routing mode.
        num_references: reference images in all; num_subjects: subjects (phrases); has_masks: layout masks given.
        router_name: how the user named ``router_folder`` (for messages).

    Raises:
        UsageError: naming the flag (``--frames``, ``--height``, ``--router``...) and what would fit.
    """
    folder = Path(folder)
    spec, _ = checkpoint_family(folder)
    if has_masks:
        try:
            spec.check_supports("masks", "--mask")
        except UnsupportedFamilyError as err:
            raise UsageError(str(err)) from None
    index = _read_json(folder / "model_index.json", "--model")
    tcfg_path, vcfg_path = folder / "transformer" / "config.json", folder / "vae" / "config.json"
    if not tcfg_path.is_file() or not vcfg_path.is_file():
        return  # not a plain Diffusers layout: the pipeline checks the sizes itself
    tcfg, vcfg = _read_json(tcfg_path, "--model"), _read_json(vcfg_path, "--model")
    grid = spec.token_grid(tcfg, vcfg)
    temporal, spatial = grid["temporal_compression"], grid["spatial_compression"]
    pt, ph, pw = grid["patch_size"]
    rope = tcfg.get(spec.rope_limit_key) if spec.rope_limit_key else None
    if (num_frames - 1) % temporal:
        low = (num_frames - 1) // temporal * temporal + 1
        raise UsageError(
            f"--frames must be {temporal}k+1 for this model's VAE, got {num_frames}; e.g. {low} or {low + temporal}"
        )
    for flag, size, patch in (("--height", height, ph), ("--width", width, pw)):
        step = spatial * patch
        if size % step:
            raise UsageError(
                f"{flag} must be a multiple of {step} for this model (VAE x{spatial}, patch {patch}), got {size}"
            )
        if rope is not None and size // step > rope:
            raise UsageError(
                f"{flag} {size} is {size // step} tokens but this model's transformer supports at most {rope} "
                f"({spec.rope_limit_key}): at most {rope * step} pixels. (Wan2.1's sizes such as 480x832 need a "
                f"Wan2.1 checkpoint, e.g. {EXAMPLE_MODEL}.)"
            )
    latent_frames = (num_frames - 1) // temporal + 1
    if rope is not None and (latent_frames + num_references) // pt > rope:
        raise UsageError(
            f"--frames {num_frames} ({latent_frames} latent frames) + {num_references} reference images exceed this "
            f"model's {spec.rope_limit_key}={rope} frames"
        )

    router_cfg_path = Path(router_folder) / "config.json" if router_folder else None
    embedded = index.get("id_router")
    if router_cfg_path is None and isinstance(embedded, list) and embedded and embedded[0] is not None:
        router_cfg_path = folder / "id_router" / "config.json"
    if router_folder is not None and not router_cfg_path.is_file():
        raise UsageError(f"--router {router_name or str(router_folder)!r} has no config.json: not an IDRouter folder")
    uses_router = routing == "router" or (routing == "auto" and not has_masks)
    if router_cfg_path is None or not router_cfg_path.is_file():
        if routing == "router":
            raise UsageError("--routing router needs a router: this checkpoint has none; give --router")
        return
    rcfg = _read_json(router_cfg_path, "--router")
    if rcfg.get("_class_name", "IDRouter") != "IDRouter":
        raise UsageError(f"--router: {router_cfg_path} is a {rcfg.get('_class_name')}, not an IDRouter")
    hidden = tcfg.get("num_attention_heads", 0) * tcfg.get("attention_head_dim", 0)
    want = {"hidden_dim": hidden, "text_dim": spec.text_dim(tcfg), "num_layers": tcfg.get("num_layers")}
    bad = {k: (rcfg.get(k), v) for k, v in want.items() if v is not None and rcfg.get(k) is not None and rcfg[k] != v}
    if bad:
        diff = ", ".join(f"{k} {got} (model: {need})" for k, (got, need) in bad.items())
        raise UsageError(f"the router ({router_cfg_path.parent}) was made for another model: {diff}")
    limit = rcfg.get("max_subjects")
    if uses_router and isinstance(limit, int) and num_subjects > limit:
        raise UsageError(f"{num_subjects} --subject given but the router supports at most {limit}")


class DiasRAutoPipeline:
    r"""Loads the DiasR pipeline of whatever family a checkpoint is, as Diffusers' ``AutoPipelineForText2Image`` picks
    a pipeline class: from the ``_class_name`` in its ``model_index.json`` (:mod:`diasr_diffusers.families`).

    Example:
        ```py
        >>> from diasr_diffusers.pipelines import DiasRAutoPipeline
        >>> pipe = DiasRAutoPipeline.from_pretrained("THUDM/CogVideoX-5b", torch_dtype=torch.bfloat16)
        >>> type(pipe).__name__
        'DiasRCogVideoXPipeline'
        ```
    """

    def __init__(self, *args: Any, **kwargs: Any):
        raise OSError(f"{type(self).__name__} is created with `{type(self).__name__}.from_pretrained(...)`")

    @staticmethod
    def family(pretrained_model_name_or_path: str | os.PathLike) -> FamilySpec:
        """The family of a local pipeline folder (only its ``model_index.json`` is read)."""
        return checkpoint_family(Path(pretrained_model_name_or_path), "pretrained_model_name_or_path")[0]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
        """The family's DiasR pipeline for a saved DiasR folder or a stock one (local folder or Hub id); ``kwargs``
        go to its ``from_pretrained`` / ``from_<family>`` (``torch_dtype``, ``id_router``, ``variant``...)."""
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            folder = Path(_download(str(pretrained_model_name_or_path), **kwargs))
        spec, class_name = checkpoint_family(folder, "pretrained_model_name_or_path")
        pipeline_class = spec.pipeline_class()
        if class_name == spec.pipeline_class_name or spec.convert is None:
            if kwargs.get("id_router") is None:
                kwargs.pop("id_router", None)  # an absent optional component, not `None` passed as one
            return pipeline_class.from_pretrained(str(folder), **kwargs)
        # The registry names the converting classmethod (`from_wan`, `from_ltx`...): an explicit fact, not a probe.
        return getattr(pipeline_class, spec.convert)(str(folder), **kwargs)


def _download(name: str, **kwargs: Any) -> str:
    # Every family's pipeline shares `SubjectPipelineMixin.download` (a plain snapshot): the family is only known once
    # the repo's model_index.json is here.
    from .pipeline_diasr_wan import DiasRPipeline

    return DiasRPipeline.download(name, **kwargs)


def load_pipeline(
    model: str | os.PathLike, router: str | os.PathLike | None = None, dtype: Any = None, lora: str | None = None
) -> Any:
    """The DiasR pipeline of any family from a DiasR or stock checkpoint (+ optional router and LoRA), with every
    failure as one :class:`UsageError` sentence (the command line's loader).

    ``model`` and ``router`` are local folders or Hub repo ids; ``lora`` a ``.safetensors`` file, folder or Hub id.
    """
    from ..routing import IDRouter

    kwargs = {"dtype": dtype} if dtype is not None else {}
    folder = resolve_checkpoint(str(model), "--model")
    spec, _ = checkpoint_family(folder)
    id_router = None
    if router is not None:
        if spec.name == "ingredients":
            raise UsageError(f"--router: {spec.title} checkpoints route with their own routers; an IDRouter does not apply")  # fmt: skip
        router_folder = resolve_checkpoint(str(router), "--router")
        try:
            id_router = IDRouter.from_pretrained(router_folder)
        except (OSError, ValueError, RuntimeError) as err:
            raise UsageError(
                f"--router {str(router)!r}: {_shape_mismatch_sentence(err) or _first_line(err)}"
            ) from None
    try:
        pipe = DiasRAutoPipeline.from_pretrained(str(folder), id_router=id_router, **kwargs)
    except (OSError, ValueError, RuntimeError) as err:
        raise UsageError(f"--model {str(model)!r} could not be loaded: {_shape_mismatch_sentence(err) or _first_line(err)}") from None  # fmt: skip
    if lora is not None:
        load_lora(pipe, lora)
    return pipe


def load_public_pipeline(
    phantom: str | None = None,
    skyreels_v3: str | None = None,
    base: str | None = None,
    phantom_size: str = "1.3B",
    router: str | os.PathLike | None = None,
    dtype: Any = None,
):
    """A :class:`DiasRPipeline` from Phantom-Wan weights (+ a Wan2.1 ``base``) or a SkyReels-V3 R2V folder, with an
    optional router. Weights that cannot be read raise a :class:`UsageError` of one sentence."""
    from .pipeline_diasr_wan import DiasRPipeline

    if (phantom is None) == (skyreels_v3 is None):
        raise ValueError("give exactly one of `phantom` and `skyreels_v3`")
    kwargs = {"dtype": dtype} if dtype is not None else {}
    flag, source = ("--phantom", phantom) if phantom is not None else ("--skyreels-v3", skyreels_v3)
    try:
        if phantom is not None:
            base_kwargs = {"base": base} if base is not None else {}
            return DiasRPipeline.from_phantom(phantom, size=phantom_size, id_router=router, **base_kwargs, **kwargs)
        return DiasRPipeline.from_skyreels_v3(skyreels_v3, id_router=router, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise UsageError(f"{flag} {source!r} could not be loaded: {_shape_mismatch_sentence(err) or _first_line(err)}") from None  # fmt: skip


def load_lora(pipe: Any, lora: str) -> None:
    """``pipe.load_lora_weights`` with one clear sentence for weights made for another model."""
    import logging

    path = Path(lora).expanduser()
    kwargs: dict[str, Any] = {}
    source: str | Path = lora
    if path.is_file():
        source, kwargs["weight_name"] = path.parent, path.name
    elif path.is_dir():
        source = path
    diffusers_logger = logging.getLogger("diffusers")
    level = diffusers_logger.level
    # Diffusers logs every mismatching tensor at ERROR level before raising: the sentence below replaces that.
    diffusers_logger.setLevel(logging.CRITICAL)
    try:
        pipe.load_lora_weights(str(source), **kwargs)
        # A Wan2.2 A14B training output: the low-noise expert's LoRA is its own file (as Diffusers loads them).
        second = path / LORA_2_WEIGHT_NAME
        if path.is_dir() and second.is_file() and getattr(pipe, "transformer_2", None) is not None:
            pipe.load_lora_weights(str(path), weight_name=second.name, load_into_transformer_2=True)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise UsageError(f"--lora {lora!r}: {_shape_mismatch_sentence(err) or _first_line(err)}") from None
    finally:
        diffusers_logger.setLevel(level)


def check_lora(value: str | None) -> None:
    if value is None:
        return
    path = Path(value).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise UsageError(f"--lora {value!r}: expected a .safetensors file (pickled weights are not loaded)")
        return
    if path.is_dir():
        if not any(path.glob("*.safetensors")):
            raise UsageError(f"--lora {value!r}: the folder has no .safetensors file")
        return
    from ..utils.checkpoint_paths import check_source

    try:
        check_source(value, "--lora", "file_or_folder", "LoRA weights are a .safetensors file or a folder holding one")
    except (OSError, ValueError) as err:
        raise UsageError(str(err)) from None
