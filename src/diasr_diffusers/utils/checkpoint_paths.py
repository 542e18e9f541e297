"""The loaders' front door: what a user passed as weights is checked for existence, format and completeness before
anything is parsed, downloaded or built.

Every loader (``DiasRPipeline.from_pretrained`` / ``from_phantom`` / ``from_skyreels_v3``, ``IDRouter.from_pretrained``,
the ``diasr generate`` flags) calls :func:`check_loader_sources` first. It answers in one sentence, at once:

- a path that does not exist (``./missing``, ``nope.safetensors``, ``/data/phantom``): ``the path ... does not
  exist`` (never a Hub error about repo-id characters or ``weight_name``);
- a Hub repo id that cannot be fetched now: offline (``HF_HUB_OFFLINE=1`` / ``local_files_only``) and not in the
  cache, the Hub unreachable, or no such repo: named, with what else the loader needs (the Wan2.1 base for VAE and
  UMT5) and the ``hf download`` command, instead of a minute of retries and a long traceback;
- ``dtype="bfloat16"`` (a string) becomes ``torch.bfloat16``; an unknown dtype name is refused.

:func:`weights_format` and :func:`read_safetensors_index` check a weights file's format from its first bytes and an
index's ``weight_map`` before torch or safetensors parse them.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

WAN_BASE_REPO = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".json")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}

# What each loader argument is, and what else is needed, for the messages.
_SOURCES: dict[str, tuple[str, str]] = {
    "checkpoint": (
        "file_or_folder",
        "Phantom needs its transformer (`hf download bytedance-research/Phantom Phantom-Wan-1.3B.pth`) and a Wan2.1 "
        f"Diffusers base for the VAE and UMT5 text encoder (`base`, default {WAN_BASE_REPO}: `hf download "
        f"{WAN_BASE_REPO}`); pass local paths to load offline",
    ),
    "base": (
        "folder",
        f"the base is a Wan2.1 Diffusers pipeline giving the VAE and UMT5 text encoder (`hf download {WAN_BASE_REPO}`, "
        "then pass its folder)",
    ),
    "id_router": ("folder", "an IDRouter folder holds config.json and diffusion_pytorch_model.safetensors"),
    "pretrained_model_name_or_path": (
        "folder",
        "expected a Diffusers pipeline folder (model_index.json, transformer/, vae/, text_encoder/, tokenizer/, "
        f"scheduler/), e.g. `hf download {WAN_BASE_REPO}` then its folder",
    ),
}


class HubUnavailableError(OSError):
    """A Hub repo id that cannot be fetched now (offline and not cached, Hub unreachable, or no such repo)."""


def looks_like_path(text: str) -> bool:
    """Whether ``text`` can only be meant as a local path (not a Hub repo id ``owner/name`` or ``name``)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if text.startswith((".", "/", "~")) or text.endswith(_WEIGHT_SUFFIXES) or text.count("/") > 1 or os.sep != "/" and os.sep in text:  # fmt: skip
        return True
    try:
        validate_repo_id(text)
    except HFValidationError:
        return True
    return False


