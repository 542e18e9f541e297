"""One-off converters: the LAION checkpoints the curation stages use, from their published pickles to safetensors.

This project never unpickles at run time. The published LAION files are ``torch.save`` pickles; these functions read
them once with ``torch.load(..., weights_only=True)`` (PyTorch's restricted unpickler: tensors and plain containers
only, no code from the file runs) and write the folders :mod:`.hub` loads.

- :func:`convert_laion_watermark`: ``watermark_model_v1.pt`` (LAION-5B-WatermarkDetection: a timm
  ``efficientnet_b3a`` whose ``classifier`` is a Linear(1536, 625)-ReLU-Dropout-Linear(625, 256)-ReLU-Linear(256, 2)
  head) -> a transformers ``EfficientNetModel`` folder + ``laion_watermark_head.safetensors`` +
  ``preprocessor_config.json`` (LAION's ``Resize((256, 256))`` and ImageNet normalisation), read by
  :class:`~.hub.LaionWatermark`.
- :func:`convert_laion_aesthetic`: ``sac+logos+ava1-l14-linearMSE.pth`` (the MLP of
  :func:`~.hub.laion_aesthetic_mlp`) -> one ``.safetensors`` file, read by :class:`~.hub.ClipAesthetic`.

    diasr convert-laion watermark watermark_model_v1.pt --out laion_watermark/
    diasr curate raw/ --out data/mine --captions captions.jsonl --models watermark=laion_watermark/
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from .hub import IMAGENET_MEAN, IMAGENET_STD, laion_aesthetic_mlp

#: The file :class:`~.hub.LaionWatermark` reads the head from; its presence marks a converted LAION folder.
LAION_WATERMARK_HEAD = "laion_watermark_head.safetensors"
#: LAION's class order (``example_use.py``: ``watermark_prob, clear_prob = softmax(...)``).
LAION_WATERMARK_LABELS = {0: "watermark", 1: "clear"}

# timm's block parts -> transformers' EfficientNet block parts. timm's first stage is a depthwise-separable block
# (no expansion: conv_dw, bn1, se, conv_pw, bn2); the others are inverted residuals (conv_pw expands, conv_pwl
# projects).
_DS_BLOCK = {"conv_dw": "depthwise_conv.depthwise_conv", "bn1": "depthwise_conv.depthwise_norm",
             "se.conv_reduce": "squeeze_excite.reduce", "se.conv_expand": "squeeze_excite.expand",
             "conv_pw": "projection.project_conv", "bn2": "projection.project_bn"}  # fmt: skip
_IR_BLOCK = {"conv_pw": "expansion.expand_conv", "bn1": "expansion.expand_bn",
             "conv_dw": "depthwise_conv.depthwise_conv", "bn2": "depthwise_conv.depthwise_norm",
             "se.conv_reduce": "squeeze_excite.reduce", "se.conv_expand": "squeeze_excite.expand",
             "conv_pwl": "projection.project_conv", "bn3": "projection.project_bn"}  # fmt: skip
_TOP = {"conv_stem": "embeddings.convolution", "bn1": "embeddings.batchnorm", "conv_head": "encoder.top_conv",
        "bn2": "encoder.top_bn"}  # fmt: skip
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(\d+)\.(.+)\.(weight|bias|running_mean|running_var|num_batches_tracked)$")
_TOP_KEY = re.compile(r"([a-z_0-9]+)\.(weight|bias|running_mean|running_var|num_batches_tracked)$")
_HEAD_KEYS = ("classifier.0.weight", "classifier.0.bias", "classifier.3.weight", "classifier.3.bias",
              "classifier.5.weight", "classifier.5.bias")  # fmt: skip


def load_torch_state_dict(path: str | os.PathLike, what: str) -> dict:
    """A ``torch.save``d state dict read with ``weights_only=True`` (no code from the file runs)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`{what}`: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses anything that is not tensors and plain containers
        raise ValueError(f"`{what}`: {path} is not a state dict torch.load(weights_only=True) can read: {err}") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"`{what}`: {path} holds a {type(state).__name__}, not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def laion_watermark_config(width_coefficient: float = 1.2, depth_coefficient: float = 1.4):
    """The ``EfficientNetConfig`` of timm's ``efficientnet_b3a`` (B3: width 1.2, depth 1.4) as LAION trained it.

    timm's EfficientNet and transformers' share the base architecture, rounding of channels (to multiples of 8,
    never below 90 %) and of repeats (ceil); they differ in padding and BatchNorm eps. Here: ``batch_norm_eps``
    1e-5 (PyTorch's default, timm's), and every block in ``depthwise_padding`` so stride-2 depthwise convolutions pad
    symmetrically as timm's do (transformers' default pads right/bottom only, TensorFlow style). The stem's padding
    is not a config option: :class:`~.hub.LaionWatermark` sets it after loading.
    """
    from transformers import EfficientNetConfig
    from transformers.models.efficientnet.modeling_efficientnet import round_filters

    config = EfficientNetConfig(width_coefficient=width_coefficient, depth_coefficient=depth_coefficient,
                                image_size=256, batch_norm_eps=1e-5, dropout_rate=0.3, drop_connect_rate=0.0,
                                id2label=dict(LAION_WATERMARK_LABELS),
                                label2id={v: k for k, v in LAION_WATERMARK_LABELS.items()})  # fmt: skip
    config.hidden_dim = round_filters(config, 1280)
    blocks = sum(int(math.ceil(depth_coefficient * n)) for n in config.num_block_repeats)
    config.depthwise_padding = list(range(blocks))
    return config


