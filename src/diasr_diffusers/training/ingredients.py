"""``model_family: ingredients``: train the Ingredients ID routers (``router.{i}``) with ``diasr train`` stage ``route``.

What the released training does in its router stage: the routers learn, the rest of the model stays frozen (LoRA or
full fine-tuning are available as for the other families), on the Ingredients routing cross-entropy
(:func:`~diasr_diffusers.routing.ingredients_routing_loss`) plus CogVideoX's v-prediction diffusion loss.

Data: the MuSA manifest (``docs/data.md``) with, per subject, ``"meta": {"face_features": "faces/x.safetensors"}``
holding that identity's precomputed face features (``id_cond``: ``(LFE_id_dim,)`` or ``(1, LFE_id_dim)``;
``id_vit_hidden.{k}`` for ``k < LFE_num_scale``: ``(T, LFE_vit_dim)`` or ``(1, T, LFE_vit_dim)``; 1280, 5 and
``(577, 1024)`` for the released model). A subject without it gets its features from the face models
(``IngredientsPipeline.load_face_encoder``, the ``[ingredients]`` extra) run on its first reference image; with a
``tiny_model`` there are none, and the run is refused naming the field. The first frame the model is conditioned on
is Ingredients' white canvas with the subjects' reference images (:func:`compose_first_frame`), as at inference;
routing targets are the subject masks on the token grid (``-1`` = background, ignored by the loss).
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..utils.io import atomic_dir, atomic_path
from .config import ConfigError
from .families import CogVideoXTrainingFamily
from .trainer import LORA_WEIGHT_NAME, DiasRTrainer, _sample_seed

logger = logging.getLogger(__name__)

ROUTER_WEIGHT_NAME = "router.safetensors"  # the trained `router.{i}.*` tensors, named as in the released checkpoint
FACE_FEATURES_KEY = "face_features"  # in each subject's `meta`
_TINY_KEYS = {"seed", "num_layers", "cross_attn_interval", "max_identities"}


class IngredientsTrainingFamily(CogVideoXTrainingFamily):
    """Ingredients (ConsisID / CogVideoX-5B I2V with ID routers): CogVideoX's v-prediction on its DDPM schedule. A
    ``model`` folder is an Ingredients pipeline folder (the released one, or a ``pipeline/`` output of this trainer);
    ``tiny_model`` takes ``seed``, ``num_layers``, ``cross_attn_interval`` and ``max_identities`` of
    :func:`~diasr_diffusers.utils.tiny_ingredients.tiny_ingredients_components`."""

    name = "ingredients"
    route_needs_align = False  # the routers come with the model: `route` is the only stage
    # The released router stage trains the routers alone. Its sampler's negative branch keeps the faces (only the
    # prompt changes), so no guidance branch drops references: caption dropout only.
    config_defaults = {"train_lora": False, "reference_dropout": 0.0, "subject_dropout": 0.0}

    def tiny_parameters(self) -> set[str]:
        return set(_TINY_KEYS)

    def trainer_class(self) -> type:
        return IngredientsTrainer

    def validate_config(self, config: Any) -> None:
        """What :meth:`TrainConfig.validate` checks for DiasR's ``IDRouter``, for Ingredients' own routers."""
        if config.stage != "route":
            raise ConfigError(
                f"model_family ingredients trains stage `route` only (its routers), got {config.stage!r}"
            )
        if config.router:
            raise ConfigError(
                "`router` configures DiasR's IDRouter; Ingredients trains the model's own `router.{i}`: remove it"
            )
        if config.init_from is not None:
            raise ConfigError(
                "`init_from` is not supported with model_family ingredients: give a trained `pipeline/` output as `model`"
            )
        if config.latent_cache is not None:
            raise ConfigError("`latent_cache` is not supported with model_family ingredients (it stores no faces)")
        for key in ("reference_dropout", "subject_dropout"):
            if getattr(config, key):
                raise ConfigError(
                    f"`{key}` is not supported with model_family ingredients: its guidance keeps the faces in both "
                    f"branches (only the prompt is dropped), so there is no face-free branch to train; set it to 0"
                )
        tcfg = transformer_config(config)
        if config.train_lora:
            from ..models.transformer_ingredients import IngredientsTransformer3DModel

            with torch.device("meta"):
                model = IngredientsTransformer3DModel.from_config({**tcfg, "num_layers": 1})
            names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            for target in config.lora_targets:
                if not any(n == target or n.endswith("." + target) for n in names):
                    raise ConfigError(
                        f"`lora_targets`: no Linear module of the Ingredients transformer is named {target!r}"
                    )


def transformer_config(config: Any) -> dict[str, Any]:
    """The full config of the Ingredients transformer a training config uses (nothing loaded; a released
    ``config.json`` translated, every default filled in)."""
    from ..models.transformer_ingredients import IngredientsTransformer3DModel

    if config.tiny_model is not None:
        return {k: v for k, v in config.transformer_config().items() if not k.startswith("_")}
    folder = config.resolve(config.model)
    sub = "transformer_ema" if (folder / "transformer_ema" / "config.json").is_file() else "transformer"
    try:
        raw = IngredientsTransformer3DModel.load_config(str(folder), subfolder=sub)
        with torch.device("meta"):
            model = IngredientsTransformer3DModel.from_config({**raw, "num_layers": 1})
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"`model` {folder}: unusable Ingredients transformer config ({e})") from None
    return {**dict(model.config), "num_layers": raw.get("num_layers", 1)}


def face_feature_path(record: Any, subject: int, root: Path) -> Path | None:
    """The ``.safetensors`` of a subject's face features (``None`` when the manifest gives none)."""
    value = record.subjects[subject].meta.get(FACE_FEATURES_KEY)
    if value is None:
        return None
    where = f"record at line {record.line}: `subjects[{subject}].meta.{FACE_FEATURES_KEY}`"
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where} must be a path to a .safetensors file, got {value!r}")
    path = Path(value) if Path(value).is_absolute() else root / value
    if not path.is_file():
        raise ValueError(f"{where}: file not found: {path}")
    return path


