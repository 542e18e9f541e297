"""Loading public reference-trained Wan2.1 weights (Phantom-Wan, SkyReels-V3 R2V) into Diffusers components.

Phantom ships its transformer in the original Wan key format (``blocks.N.self_attn.q.weight``, ...): a
``torch.load`` state dict for 1.3B, six safetensors shards plus an index for 14B. Diffusers' own
``convert_wan_transformer_to_diffusers`` renames them; the config is chosen here from the tensor shapes (Wan2.1's
published 1.3B/14B configs, or one passed explicitly) so that nothing but the weights is fetched.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from ..utils.checkpoint_paths import read_safetensors_index, weights_format
from ..utils.checkpoints import check_block_model_folder

PHANTOM_REPO = "bytedance-research/Phantom"
# Default file per model size in the Phantom Hub repo.
PHANTOM_FILES = {"1.3B": "Phantom-Wan-1.3B.pth", "14B": "Phantom_Wan_14B.safetensors.index.json"}

# Wan2.1 T2V transformer configs as published in the Diffusers repos (Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers),
# keyed by (hidden size, blocks). The head count cannot be read from the weights, hence the table.
_WAN21_T2V = {
    "patch_size": [1, 2, 2],
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
}
WAN21_TRANSFORMER_CONFIGS: dict[tuple[int, int], dict[str, Any]] = {
    (1536, 30): {**_WAN21_T2V, "num_attention_heads": 12, "num_layers": 30, "ffn_dim": 8960},
    (5120, 40): {**_WAN21_T2V, "num_attention_heads": 40, "num_layers": 40, "ffn_dim": 13824},
}

_HUB_KWARGS = ("cache_dir", "token", "local_files_only", "force_download")
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<index>\d+)-of-(?P<total>\d+)\.safetensors$")
_REQUIRED_WAN_KEYS = ("patch_embedding.weight", "head.head.weight", "blocks.0.self_attn.q.weight")


def _listing(keys: Any, limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _load_safetensors(paths: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state_dict: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for path in paths:
        try:
            tensors = load_file(str(path))
        except Exception as e:  # SafetensorError: truncated or not a safetensors file
            raise ValueError(f"`checkpoint`: {path} is not a readable safetensors file: {e}") from None
        # The same tensor in two shards: which one is right cannot be known, so neither is picked silently.
        twice = sorted(tensors.keys() & origin.keys())
        if twice:
            raise ValueError(
                f"`checkpoint`: the tensor {twice[0]!r} is in two shards, {origin[twice[0]].name} and {path.name}"
                f"{f' (and {len(twice) - 1} more tensors)' if len(twice) > 1 else ''}: refusing to guess which is right"
            )
        origin.update(dict.fromkeys(tensors, path))
        state_dict.update(tensors)
    return state_dict


def _load_index(index_path: Path) -> dict[str, torch.Tensor]:
    """Every shard an index names, checked: absent files and keys missing from their shard are listed."""
    weight_map = read_safetensors_index(index_path)
    files = sorted(set(weight_map.values()))
    absent = [f for f in files if not (index_path.parent / f).is_file()]
    if absent:
        raise ValueError(
            f"`checkpoint`: the index {index_path.name} names {len(absent)} shard(s) absent from {index_path.parent}: "
            f"{_listing(absent)}"
        )
    state_dict = _load_safetensors([index_path.parent / f for f in files])
    missing = [k for k in weight_map if k not in state_dict]
    if missing:
        raise ValueError(
            f"`checkpoint`: keys listed in {index_path.name} but absent from its shards: {_listing(missing)}"
        )
    return state_dict


def _load_shards(paths: list[Path]) -> dict[str, torch.Tensor]:
    """Shards named ``stem-0000k-of-0000n.safetensors``: all ``n`` must be there."""
    groups: dict[tuple[str, int], set[int]] = {}
    for p in paths:
        m = _SHARD.match(p.name)
        if m:
            groups.setdefault((str(p.parent / m["stem"]), int(m["total"])), set()).add(int(m["index"]))
    for (stem, total), present in groups.items():
        missing = [
            f"{Path(stem).name}-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1) if i not in present
        ]
        if missing:
            raise ValueError(f"`checkpoint`: missing shard(s) of {Path(stem).name}: {_listing(missing)}")
    return _load_safetensors(paths)


def _load_torch(path: Path) -> dict[str, torch.Tensor]:
    kind = weights_format(path)
    if kind == "safetensors":  # a mislabelled file: read what it is, never unpickle it
        return _load_safetensors([path])
    if kind != "torch":
        raise ValueError(
            f"`checkpoint`: {path} is not a PyTorch checkpoint (no torch.save archive header) nor a safetensors file"
        )
    # weights_only: a .pth is a pickle; never run code from a downloaded file.
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for disallowed objects, RuntimeError for a damaged archive
        # Not torch's own text: it suggests weights_only=False, which would run the file's code.
        reason = "it is damaged, or holds objects other than tensors" if "weights_only" in str(e) else "the archive is damaged"
        raise ValueError(
            f"`checkpoint`: {path} cannot be read as a plain state dict of tensors ({reason}); only tensors are "
            "loaded from .pth files, never other pickled objects"
        ) from None
    if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), dict):
        obj = next(iter(obj.values()))  # {"state_dict": {...}} / {"model": {...}} wrappers
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"`checkpoint`: {path} does not hold a state dict of tensors")
    return obj


def load_original_wan_state_dict(
    checkpoint: str | os.PathLike | list[str | os.PathLike],
    size: str = "1.3B",
    weight_name: str | None = None,
    **hub_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """The state dict of an original-format Wan transformer checkpoint.

    ``checkpoint``: a ``.pth``/``.pt`` file, a ``.safetensors`` file (with its sibling shards when its name is
    ``*-0000k-of-0000n.safetensors``), a ``*.safetensors.index.json``, a list of shard files, a folder holding one
    of these, or a Hub repo id (then ``weight_name``, default :data:`PHANTOM_FILES` ``[size]``, is downloaded;
    ``hub_kwargs``: ``cache_dir``, ``token``, ``local_files_only``, ``force_download``).
    """
    if isinstance(checkpoint, (list, tuple)):
        paths = [Path(p).expanduser() for p in checkpoint]
        absent = [str(p) for p in paths if not p.is_file()]
        if absent or not paths:
            raise ValueError(f"`checkpoint`: shard file(s) not found: {_listing(absent) or '(empty list)'}")
        return _load_shards(paths)
    path = Path(checkpoint).expanduser()
    if not path.exists():
        return _download(str(checkpoint), size, weight_name, **hub_kwargs)
    if path.is_dir():
        candidates = sorted(path.glob("*.safetensors.index.json")) or sorted(
            [*path.glob("*.pth"), *path.glob("*.pt"), *path.glob("*.safetensors")]
        )
        if weight_name is not None:
            candidates = [path / weight_name]
        if not candidates:
            raise ValueError(
                f"`checkpoint`: the folder {path} holds no weights (expected a Phantom .pth, .safetensors or "
                "*.safetensors.index.json)"
            )
        if len(candidates) != 1 and not all(_SHARD.match(c.name) for c in candidates):
            raise ValueError(
                f"`checkpoint`: the folder {path} must hold one index, one .pth or one .safetensors (or pass "
                f"`weight_name`); found {[c.name for c in candidates] or 'none'}"
            )
        if len(candidates) > 1:
            return _load_shards(candidates)
        path = candidates[0]
    name = path.name
    if name.endswith(".index.json"):
        return _load_index(path)
    if name.endswith(".safetensors"):
        m = _SHARD.match(name)
        if m:
            return _load_shards(sorted(path.parent.glob(f"{glob_escape(m['stem'])}-*-of-{m['total']}.safetensors")))
        return _load_safetensors([path])
    if name.endswith((".pth", ".pt", ".bin", ".ckpt")):
        return _load_torch(path)
    raise ValueError(f"`checkpoint`: {path} is not a .pth, .safetensors or .safetensors.index.json file")


def glob_escape(text: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", text)


def _download(repo_id: str, size: str, weight_name: str | None, **hub_kwargs: Any) -> dict[str, torch.Tensor]:
    from huggingface_hub import hf_hub_download

    if weight_name is None:
        if size not in PHANTOM_FILES:
            raise ValueError(f"`size` must be one of {sorted(PHANTOM_FILES)}, got {size!r}")
        weight_name = PHANTOM_FILES[size]
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise ValueError(f"`checkpoint`: {repo_id!r} is neither an existing file or folder nor a Hub repo id")
    kwargs = {k: hub_kwargs[k] for k in _HUB_KWARGS if k in hub_kwargs}
    first = Path(hf_hub_download(repo_id, weight_name, **kwargs))
    if first.name.endswith(".index.json"):
        for shard in sorted(set(read_safetensors_index(first).values())):
            hf_hub_download(repo_id, shard, **kwargs)  # lands beside the index in the snapshot folder
    return load_original_wan_state_dict(first)


def _strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("model.diffusion_model.", "module."):
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def infer_wan_transformer_config(
    state_dict: dict[str, torch.Tensor],
    transformer_config: dict[str, Any] | str | os.PathLike | None = None,
    fallback_config: dict[str, Any] | str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The ``WanTransformer3DModel`` config of an original-format Wan2.1 state dict, checked against its shapes.

    ``transformer_config``: a dict, a ``config.json`` or a folder holding one (directly or in ``transformer/``);
    ``None``: Wan2.1's published 1.3B/14B config matching the hidden size and block count, else
    ``fallback_config`` (e.g. a local base pipeline's transformer config).
    """
    absent = [k for k in _REQUIRED_WAN_KEYS if k not in state_dict]
    if absent:
        if "condition_embedder.time_embedder.linear_1.weight" in state_dict:
            raise ValueError(
                "`checkpoint` is already in Diffusers format (condition_embedder.*): load it with "
                "WanTransformer3DModel.from_pretrained, not as an original Wan checkpoint"
            )
        raise ValueError(
            f"`checkpoint` is not a Wan2.1 transformer in the original key format: no {_listing(absent)}; "
            f"its keys look like {_listing(state_dict, 6)}"
        )
    if any(k.startswith("img_emb.") for k in state_dict):
        raise ValueError(
            "`checkpoint` is a Wan image-to-video transformer (img_emb.*); only text-to-video ones are supported"
        )
    patch = state_dict["patch_embedding.weight"]
    dim = patch.shape[0]
    num_layers = len({int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")})
    found = {
        "in_channels": patch.shape[1],
        "patch_size": list(patch.shape[2:]),
        "hidden size": dim,
        "num_layers": num_layers,
        "ffn_dim": state_dict["blocks.0.ffn.0.weight"].shape[0] if "blocks.0.ffn.0.weight" in state_dict else None,
        "text_dim": state_dict["text_embedding.0.weight"].shape[1]
        if "text_embedding.0.weight" in state_dict
        else None,
        "freq_dim": state_dict["time_embedding.0.weight"].shape[1]
        if "time_embedding.0.weight" in state_dict
        else None,
    }
    found["out_channels"] = state_dict["head.head.weight"].shape[0] // max(1, patch.shape[2:].numel())
    if transformer_config is None and (dim, num_layers) not in WAN21_TRANSFORMER_CONFIGS:
        transformer_config = fallback_config
    if transformer_config is None:
        if (dim, num_layers) not in WAN21_TRANSFORMER_CONFIGS:
            known = ", ".join(f"dim {d} x {n} blocks" for d, n in WAN21_TRANSFORMER_CONFIGS)
            raise ValueError(
                f"`checkpoint` is a Wan transformer of hidden size {dim} with {num_layers} blocks, not a published "
                f"Wan2.1 size ({known}); pass `transformer_config` (its attention head count is not in the weights)"
            )
        config = dict(WAN21_TRANSFORMER_CONFIGS[(dim, num_layers)])
    elif isinstance(transformer_config, dict):
        config = dict(transformer_config)
    else:
        path = Path(transformer_config).expanduser()
        for candidate in (path, path / "config.json", path / "transformer" / "config.json"):
            if candidate.is_file():
                config = json.loads(candidate.read_text())
                break
        else:
            raise ValueError(f"`transformer_config`: no config.json at {path}")
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    _check_config_types(config)
    expected = {
        "in_channels": config.get("in_channels"),
        "patch_size": list(config.get("patch_size", [])),
        "hidden size": config.get("num_attention_heads", 0) * config.get("attention_head_dim", 0),
        "num_layers": config.get("num_layers"),
        "ffn_dim": config.get("ffn_dim"),
        "text_dim": config.get("text_dim"),
        "freq_dim": config.get("freq_dim"),
        "out_channels": config.get("out_channels"),
    }
    wrong = [
        f"{k}: weights {found[k]}, config {v}" for k, v in expected.items() if found[k] is not None and found[k] != v
    ]
    if wrong:
        raise ValueError(f"`transformer_config` does not match the checkpoint: {'; '.join(wrong)}")
    return config


_INT_FIELDS = ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim", "freq_dim",
               "ffn_dim", "num_layers", "rope_max_seq_len")  # fmt: skip


def _check_config_types(config: dict[str, Any]) -> None:
    """``"2"`` for a head count would be multiplied as a string ("config 2222..."): refuse wrong types by name."""
    for key in _INT_FIELDS:
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"`transformer_config[{key!r}]` must be an integer, got {value!r} ({type(value).__name__})")
    patch = config.get("patch_size")
    if patch is not None and (
        not isinstance(patch, (list, tuple)) or not all(isinstance(p, int) and not isinstance(p, bool) for p in patch)
    ):
        raise TypeError(f"`transformer_config['patch_size']` must be a list of integers, got {patch!r}")