def _timm_to_transformers(key: str, stage_offsets: list[int], expansion: list[bool]) -> str | None:
    m = _BLOCK_KEY.match(key)
    if m:
        stage, j, part, leaf = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
        if stage >= len(stage_offsets):
            return None
        table = _IR_BLOCK if expansion[stage] else _DS_BLOCK
        return f"encoder.blocks.{stage_offsets[stage] + j}.{table[part]}.{leaf}" if part in table else None
    m = _TOP_KEY.match(key)
    if m and m.group(1) in _TOP:
        return f"{_TOP[m.group(1)]}.{m.group(2)}"
    return None


def convert_laion_watermark(checkpoint: str | os.PathLike, out: str | os.PathLike, *,
                            width_coefficient: float = 1.2, depth_coefficient: float = 1.4) -> Path:  # fmt: skip
    """Convert LAION's ``watermark_model_v1.pt`` into the folder :class:`~.hub.LaionWatermark` loads.

    Every key of the checkpoint must map and every shape must match the B3 body built from the coefficients, else
    ``ValueError`` names the key and both shapes (a checkpoint of another EfficientNet size needs its
    ``width_coefficient``/``depth_coefficient``). ``out`` must not exist or be empty; it is written to a temporary
    folder first and renamed, so a failed conversion leaves nothing behind.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import EfficientNetModel, ViTImageProcessorPil
    from transformers.models.efficientnet.modeling_efficientnet import round_filters

    from ...utils.io import atomic_dir

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"`out`: {out} exists and is not an empty folder; give a new folder")
    state = load_torch_state_dict(checkpoint, "checkpoint")
    missing_head = [k for k in _HEAD_KEYS if k not in state]
    if missing_head:
        raise ValueError(f"`checkpoint`: {checkpoint} has no LAION watermark head (missing {missing_head}); expected "
                         "timm efficientnet_b3a with classifier = Linear-ReLU-Dropout-Linear-ReLU-Linear")  # fmt: skip
    config = laion_watermark_config(width_coefficient, depth_coefficient)
    for i, stride in enumerate(config.strides):
        # timm adds the residual to a stage's first block when it keeps stride and width; transformers never does.
        # B0-B7 always change width there; refuse a size where they would differ rather than convert it wrongly.
        if stride == 1 and round_filters(config, config.in_channels[i]) == round_filters(config, config.out_channels[i]):
            raise ValueError(f"`width_coefficient`: {width_coefficient} gives stage {i} equal input and output widths, "
                             "a residual transformers' EfficientNet does not have; not convertible exactly")  # fmt: skip
    with torch.device("meta"):
        body = EfficientNetModel(config)
    expected = body.state_dict()
    # Block numbering: transformers counts blocks over the whole network, timm per stage.
    repeats = [int(math.ceil(depth_coefficient * n)) for n in config.num_block_repeats]
    offsets = [sum(repeats[:i]) for i in range(len(repeats))]
    expansion = [r != 1 for r in config.expand_ratios]
    converted, unknown = {}, []
    for key, value in state.items():
        if key in _HEAD_KEYS:
            continue
        target = _timm_to_transformers(key, offsets, expansion)
        if target is None or target not in expected:
            unknown.append(key)
            continue
        if tuple(value.shape) != tuple(expected[target].shape):
            raise ValueError(f"`checkpoint`: {key} has shape {tuple(value.shape)}, the EfficientNet with width "
                             f"{width_coefficient} / depth {depth_coefficient} expects {tuple(expected[target].shape)} "
                             f"({target}); is it another EfficientNet size?")  # fmt: skip
        converted[target] = value.contiguous()
    missing = sorted(set(expected) - set(converted))
    if unknown or missing:
        raise ValueError(f"`checkpoint`: {checkpoint} is not LAION's timm efficientnet_b3a layout: "
                         f"{len(unknown)} unknown keys {unknown[:5]}, {len(missing)} missing {missing[:5]}")  # fmt: skip
    body.load_state_dict(converted, strict=True, assign=True)
    head = {k.removeprefix("classifier."): state[k].contiguous() for k in _HEAD_KEYS}
    with atomic_dir(out) as tmp:
        body.save_pretrained(tmp)
        save_file(head, tmp / LAION_WATERMARK_HEAD, metadata={"source": Path(checkpoint).name})
        # Bilinear, as torchvision's Resize on a PIL image (LAION's transform) is.
        ViTImageProcessorPil(do_resize=True, size={"height": 256, "width": 256}, do_rescale=True,
                             do_normalize=True, image_mean=list(IMAGENET_MEAN),
                             image_std=list(IMAGENET_STD)).save_pretrained(tmp)  # fmt: skip
    return out


def convert_laion_aesthetic(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """LAION's aesthetic MLP (``sac+logos+ava1-l14-linearMSE.pth``, keys ``layers.{0,2,4,6,7}.*``) -> safetensors."""
    from safetensors.torch import save_file

    from ...utils.io import atomic_path

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"`out`: {out} exists; give a new file name")
    state = load_torch_state_dict(checkpoint, "checkpoint")
    if "layers.0.weight" not in state:
        raise ValueError(f"`checkpoint`: {checkpoint} has no layers.0.weight: not the LAION aesthetic MLP")
    head = laion_aesthetic_mlp(int(state["layers.0.weight"].shape[1]))
    head.load_state_dict(state, strict=True)  # the layout check: every key and shape
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp)
    return out