def load_face_features(path: Path, config: Any, where: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(id_cond (1, D_id), id_vit_hidden [(1, T, D_vit)] * num_scale)`` of one face-feature file, its keys and
    shapes checked against the transformer ``config`` (errors name ``where`` and the key)."""
    try:
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"{where}: cannot read {path}: {e}") from None
    expected = {"id_cond"} | {f"id_vit_hidden.{k}" for k in range(config["LFE_num_scale"])}
    if keys != expected:
        raise ValueError(
            f"{where}: {path} must hold exactly {sorted(expected)}; missing {sorted(expected - keys)}, "
            f"unexpected {sorted(keys - expected)}"
        )
    tensors = load_file(str(path))
    cond = tensors["id_cond"]
    if cond.ndim == 2 and cond.shape[0] == 1:
        cond = cond[0]
    if cond.shape != (config["LFE_id_dim"],) or not cond.is_floating_point():
        raise ValueError(
            f"{where}: `id_cond` in {path} must be float ({config['LFE_id_dim']},), got {tuple(cond.shape)}"
        )
    vits = []
    for k in range(config["LFE_num_scale"]):
        vit = tensors[f"id_vit_hidden.{k}"]
        if vit.ndim == 3 and vit.shape[0] == 1:
            vit = vit[0]
        if vit.ndim != 2 or vit.shape[-1] != config["LFE_vit_dim"] or not vit.is_floating_point():
            raise ValueError(
                f"{where}: `id_vit_hidden.{k}` in {path} must be float (T, {config['LFE_vit_dim']}), got {tuple(vit.shape)}"
            )
        vits.append(vit[None].float())
    if len({v.shape[1] for v in vits}) != 1:
        raise ValueError(f"{where}: the `id_vit_hidden.*` in {path} must have the same number of tokens")
    return cond[None].float(), vits


class FaceFeatureDataset(torch.utils.data.Dataset):
    """A MuSA dataset whose items also carry each subject's ``id_cond`` / ``id_vit_hidden`` (precomputed files)."""

    def __init__(self, dataset: Any, root: Path, config: dict[str, Any]):
        self.dataset, self.root, self.config = dataset, root, config

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:  # `records`, `set_epoch`, ...: the wrapped dataset's
        if name in ("dataset", "root", "config"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        record = self.dataset.records[index]
        faces = []
        for s in range(len(record.subjects)):
            path = face_feature_path(record, s, self.root)
            where = f"record at line {record.line}: `subjects[{s}].meta.{FACE_FEATURES_KEY}`"
            faces.append(None if path is None else load_face_features(path, self.config, where))
        item["faces"] = faces
        return item


class _IngredientsTrainable(nn.Module):
    """The transformer (its routers trainable) under one module for accelerate; returns the routing logits too."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, **inputs: Any) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        return self.transformer(**inputs, return_routing_logits=True, return_dict=False)


class IngredientsTrainer(DiasRTrainer):
    """:class:`DiasRTrainer` for ``model_family: ingredients`` (built by ``diasr train`` from the family). The loop,
    checkpoints, resume and logging are the base trainer's; the model, the data and the losses are Ingredients'.

    Outputs: ``router.safetensors`` (the trained ``router.{i}.*``, released key names), the LoRA file or
    ``transformer/`` when trained, and ``pipeline/`` (a complete :class:`IngredientsPipeline` folder) when the
    model was a ``tiny_model`` or was fully fine-tuned. Load ``router.safetensors`` into a loaded pipeline with
    :func:`load_trained_routers`.
    """

    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs
        from diffusers.optimization import get_scheduler
        from peft import LoraConfig

        from . import sharding

        cfg = self.config
        if sharding.fsdp_requested():
            raise ValueError("FSDP is not supported with model_family ingredients; launch without it")
        self.accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            cpu=not torch.cuda.is_available(),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        resume_from = self._prepare_output_dir()
        self._check_face_manifests()  # a bad manifest is refused before any model loads
        self.pipe = self._build_pipeline()
        transformer = self.pipe.transformer
        if not transformer.config.is_train_face:
            raise ValueError("the Ingredients transformer was built with `is_train_face=False`: it has no routers")
        for module in (self.pipe.text_encoder, self.pipe.vae, transformer):
            module.requires_grad_(False)
        transformer.router.requires_grad_(True)
        if cfg.train_transformer:
            transformer.requires_grad_(True)
        if cfg.train_lora:
            transformer.add_adapter(
                LoraConfig(
                    r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights=True, target_modules=cfg.lora_targets
                )
            )
            transformer.router.requires_grad_(True)
        if cfg.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        self.experts = [transformer]
        if self.pipe.face_encoder is None and self._needs_face_encoder:
            try:
                self.pipe.load_face_encoder()  # names the missing package or file
            except (ImportError, FileNotFoundError) as e:
                raise type(e)(f"{self._needs_face_encoder} is not given, so the face models are needed: {e}") from e
        if resume_from is not None:
            self._load_weights(resume_from, None, transformer)
        self.train_set, self.eval_set = self._build_datasets(transformer, self.pipe.vae)
        self.pipe.to(self.accelerator.device)
        router_params = list(transformer.router.parameters())
        ids = {id(p) for p in router_params}
        others = [p for p in transformer.parameters() if p.requires_grad and id(p) not in ids]
        router_lr = cfg.learning_rate if cfg.router_learning_rate is None else cfg.router_learning_rate
        groups = [{"params": router_params, "lr": router_lr}]
        if others:
            groups.append({"params": others, "lr": cfg.learning_rate})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        self.lr_scheduler = get_scheduler(
            cfg.lr_scheduler, self.optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_steps
        )
        self.model, self.optimizer = self.accelerator.prepare(_IngredientsTrainable(transformer), self.optimizer)
        self.router = transformer.router
        self.transformer = transformer
        self.start_step = 0
        self._encoded: dict[int, dict[str, Any] | None] = {}
        if resume_from is not None:
            self._load_checkpoint(resume_from)

    # -- data -----------------------------------------------------------------------------------------------------

    def _check_face_manifests(self) -> None:
        """Every subject's face features exist with the keys and shapes of this model (or the face models will
        compute them): checked on every record now, naming the record and the field."""
        from ..data import load_manifest

        cfg = self.config
        tcfg = transformer_config(cfg)
        self._needs_face_encoder: str | bool = False
        for key in ("train_data", "eval_data"):
            if getattr(cfg, key) is None:
                continue
            path = cfg.manifest_path(getattr(cfg, key))
            for record in load_manifest(path, skip_invalid=True).records:
                for s in range(len(record.subjects)):
                    feature = face_feature_path(record, s, path.parent)
                    where = f"`{key}` record at line {record.line}: `subjects[{s}].meta.{FACE_FEATURES_KEY}`"
                    if feature is not None:
                        load_face_features(feature, tcfg, where)
                    elif cfg.tiny_model is not None:
                        raise ValueError(
                            f"{where} is missing: a `tiny_model` has no face models, so every subject needs "
                            "precomputed face features (a .safetensors with `id_cond` and `id_vit_hidden.{k}`)"
                        )
                    elif not self._needs_face_encoder:
                        self._needs_face_encoder = where  # the first such subject, for the error message

    def _build_datasets(self, transformer: nn.Module, vae: nn.Module):
        train, evaluation = super()._build_datasets(transformer, vae)
        tcfg = dict(transformer.config)
        root = self.config.manifest_path(self.config.train_data).parent
        eval_root = root if self.config.eval_data is None else self.config.manifest_path(self.config.eval_data).parent
        return FaceFeatureDataset(train, root, tcfg), None if evaluation is None else FaceFeatureDataset(
            evaluation, eval_root, tcfg
        )

    def _routable(self, records: list[Any]) -> list[Any]:
        return records  # Ingredients routes faces, not phrases: every caption is usable

    # -- one sample ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _encode(self, item: dict[str, Any]) -> dict[str, Any]:
        """Frozen encoders: video latents, first-frame latents, prompt embeddings and the identities' features."""
        pipe, device = self.pipe, self.accelerator.device
        dtype = pipe.transformer.dtype
        from ..utils.latents import encode_latents

        x0 = encode_latents(pipe.vae, item["video"][None].to(device)).float()  # (1, C, F, h, w)
        refs = [
            ((r.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy() for r in item["ref_images"]
        ]
        from ..pipelines.ingredients_faces import compose_first_frame

        first = compose_first_frame([PIL.Image.fromarray(np.ascontiguousarray(r)) for r in refs])
        image = pipe.video_processor.preprocess(first, height=self.config.height, width=self.config.width)
        image_latents = encode_latents(pipe.vae, image[:, :, None].to(device))  # (1, C, 1, h, w)
        image_latents = torch.cat([image_latents, torch.zeros_like(x0[:, :, 1:])], dim=2)  # I2V: frame 0, then zeros
        prompt_embeds, _ = pipe.encode_prompt(
            item["caption"], do_classifier_free_guidance=False, max_sequence_length=self.config.max_sequence_length,
            device=device,
        )  # fmt: skip
        id_cond, id_vit = [], []
        for s, face in enumerate(item["faces"]):
            if face is None:  # no precomputed file: the face models, on the subject's first reference
                faces = pipe.face_encoder([PIL.Image.fromarray(np.ascontiguousarray(refs[s]))])
                face = (faces.id_cond[0], list(faces.id_vit_hidden[0]))
            id_cond.append(face[0].to(device))
            id_vit.append([v.to(device) for v in face[1]])
        labels = item["token_labels"].reshape(1, -1).to(device)
        p = pipe.transformer.config.patch_size
        if labels.shape[1] != x0.shape[2] * (x0.shape[3] // p) * (x0.shape[4] // p):
            raise ValueError(f"token labels ({labels.shape[1]}) do not match the latent grid of {tuple(x0.shape)}")
        return {"x0": x0, "image_latents": image_latents.to(dtype), "prompt_embeds": prompt_embeds.to(dtype),
                "id_cond": id_cond, "id_vit_hidden": id_vit, "labels": labels}  # fmt: skip

    @torch.no_grad()
    def empty_prompt(self) -> tuple[torch.Tensor, None]:
        """The empty prompt as ``IngredientsPipeline`` encodes its default negative prompt (caption dropout)."""
        if getattr(self, "_empty_prompt", None) is None:
            embeds, _ = self.pipe.encode_prompt(
                "", do_classifier_free_guidance=False, max_sequence_length=self.config.max_sequence_length,
                device=self.accelerator.device,
            )  # fmt: skip
            self._empty_prompt = (embeds.to(self.pipe.transformer.dtype), None)
        return self._empty_prompt

    def _forward(self, enc: dict[str, Any], sigma: torch.Tensor, noise: torch.Tensor, model: nn.Module):
        """``(prediction, target, {layer: routing logits}, {}, None)`` at noise level ``sigma`` (v-prediction)."""
        x0 = enc["x0"]
        noisy, t, target = self.config.family.noisy_input(self.pipe, x0, noise, sigma)
        dtype = self.pipe.transformer.dtype
        hidden = torch.cat([noisy.to(dtype), enc["image_latents"]], dim=1).transpose(1, 2)  # (B, F, 2C, h, w)
        rotary = None
        if self.pipe.transformer.config.use_rotary_positional_embeddings:
            s = self.pipe.vae_scale_factor_spatial
            rotary = self.pipe._prepare_rotary_positional_embeddings(
                hidden.shape[-2] * s, hidden.shape[-1] * s, hidden.shape[1], hidden.device
            )
        with self.accelerator.autocast():
            pred, logits = model(
                hidden_states=hidden, encoder_hidden_states=enc["prompt_embeds"], timestep=t.reshape(()).expand(x0.shape[0]),
                image_rotary_emb=rotary, id_cond=enc["id_cond"], id_vit_hidden=enc["id_vit_hidden"],
            )  # fmt: skip
        return pred.transpose(1, 2).float(), target.float(), dict(enumerate(logits)), {}, None

    def _losses(self, enc, pred, target, logits, anchors) -> dict[str, torch.Tensor]:
        from ..routing import ingredients_routing_loss
        from ..routing.ingredients_router import majority_identity

        cfg = self.config
        layer_logits = [lg.float() for lg in logits.values()]
        losses = {
            "diffusion": F.mse_loss(pred, target),
            "route": ingredients_routing_loss(layer_logits, enc["labels"]),
        }
        with torch.no_grad():
            labelled = enc["labels"] >= 0
            hits = majority_identity(layer_logits)[labelled] == enc["labels"][labelled]
            losses["routing_accuracy"] = hits.float().mean() if labelled.any() else torch.tensor(float("nan"))
        losses["loss"] = cfg.lambda_diffusion * losses["diffusion"] + cfg.lambda_route * losses["route"]
        return losses

    # -- outputs --------------------------------------------------------------------------------------------------

    def _router_state(self) -> dict[str, torch.Tensor]:
        return {f"router.{k}": v.detach().cpu().contiguous() for k, v in self.transformer.router.state_dict().items()}

    def _save_weights(self, folder: Path) -> None:
        save_file(self._router_state(), str(folder / ROUTER_WEIGHT_NAME))
        if self.config.train_lora:
            self._save_lora(folder)
        if self.config.train_transformer:
            self.transformer.save_pretrained(folder / "transformer")

    def _save_final(self) -> None:
        """``router.safetensors`` (+ LoRA / ``transformer/`` / ``pipeline/``), each renamed into place once written."""
        out = self.output_dir
        (out / "eval.json").unlink(missing_ok=True)
        with contextlib.ExitStack() as stack:
            save_file(self._router_state(), str(stack.enter_context(atomic_path(out / ROUTER_WEIGHT_NAME))))
            if self.config.train_lora:
                lora_tmp = stack.enter_context(atomic_path(out / LORA_WEIGHT_NAME))
                self._save_lora(lora_tmp.parent, lora_tmp.name, self.transformer)
            if self.config.train_transformer:
                self.transformer.save_pretrained(stack.enter_context(atomic_dir(out / "transformer")))
            if (self.config.train_transformer or self.config.tiny_model is not None) and not self.config.train_lora:
                # A complete folder: the toy's random base weights cannot be found anywhere else.
                self.pipe.save_pretrained(stack.enter_context(atomic_dir(out / "pipeline")))

    def _load_weights(self, folder: Path, router: Any, transformer: nn.Module) -> None:
        """The routers (+ LoRA / transformer) of a checkpoint folder, for ``--resume``."""
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft.utils import set_peft_model_state_dict

        if self.config.train_transformer:
            self._load_transformer(folder / "transformer", transformer)
        load_trained_routers(transformer, folder / ROUTER_WEIGHT_NAME)
        if self.config.train_lora and (folder / LORA_WEIGHT_NAME).is_file():
            sd = type(self.pipe).lora_state_dict(str(folder), weight_name=LORA_WEIGHT_NAME)
            sd = {k.removeprefix("transformer."): v for k, v in sd.items() if k.startswith("transformer.")}
            set_peft_model_state_dict(transformer, convert_unet_state_dict_to_peft(sd), adapter_name="default")

    # -- evaluation -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, details: bool = False) -> dict[str, Any]:
        """Routing accuracy (majority identity over the routed layers, labelled tokens), per-identity IoU on the
        labelled tokens (Ingredients has no null route: background is not scored), routing and diffusion losses on
        the held-out set at each of ``eval_sigmas``. ``details`` is accepted for the base signature and ignored."""
        from ..eval.routing import label_iou
        from ..routing.ingredients_router import majority_identity

        if not hasattr(self, "accelerator"):
            self.setup()
        if self.eval_set is None:
            return {"num_eval_clips": 0, "note": "no held-out clips (eval_fraction 0 and no eval_data)"}
        self.model.eval()
        model = self.accelerator.unwrap_model(self.model)
        acc, ious, diff, route = [], {}, [], []
        for idx in range(len(self.eval_set)):
            enc = self._encode(self.eval_set[idx])
            labels = enc["labels"][0]
            for k, sigma in enumerate(self.config.eval_sigmas):
                gen = torch.Generator().manual_seed(_sample_seed(self.config.seed, -2, idx * 31 + k))
                noise = torch.randn(enc["x0"].shape, generator=gen).to(self.accelerator.device)
                pred, target, logits, _, _ = self._forward(
                    enc, torch.tensor(float(sigma), device=noise.device), noise, model
                )
                losses = self._losses(enc, pred, target, logits, {})
                diff.append(float(losses["diffusion"]))
                route.append(float(losses["route"]))
                if not math.isnan(float(losses["routing_accuracy"])):
                    acc.append(float(losses["routing_accuracy"]))
                predicted = majority_identity(list(logits.values()))[0]
                predicted = torch.where(labels < 0, torch.full_like(predicted, -1), predicted)
                n = len(enc["id_cond"])
                for s, v in enumerate(label_iou(predicted, labels, n)["per_subject_iou"]):
                    if v is not None:
                        ious.setdefault(s, []).append(v)
        self.model.train()
        all_ious = [x for v in ious.values() for x in v]

        def mean(values: list[float]) -> float:
            return sum(values) / len(values) if values else float("nan")

        return {
            "routing_accuracy": mean(acc),
            "routing_iou_mean": mean(all_ious),
            "routing_iou_per_subject": {str(s): mean(v) for s, v in sorted(ious.items())},
            "routing_loss": mean(route),
            "diffusion_loss": mean(diff),
            "num_eval_clips": len(self.eval_set),
            "eval_sigmas": list(self.config.eval_sigmas),
            "stage": self.config.stage,
        }


def load_trained_routers(transformer: nn.Module, path: str | Path) -> None:
    """Load a ``router.safetensors`` written by ``diasr train`` (keys ``router.{i}.*`` as released) into an
    :class:`~diasr_diffusers.IngredientsTransformer3DModel`; every router tensor must be there with its shape.

    Example:
        ```py
        >>> pipe = IngredientsPipeline.from_pretrained("feizhengcong/Ingredients")
        >>> load_trained_routers(pipe.transformer, "runs/ingredients/router.safetensors")
        ```
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no trained routers at {path} (expected a diasr train output's {ROUTER_WEIGHT_NAME})")
    state = load_file(str(path))
    ours = {f"router.{k}": v for k, v in transformer.router.state_dict().items()}
    if set(state) != set(ours):
        missing, extra = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
        raise ValueError(
            f"{path} does not fit this transformer's routers: missing {missing[:4]}, unexpected {extra[:4]}"
        )
    bad = [k for k, v in state.items() if v.shape != ours[k].shape]
    if bad:
        raise ValueError(
            f"{path}: {bad[0]} is {tuple(state[bad[0]].shape)}, the model's is {tuple(ours[bad[0]].shape)}"
        )
    transformer.router.load_state_dict({k.removeprefix("router."): v for k, v in state.items()})