def wan_transformer_from_original(
    state_dict: dict[str, torch.Tensor],
    transformer_config: dict[str, Any] | str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    fallback_config: dict[str, Any] | str | os.PathLike | None = None,
):
    """A ``WanTransformer3DModel`` from an original-format Wan2.1 state dict, converted with Diffusers' own
    ``convert_wan_transformer_to_diffusers``; every parameter must be covered (missing/unexpected keys listed)."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    state_dict = _strip_prefixes(dict(state_dict))
    config = infer_wan_transformer_config(state_dict, transformer_config, fallback_config)
    converted = convert_wan_transformer_to_diffusers(dict(state_dict))
    with init_empty_weights():
        model = WanTransformer3DModel.from_config(config)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(converted), set(converted) - expected
    if missing or unexpected:
        raise ValueError(
            "`checkpoint` does not match a Wan2.1 transformer after conversion: "
            f"missing {len(missing)} key(s) [{_listing(missing)}], unexpected {len(unexpected)} key(s) "
            f"[{_listing(unexpected)}] (Diffusers names)"
        )
    try:
        model.load_state_dict(converted, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"`checkpoint` tensor shapes do not match the transformer config: {e}") from None
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def skyreels_v3_transformer(folder: str | os.PathLike, dtype: torch.dtype | None = None):
    """SkyReels-V3 R2V's ``transformer/``: its config names the class ``SkyReelsA2WanI2v3DModel`` (a copy of an
    older ``WanTransformer3DModel`` with the same parameter names), loaded here as a stock
    ``WanTransformer3DModel``."""
    from diffusers import WanTransformer3DModel

    config_path = Path(folder) / "transformer" / "config.json"
    if not config_path.is_file():
        raise ValueError(f"`pretrained_model_name_or_path`: no transformer/config.json in {folder}")
    class_name = json.loads(config_path.read_text()).get("_class_name")
    if class_name not in ("SkyReelsA2WanI2v3DModel", "WanTransformer3DModel"):
        raise ValueError(
            f"`pretrained_model_name_or_path`: transformer/config.json names {class_name!r}; expected SkyReels-V3's "
            "'SkyReelsA2WanI2v3DModel' (or 'WanTransformer3DModel')"
        )
    # Every tensor the config builds must be in the weights (by name and shape), or Diffusers would load with a
    # warning and leave meta tensors that fail only at generation.
    try:
        check_block_model_folder(WanTransformer3DModel, Path(folder) / "transformer")
    except ValueError as e:
        raise ValueError(f"`pretrained_model_name_or_path`: {e}") from None
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    return WanTransformer3DModel.from_pretrained(folder, subfolder="transformer", **kwargs).eval()