def _cached(repo_id: str, cache_dir: str | os.PathLike | None) -> bool:
    from huggingface_hub import constants

    snapshots = Path(cache_dir or constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the Hub endpoint (behind a proxy: assumed reachable), so an offline machine fails in a
    second instead of retrying for a minute."""
    from huggingface_hub import constants

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def check_hub_repo(repo_id: str, what: str, needs: str = "", **hub_kwargs: Any) -> None:
    """Refuse at once (:class:`HubUnavailableError`) a Hub repo id that cannot be fetched now."""
    from huggingface_hub import constants

    tail = f"; {needs}" if needs else ""
    if _cached(repo_id, hub_kwargs.get("cache_dir")):
        return
    cache = hub_kwargs.get("cache_dir") or constants.HF_HUB_CACHE
    start = (
        f"{what} {repo_id!r}: no such local path ({Path(repo_id).expanduser().absolute()}), and as a Hub repo id it "
        f"is not in the cache ({cache})"
    )
    if constants.HF_HUB_OFFLINE or hub_kwargs.get("local_files_only"):
        why = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else "local_files_only=True"
        raise HubUnavailableError(f"{start} and offline mode ({why}) forbids downloading it{tail}")
    if not hub_reachable():
        raise HubUnavailableError(f"{start} and the Hub ({constants.ENDPOINT}) cannot be reached to download it{tail}")
    from huggingface_hub import repo_exists

    try:
        exists = repo_exists(repo_id, token=hub_kwargs.get("token"))
    except Exception:  # noqa: BLE001 (a network hiccup: let the loader itself try and report)
        return
    if not exists:
        raise HubUnavailableError(
            f"{what} {repo_id!r}: no such local path, and no Hub repo of that name (a typo? a private or "
            f"gated repo needs `hf auth login`){tail}"
        )


def check_source(value: Any, what: str, expect: str = "folder", needs: str = "", **hub_kwargs: Any) -> Any:
    """A local path that must exist (and be a folder / a file as ``expect`` says), or a Hub repo id that can be
    fetched now; objects (an already built model) pass through. Raises ``FileNotFoundError`` (the path does not
    exist), ``ValueError`` (a file where a folder is needed, or the reverse) or :class:`HubUnavailableError`."""
    if isinstance(value, (list, tuple)) and expect == "file_or_folder":
        for item in value:
            check_source(item, what, "file", needs)
        if not value:
            raise ValueError(f"{what}: the list of files is empty")
        return value
    if not isinstance(value, (str, os.PathLike)):
        return value
    text = os.fspath(value)
    if not text.strip():
        raise ValueError(f"{what}: empty path")
    path = Path(text).expanduser()
    try:
        exists = path.exists()
    except OSError:  # a name too long for the file system: no such path
        exists = False
    if exists:
        if expect == "folder" and not path.is_dir():
            raise ValueError(f"{what}: {path} is a file, not a folder{'; ' + needs if needs else ''}")
        if expect == "file" and path.is_dir():
            raise ValueError(f"{what}: {path} is a folder; expected a file")
        return value
    if looks_like_path(text):
        raise FileNotFoundError(f"{what}: the path {path.absolute()} does not exist")
    check_hub_repo(text, what, needs, **hub_kwargs)
    return value


def normalize_dtype(value: Any, what: str = "dtype") -> Any:
    """``"bfloat16"`` / ``"torch.bfloat16"`` -> ``torch.bfloat16``; a ``torch.dtype`` or ``None`` as is; a Diffusers
    per-component dict (``{"transformer": torch.bfloat16, "default": torch.float32}``) value by value."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, dict):
        return {name: normalize_dtype(dtype, f"{what}[{name!r}]") for name, dtype in value.items()}
    if isinstance(value, str) and value.removeprefix("torch.") in _DTYPES:
        return _DTYPES[value.removeprefix("torch.")]
    raise TypeError(f"`{what}` must be a torch.dtype or one of {sorted(_DTYPES)}, got {value!r}")


def check_loader_sources(kwargs: dict[str, Any], needs: str | None = None, **sources: Any) -> dict[str, Any]:
    """The front door of a loader: check each named source (``checkpoint``, ``base``, ``id_router``,
    ``pretrained_model_name_or_path``) as :func:`check_source` does, and return ``kwargs`` with ``dtype`` /
    ``torch_dtype`` given as strings converted to ``torch.dtype``. Nothing is downloaded or parsed. ``needs``
    replaces the default sentence of what the loader expects (e.g. another family's repository)."""
    kwargs = dict(kwargs)
    for key in ("dtype", "torch_dtype"):
        if key in kwargs:
            kwargs[key] = normalize_dtype(kwargs[key], key)
    hub = {k: kwargs[k] for k in ("cache_dir", "token", "local_files_only") if k in kwargs}
    for name, value in sources.items():
        expect, default = _SOURCES[name]
        check_source(value, f"`{name}`", expect, needs or default, **hub)
    return kwargs


# -- formats -------------------------------------------------------------------------------------------------------


def weights_format(path: str | os.PathLike) -> str:
    """``"torch"`` (a ``torch.save`` zip archive or legacy pickle), ``"safetensors"`` or ``"unknown"``, from the
    file's first bytes (the name can lie: a mislabelled ``.pth``)."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "torch"
    if len(head) >= 9:
        size = int.from_bytes(head[:8], "little")
        if 2 <= size <= 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    return "unknown"


def read_safetensors_index(index_path: str | os.PathLike, what: str = "`checkpoint`") -> dict[str, str]:
    """The ``weight_map`` of a ``*.safetensors.index.json``, checked: a JSON object ``{tensor name: shard file}``
    whose shards lie beside the index. ``ValueError`` naming the file otherwise."""
    index_path = Path(index_path)
    try:
        data = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise ValueError(f"{what}: {index_path} is not a readable JSON index: {e}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        got = type(weight_map).__name__ if isinstance(data, dict) and "weight_map" in data else "none"
        raise ValueError(
            f"{what}: {index_path} is not a safetensors index: its 'weight_map' must be an object "
            f"{{tensor name: shard file}}, got {got}"
        )
    bad = [k for k, v in weight_map.items() if not isinstance(v, str) or Path(v).name != v]
    if bad:
        raise ValueError(
            f"{what}: {index_path} maps {bad[0]!r} to {weight_map[bad[0]]!r}; every entry must name a shard file "
            "beside the index"
        )
    if not weight_map:
        raise ValueError(f"{what}: {index_path} lists no tensors")
    return weight_map
