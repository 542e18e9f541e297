"""Two-stage DiasR training with accelerate + peft (the base model stays frozen).

Determinism is by construction: the data order of epoch ``e`` is a permutation seeded by ``(seed, e)``, and every
sample's noise, timestep and augmentation are seeded by ``(seed, step, global sample index)``. A run resumed from a
checkpoint therefore takes exactly the steps of an uninterrupted run, and N processes with batch B take the same
steps as one process with batch N*B (up to the order of floating-point reductions).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.training_utils import compute_density_for_timestep_sampling
from safetensors.torch import load_file, save_file

from ..pipelines.loading import LORA_2_WEIGHT_NAME, LORA_WEIGHT_NAME  # the files the loader reads
from ..routing import IDRouter, mask_loss, routing_cross_entropy
from ..utils.io import atomic_dir, atomic_path, atomic_write_text
from ..utils.output_paths import OutputPathError, check_outputs, claim_outputs
from . import sharding
from .config import DROPOUT_KEYS, TrainConfig

logger = logging.getLogger(__name__)

STATE_NAME = "trainer_state.json"  # written last into a checkpoint: its list of files and sizes marks it complete
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
_EXPERT_NAMES = ("transformer", "transformer_2")  # folder names of the experts (Wan2.2 A14B has two)
_LORA_NAMES = (LORA_WEIGHT_NAME, LORA_2_WEIGHT_NAME)
# Our temporary names in the output folder (utils.io.atomic_dir / atomic_path, pruning): a kill leaves them behind.
_LEFTOVER = re.compile(
    r"\.(checkpoint-\d+|router|transformer|transformer_2|pipeline)\.(tmp|deleting)|\.(eval|metrics|pytorch_lora_weights|pytorch_lora_weights_2)\..+\.tmp\.(json|jsonl|safetensors)"
)
# Keys a resumed run may change: they do not touch the weights, the optimizer or the data stream already taken.
RESUMABLE_CHANGES = ("max_steps", "checkpointing_steps", "checkpoints_total_limit", "log_every", "eval_data",
                     "eval_sigmas", "mixed_precision", "gradient_checkpointing")  # fmt: skip


class _Trainable(nn.Module):
    """The trainable parts under one module, so DDP syncs the LoRA and the router together. The router is called
    from inside the transformer's attention processors (through the routing state); its recorded logits and anchors
    are returned with the prediction so that DDP sees every path from the router's parameters to the loss."""

    def __init__(self, transformer: nn.Module, router: IDRouter, state: Any, transformer_2: nn.Module | None = None,
                 router_trains: bool = True):  # fmt: skip
        super().__init__()
        self.transformer = transformer
        self.transformer_2 = transformer_2  # Wan2.2 A14B's low-noise expert (None for one transformer)
        self.router = router
        self.state = state
        self.router_trains = router_trains

    def forward(self, low_noise: bool = False, **inputs: Any):
        model = self.transformer_2 if low_noise else self.transformer
        pred = model(**inputs, return_dict=False)[0]
        if self.router_trains and not self.state.logits and torch.is_grad_enabled():
            # The router did not run (references dropped). FSDP reduce-scatters only the parameters that have a
            # gradient: a rank whose router ran and one whose did not would disagree. A zero term gives every
            # router parameter a zero gradient on every rank (and the prediction is unchanged).
            pred = pred + 0.0 * sum(p.sum() for p in self.router.parameters())
        return pred, dict(self.state.logits), dict(self.state.anchors), dict(self.state.buckets)


def _sample_seed(seed: int, step: int, index: int) -> int:
    # A fixed mixing of (seed, step, global sample index) into a 63-bit seed.
    return (seed * 1_000_003 + step * 10_007 + index * 101 + 12_345) % (2**63 - 1)


def optimizer_state_to_safetensors(sd: dict[str, Any], path: Path) -> None:
    """Optimizer state (``optimizer.state_dict()``'s layout) as safetensors (tensors) + JSON (scalars, param
    groups): no pickle."""
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    save_file(tensors, str(path / "optimizer.safetensors"))
    (path / "optimizer.json").write_text(json.dumps({"param_groups": sd["param_groups"], "scalars": scalars}))


def optimizer_state_from_safetensors(path: Path) -> dict[str, Any]:
    meta = json.loads((path / "optimizer.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for key, v in load_file(str(path / "optimizer.safetensors")).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def read_metrics(path: str | os.PathLike, up_to_step: int | None = None) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (those up to ``up_to_step``). A torn last line, left by a kill during the
    append, is dropped with a warning; a bad line elsewhere is an error naming it."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("no integer `step`")
        except (ValueError, UnicodeDecodeError) as e:
            if all(not rest.strip() for rest in lines[i + 1 :]):
                logger.warning(f"{path}: dropping the unfinished last line {i + 1} ({e})")
                break
            raise ValueError(f"{path} line {i + 1} is not a metrics record ({e}); fix or delete that line") from None
        if up_to_step is None or record["step"] <= up_to_step:
            records.append(record)
    return records


class DiasRTrainer:
    """Runs one training stage from a :class:`TrainConfig`.

    Example:
        ```py
        >>> from diasr_diffusers.training import DiasRTrainer, TrainConfig
        >>> trainer = DiasRTrainer(TrainConfig.from_yaml("examples/configs/synthetic_tiny.yaml"), "runs/tiny")
        >>> trainer.train()  # writes router/, pytorch_lora_weights.safetensors, metrics.jsonl, eval.json
        ```
    """

    def __init__(self, config: TrainConfig, output_dir: str | os.PathLike, resume: bool = False):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"`config` must be a TrainConfig (TrainConfig.from_yaml / from_dict), got {type(config).__name__}")
        if not isinstance(output_dir, (str, os.PathLike)) or not str(output_dir):
            raise TypeError(f"`output_dir` must be a folder path, got {output_dir!r}")
        if not isinstance(resume, bool):
            raise TypeError(f"`resume` must be a bool, got {resume!r}")
        config.validate()  # it may have been edited since it was built
        self.config = config
        self.output_dir = Path(output_dir).expanduser()
        self.resume = resume
        self._trained = False
        self._inherited_transformer = False  # set by setup(): an init_from transformer this run starts from
        self._sharded = False  # set by setup(): FSDP (training/sharding.py)
        self.skipped_records = 0
        self.failed_samples = 0

    # -- setup ----------------------------------------------------------------------------------------------------

    def _build_pipeline(self) -> Any:
        cfg = self.config
        if cfg.tiny_model is not None:
            return cfg.family.tiny_pipeline(cfg.tiny_model)
        return cfg.family.load(str(cfg.resolve(cfg.model)))

    def _build_datasets(self, transformer: nn.Module, vae: nn.Module):
        from ..data import LatentCacheDataset, MuSADataset, RefAugment, load_manifest
        from ..routing import token_grid_factors

        cfg = self.config
        grid = token_grid_factors(transformer, vae)
        common = dict(
            num_frames=cfg.num_frames, height=cfg.height, width=cfg.width, frame_stride=cfg.frame_stride,
            seed=cfg.seed, **grid,
        )  # fmt: skip
        train = load_manifest(cfg.manifest_path(cfg.train_data), skip_invalid=True)
        self.skipped_records += train.num_skipped
        records = self._routable(train.records)
        if not records:
            raise ValueError(f"`train_data` {cfg.manifest_path(cfg.train_data)} has no valid record")
        if cfg.eval_data is not None:
            eval_records = self._routable(load_manifest(cfg.manifest_path(cfg.eval_data), skip_invalid=True).records)
        else:
            n_eval = int(round(len(records) * cfg.eval_fraction))
            order = torch.randperm(len(records), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
            eval_records = [records[i] for i in order[:n_eval]]
            records = [records[i] for i in order[n_eval:]]
        if cfg.latent_cache is not None:
            cache = cfg.resolve(cfg.latent_cache)
            try:  # the VAE first: a cache from another VAE also has another token grid, but the VAE is the cause
                LatentCacheDataset(cache).check_vae(vae)
                train_set = MuSADataset(records, clip_sampling="start", crop="center", latent_cache=cache, **common)
            except ValueError as err:
                raise ValueError(f"`latent_cache` is unusable: {err}") from err
        else:
            train_set = MuSADataset(records, clip_sampling="random", crop="random", ref_augment=RefAugment(), **common)
        eval_set = None
        if eval_records:
            eval_set = MuSADataset(eval_records, clip_sampling="start", crop="center", ref_augment=None, **common)
        return train_set, eval_set

    def _routable(self, records: list[Any]) -> list[Any]:
        """The records whose phrases the pipeline can route within `max_sequence_length` tokens; the others are
        skipped now (and counted) rather than failing mid-run."""
        keep = []
        for rec in records:
            try:
                # The pipeline's matcher: HunyuanVideo-1.5 finds phrases through its chat template and crop.
                self.pipe.phrase_owners(rec.caption, rec.phrases, self.config.max_sequence_length, "caption")
            except ValueError as err:
                logger.warning(f"skipping the record at line {rec.line}: {err}")
                self.skipped_records += 1
                continue
            keep.append(rec)
        return keep

    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs
        from diffusers.optimization import get_scheduler
        from peft import LoraConfig

        cfg = self.config
        self.accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            cpu=not torch.cuda.is_available(),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        self._sharded = sharding.fsdp_requested()
        if self._sharded:
            sharding.check_fsdp_launch()
        resume_from = self._prepare_output_dir()  # user mistakes in the output folder surface before any model loads
        self.pipe = self._build_pipeline()
        # Wan2.2 A14B: both experts are trained alike (LoRA or full), each on the samples whose timestep selects it;
        # one router serves both (see DiasRPipeline).
        experts = self.pipe.experts
        if self._sharded:
            sharding.check_fsdp_launch(len(experts))
        for module in (self.pipe.text_encoder, self.pipe.vae, *experts):
            module.requires_grad_(False)
        transformer = self.pipe.transformer
        # A generator trained by an earlier stage is inherited even when this stage freezes it: silently falling back to
        # the base (or random `tiny_model`) weights would train a router for a transformer nobody uses.
        self._inherited_transformer = cfg.init_from is not None and (cfg.resolve(cfg.init_from) / "transformer").is_dir()
        if self._inherited_transformer and not cfg.train_transformer:  # else `_load_weights` loads it below
            for name, expert in zip(_EXPERT_NAMES, experts):
                self._load_transformer(cfg.resolve(cfg.init_from) / name, expert)
        for expert in experts:
            if cfg.train_transformer:
                expert.requires_grad_(True)
            if cfg.train_lora:
                expert.add_adapter(
                    LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights=True, target_modules=cfg.lora_targets)
                )
            if cfg.gradient_checkpointing:  # the backward pass runs after `activate`: recomputed blocks must route
                expert.enable_gradient_checkpointing(self.pipe.routing_state.gradient_checkpointing_func())
        router = IDRouter.from_transformer(transformer, **cfg.router)
        self.pipe.register_modules(id_router=router)
        self.experts = experts
        if cfg.init_from is not None:
            self._load_weights(cfg.resolve(cfg.init_from), router, transformer)
        if resume_from is not None:  # weights before any wrapping (FSDP shards them); optimizer state after it
            self._load_weights(resume_from, router, transformer)
        self.train_set, self.eval_set = self._build_datasets(transformer, self.pipe.vae)
        if cfg.random_toy_vae:
            self._calibrate_toy_vae()

        device = self.accelerator.device
        self.pipe.to(device)
        trainable = _Trainable(
            transformer, router, self.pipe.routing_state, getattr(self.pipe, "transformer_2", None), cfg.stage != "dense"
        )
        if self._sharded:  # before the optimizer is built: sharding replaces the parameters
            sharding.shard(trainable, self.accelerator, experts)
        transformer_params = [p for e in experts for p in e.parameters() if p.requires_grad]  # LoRA, or every weight
        router_lr = cfg.learning_rate if cfg.router_learning_rate is None else cfg.router_learning_rate
        groups = []
        if cfg.stage != "dense":  # the dense baseline never calls the router
            groups.append({"params": list(router.parameters()), "lr": router_lr})
        if transformer_params:
            groups.append({"params": transformer_params, "lr": cfg.learning_rate})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        self.lr_scheduler = get_scheduler(
            cfg.lr_scheduler, self.optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_steps
        )
        if self._sharded:  # already sharded: accelerate would wrap it in DDP without GPUs; it takes the optimizer only
            self.model, self.optimizer = trainable, self.accelerator.prepare_optimizer(self.optimizer)
        else:
            self.model, self.optimizer = self.accelerator.prepare(trainable, self.optimizer)
        self.router = router
        self.transformer = transformer
        self.start_step = 0
        self._encoded: dict[int, dict[str, Any] | None] = {}  # `cache_latents`: frozen-encoder outputs per clip
        if resume_from is not None:
            self._load_checkpoint(resume_from)

    def _calibrate_toy_vae(self, num_clips: int = 16) -> None:
        """Give the random toy VAE latent statistics measured on the first training clips.

        It inherits Wan's ``latents_mean/std``, which do not fit its random weights: its normalised latents then vary
        by ~0.03 within a clip, under any noise level the model trains at, and the router has nothing to see.
        Deterministic (the first clips of the seeded training set), so every process computes the same numbers.
        """
        from ..utils.latents import calibrate_latent_statistics

        clips = [self.train_set[i]["video"][None] for i in range(min(num_clips, len(self.train_set)))]
        mean, std = calibrate_latent_statistics(self.pipe.vae, clips)
        logger.info(f"toy VAE latent statistics from {len(clips)} training clips: std {min(std):.3g}..{max(std):.3g}")

    # -- weights and checkpoints ---------------------------------------------------------------------------------

    @staticmethod
    def _load_transformer(folder: Path, transformer: nn.Module) -> None:
        transformer.load_state_dict(type(transformer).from_pretrained(folder).state_dict())

    def _load_weights(self, folder: Path, router: IDRouter, transformer: nn.Module) -> None:
        """Router + LoRA (+ the whole transformer when this run trains it) of a finished stage or a checkpoint folder.

        An ``init_from`` transformer this run does not train was loaded in :meth:`setup`, before any LoRA wraps it.
        """
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft.utils import set_peft_model_state_dict

        router_dir = folder / "router"
        if not (router_dir / "config.json").is_file():
            raise ValueError(f"`init_from`/checkpoint {folder} has no router/ (expected a diasr train output)")
        router.load_state_dict(IDRouter.from_pretrained(router_dir).state_dict())
        for expert, name, lora_name in zip(self.experts, _EXPERT_NAMES, _LORA_NAMES):
            lora_file = folder / lora_name
            if lora_file.is_file() and self.config.train_lora:
                sd = type(self.pipe).lora_state_dict(str(folder), weight_name=lora_name)
                sd = {k.removeprefix("transformer."): v for k, v in sd.items() if k.startswith("transformer.")}
                set_peft_model_state_dict(expert, convert_unet_state_dict_to_peft(sd), adapter_name="default")
            if self.config.train_transformer:
                self._load_transformer(folder / name, expert)

    def _save_weights(self, folder: Path) -> None:
        self.router.save_pretrained(folder / "router")
        for expert, name, lora_name in zip(self.experts, _EXPERT_NAMES, _LORA_NAMES):
            if self.config.train_lora:
                self._save_lora(folder, lora_name, expert)
            if self.config.train_transformer:
                expert.save_pretrained(folder / name)

    def _save_lora(self, folder: Path, weight_name: str = LORA_WEIGHT_NAME, expert: nn.Module | None = None) -> None:
        from peft.utils import get_peft_model_state_dict

        expert = self.transformer if expert is None else expert
        type(self.pipe).save_lora_weights(
            str(folder), transformer_lora_layers=get_peft_model_state_dict(expert), weight_name=weight_name
        )

    def _save_final(self) -> None:
        """``router/`` and the LoRA file of the finished run, each replaced in one rename once both are written: a
        kill leaves the previous outputs (or none), never a half-written one."""
        out = self.output_dir
        (out / "eval.json").unlink(missing_ok=True)  # it would describe the previous weights until evaluate() ends
        with atomic_dir(out / "router") as router_tmp, contextlib.ExitStack() as stack:
            self.router.save_pretrained(router_tmp)
            for i, lora_name in enumerate(_LORA_NAMES):
                lora = out / lora_name
                if self.config.train_lora and i < len(self.experts):
                    lora_tmp = stack.enter_context(atomic_path(lora))
                    self._save_lora(lora_tmp.parent, lora_tmp.name, self.experts[i])
                else:  # one of an earlier run would be loaded with this router
                    lora.unlink(missing_ok=True)
            if self.config.train_transformer or self._inherited_transformer:  # a complete model, not base weights
                for expert, name in zip(self.experts, _EXPERT_NAMES):
                    expert.save_pretrained(stack.enter_context(atomic_dir(out / name)))
                self._save_pipeline(stack.enter_context(atomic_dir(out / "pipeline")))

    def _save_pipeline(self, folder: Path) -> None:
        """The trained model as one Diffusers folder (the dense baseline without its unused router)."""
        if self.config.stage != "dense":
            self.pipe.save_pretrained(folder)
            return
        self.pipe.register_modules(id_router=None)  # untrained: `routing="auto"` must not pick it
        try:
            self.pipe.save_pretrained(folder)
        finally:
            self.pipe.register_modules(id_router=self.router)

    def _checkpoints(self) -> list[tuple[int, Path]]:
        """``(step, folder)`` of every ``checkpoint-<step>`` folder, oldest first; other names are not ours."""
        if not self.output_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.output_dir.iterdir() if (m := _CHECKPOINT.fullmatch(p.name)) and p.is_dir()]
        return sorted(found)

    @staticmethod
    def checkpoint_problem(folder: str | os.PathLike) -> str | None:
        """Why ``folder`` is not a complete checkpoint (``None`` if it is): its ``trainer_state.json`` is written
        last and lists every file with its size."""
        folder = Path(folder)
        try:
            state = json.loads((folder / STATE_NAME).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return f"no {STATE_NAME}"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"unreadable {STATE_NAME} ({e})"
        if not isinstance(state, dict) or not isinstance(state.get("files"), dict) or not isinstance(state.get("step"), int):
            return f"{STATE_NAME} lacks its step or file list"
        for name, size in state["files"].items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes, {size} were written"
        return None

    def latest_checkpoint(self) -> Path | None:
        """The newest complete ``checkpoint-<step>`` folder (newer incomplete ones are skipped with a warning)."""
        for _, folder in reversed(self._checkpoints()):
            problem = self.checkpoint_problem(folder)
            if problem is None:
                return folder
            logger.warning(f"skipping incomplete checkpoint {folder}: {problem}")
        return None

    def _config_record(self) -> dict[str, Any]:
        """The config as saved in checkpoints, with paths made absolute (a resume may run from another folder)."""
        record = self.config.to_dict()
        for key in ("train_data", "model", "init_from", "eval_data", "latent_cache"):
            if record[key] is not None:
                record[key] = str(Path(record[key]).expanduser().resolve())
        return record

    def _check_resume(self, folder: Path) -> None:
        """A checkpoint must come from the same stage and config (but for :data:`RESUMABLE_CHANGES`): anything else
        would mix two runs, fail inside torch on shape mismatches, or be silently overridden by the saved optimizer."""
        state = json.loads((folder / STATE_NAME).read_text(encoding="utf-8"))
        if state.get("stage") != self.config.stage:
            raise ValueError(f"checkpoint {folder} is from stage {state.get('stage')!r}, the config says {self.config.stage!r}")
        saved, ours = state.get("config"), self._config_record()
        if not isinstance(saved, dict):
            raise ValueError(f"checkpoint {folder} does not record its config; it cannot be checked against this one")
        saved = {**dict.fromkeys(DROPOUT_KEYS, 0.0), **saved}  # a checkpoint that predates condition dropout had none
        # The data stream is defined by the global batch: another world size may resume with the per-process
        # `batch_size` that keeps it (a checkpoint without `global_batch` predates this and keeps `batch_size`).
        flexible = (*RESUMABLE_CHANGES, "batch_size") if "global_batch" in state else RESUMABLE_CHANGES
        if "global_batch" in state and state["global_batch"] != self._global_batch():
            raise ValueError(
                f"checkpoint {folder} was trained with a global batch of {state['global_batch']} samples per step "
                f"({state.get('num_processes')} process(es) x batch_size {saved.get('batch_size')}); this run has "
                f"{self._num_processes()} x {self.config.batch_size} = {self._global_batch()}: set `batch_size` to "
                f"{state['global_batch']} / number of processes"
            )
        changed = sorted(k for k in set(saved) | set(ours) if k not in flexible and saved.get(k) != ours.get(k))
        if changed:
            diffs = "; ".join(f"{k}: {saved.get(k)!r} there, {ours.get(k)!r} here" for k in changed[:6])
            raise ValueError(
                f"checkpoint {folder} was written with another config ({diffs}). A resumed run may only change "
                f"{', '.join(RESUMABLE_CHANGES)}; use another --output-dir for a new run"
            )
        if state["step"] > self.config.max_steps:
            raise ValueError(f"checkpoint {folder} is at step {state['step']}, past `max_steps` ({self.config.max_steps})")
        if saved.get("max_steps") != self.config.max_steps and self.config.lr_scheduler not in ("constant", "constant_with_warmup"):
            logger.warning(
                f"`max_steps` changed from {saved.get('max_steps')} to {self.config.max_steps}: the {self.config.lr_scheduler} "
                f"learning-rate schedule continues from step {state['step']} on the new length"
            )

    def check_output_dir(self) -> Path | None:
        """Check the output folder (creating it) and pick the checkpoint to resume from (``None`` for a new run),
        before anything is built. Raises ``ValueError`` for a folder that is a file, not writable, holds another
        run's checkpoints without ``resume``, or has no complete checkpoint (or one of another config) with it."""
        out = self.output_dir
        if out.exists() and not out.is_dir():
            raise ValueError(f"output folder {out} exists and is not a folder")
        if self.resume and not out.is_dir():
            raise ValueError(f"--resume: the output folder {out} does not exist")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot create the output folder {out}: {e.strerror or e}") from None
        if not os.access(out, os.W_OK | os.X_OK):
            raise ValueError(f"the output folder {out} is not writable")
        existing = self._checkpoints()
        if not self.resume:
            self._check_final_outputs()
            if existing:
                raise ValueError(
                    f"output folder {out} holds {existing[-1][1].name} of an earlier run: resume it (--resume, "
                    f"resume=True) or use another output folder"
                )
            return None
        latest = self.latest_checkpoint()
        if latest is None:
            names = ", ".join(p.name for _, p in existing) or "none"
            raise ValueError(f"--resume: no complete checkpoint-<step> folder in {out} (found: {names})")
        self._check_resume(latest)
        return latest

    def _check_final_outputs(self) -> None:
        """A new run replaces ``router/``, ``pipeline/``, the LoRA files, ... at its end: refuse (``ValueError``) such
        names in the output folder that no diasr run wrote, then claim them (:mod:`~diasr_diffusers.utils.output_paths`)."""
        names = ("router", "pipeline", *_EXPERT_NAMES, *_LORA_NAMES, "metrics.jsonl", "eval.json")
        planned = [self.output_dir / name for name in names]
        try:
            check_outputs([("--output-dir", p) for p in planned], flag="--output-dir", folders=True,
                          overwrite_hint="use another --output-dir (or --resume for a run of this folder)")  # fmt: skip
        except OutputPathError as e:
            raise ValueError(str(e)) from None
        accelerator = getattr(self, "accelerator", None)  # None: checked from the CLI before setup()
        if accelerator is None or accelerator.is_main_process:
            claim_outputs(planned)

    def _prepare_output_dir(self) -> Path | None:
        """:meth:`check_output_dir`, after removing our leftovers of a killed run (temp and half-pruned folders)."""
        out = self.output_dir
        if self.accelerator.is_main_process and out.is_dir():
            for leftover in out.iterdir():
                if _LEFTOVER.fullmatch(leftover.name):
                    logger.warning(f"removing {leftover}, left by an interrupted run")
                    if leftover.is_dir() and not leftover.is_symlink():
                        shutil.rmtree(leftover, ignore_errors=True)
                    else:
                        leftover.unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()
        return self.check_output_dir()

    def save_checkpoint(self, step: int) -> Path:
        """Write ``checkpoint-{step}`` atomically (a temp folder renamed into place), keep the newest M. Under FSDP
        every process must call it (they gather the weights and optimizer state; the main process writes)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"`step` must be an integer >= 0, got {step!r}")
        if not hasattr(self, "accelerator"):
            self.setup()
        final = self.output_dir / f"checkpoint-{step}"
        optimizer = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
        if self._sharded:  # every rank takes part in the gathers; the main process writes
            optimizer_state = sharding.full_optimizer_state(self.model, optimizer)
            with self._whole_modules():
                if self.accelerator.is_main_process:
                    self._write_checkpoint(final, step, optimizer_state)
            return final
        self._write_checkpoint(final, step, optimizer.state_dict())
        return final

    def _write_checkpoint(self, final: Path, step: int, optimizer_state: dict[str, Any]) -> None:
        with atomic_dir(final) as tmp:
            self._save_weights(tmp)
            optimizer_state_to_safetensors(optimizer_state, tmp)
            files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
            state = {"step": step, "stage": self.config.stage, "seed": self.config.seed,
                     "lr_scheduler": self.lr_scheduler.state_dict(), "config": self._config_record(), "files": files,
                     "num_processes": self._num_processes(), "global_batch": self._global_batch(), "fsdp": self._sharded}  # fmt: skip
            (tmp / STATE_NAME).write_text(json.dumps(state))
        self._prune_checkpoints()

    @contextlib.contextmanager
    def _whole_modules(self) -> Iterator[None]:
        """Under FSDP, the trained modules as plain unsharded copies on the main process (``self.router``,
        ``self.experts``, the pipeline's), so that the savers write what an unsharded run writes. Every rank must
        enter it (it gathers the weights); nothing changes without FSDP."""
        if not self._sharded:
            yield
            return
        full = sharding.full_model_state(self.model)  # `{}` on all but the main process
        if not self.accelerator.is_main_process:
            yield
            return

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k.removeprefix(prefix): v for k, v in full.items() if k.startswith(prefix)}

        kept = (self.router, self.experts, self.transformer)
        router = sharding.unsharded_copy(self.router, part("router."))
        experts = [sharding.unsharded_copy(e, part(f"{name}.")) for e, name in zip(self.experts, _EXPERT_NAMES)]
        self.router, self.experts, self.transformer = router, experts, experts[0]
        self.pipe.register_modules(id_router=router, **dict(zip(_EXPERT_NAMES, experts)))
        try:
            yield
        finally:
            self.router, self.experts, self.transformer = kept
            self.pipe.register_modules(id_router=kept[0], **dict(zip(_EXPERT_NAMES, kept[1])))

    def _prune_checkpoints(self) -> None:
        """Keep the newest ``checkpoints_total_limit``. Each old one is first renamed to a hidden name (one step, so
        a kill never leaves a half-deleted ``checkpoint-*`` that looks like ours); leftovers go at the next start."""
        for _, old in self._checkpoints()[: -self.config.checkpoints_total_limit]:
            doomed = old.with_name(f".{old.name}.deleting")
            shutil.rmtree(doomed, ignore_errors=True)
            os.replace(old, doomed)
            shutil.rmtree(doomed)

    def _load_checkpoint(self, folder: Path) -> None:
        """The optimizer, schedule and step of a checkpoint (its weights were loaded by :meth:`setup`, before any
        wrapping). The optimizer state is whole in the file, whatever the world size that wrote it."""
        state = json.loads((folder / STATE_NAME).read_text())
        optimizer = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
        saved = optimizer_state_from_safetensors(folder)
        if self._sharded:
            sharding.load_optimizer_state(self.model, optimizer, saved)
        else:
            optimizer.load_state_dict(saved)
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.start_step = int(state["step"])

    # -- data -----------------------------------------------------------------------------------------------------

    def _num_processes(self) -> int:
        # Before `setup` (the CLI checks the output folder first) the launcher's WORLD_SIZE is what accelerate will use.
        if hasattr(self, "accelerator"):
            return self.accelerator.num_processes
        return int(os.environ.get("WORLD_SIZE", "1"))

    def _global_batch(self) -> int:
        return self.config.batch_size * self._num_processes()

    def _global_indices(self, step: int) -> list[tuple[int, int]]:
        """``(epoch, dataset index)`` of each sample of the global batch of ``step`` (all processes)."""
        n = len(self.train_set)
        global_batch = self._global_batch()
        out = []
        for g in range(step * global_batch, (step + 1) * global_batch):
            epoch, pos = divmod(g, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed * 7919 + epoch))
            out.append((epoch, int(perm[pos])))
        return out

    def _local_samples(self, step: int) -> Iterator[tuple[int, dict[str, Any] | None]]:
        """``(global sample index, encoded sample or None if it failed)`` for this process's share of ``step``."""
        b = self.config.batch_size
        rank = self.accelerator.process_index
        for offset, (epoch, idx) in enumerate(self._global_indices(step)[rank * b : (rank + 1) * b]):
            if self.config.cache_latents and idx in self._encoded:
                yield rank * b + offset, self._encoded[idx]
                continue
            try:
                # The dataset draws clip start, crop and augmentation from (seed, epoch, index); a cached sample
                # keeps its epoch-0 draw, so a resumed run caches exactly what an uninterrupted one did.
                self.train_set.set_epoch(0 if self.config.cache_latents else epoch)
                item = self.train_set[idx]
            except (OSError, ValueError, RuntimeError) as e:  # a clip that fails to decode is skipped, not fatal
                logger.warning(f"skipping training sample {idx}: {e}")
                self.failed_samples += 1
                item = None
            enc = None if item is None else self._encode(item)
            if self.config.cache_latents:
                self._encoded[idx] = enc
            yield rank * b + offset, enc

    # -- one sample ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _encode(self, item: dict[str, Any]) -> dict[str, Any]:
        """Frozen encoders: video latents, reference latents, prompt embeddings and routing inputs."""
        pipe, device = self.pipe, self.accelerator.device
        dtype = pipe.transformer.dtype
        if "latents" in item:  # from a latent cache (`diasr cache-latents`)
            x0 = item["latents"][None].to(device).float()  # (1, C, F_lat, h, w)
            ref_latents = item["ref_latents"].to(device)  # (N, C, 1, h, w)
        else:
            x0 = pipe.encode_video_latents(item["video"][None].to(device))
            ref_pixels = torch.stack(list(item["ref_images"]))[:, :, None].to(device)  # (N, 3, 1, H, W)
            ref_latents = pipe.encode_video_latents(ref_pixels)
        # One latent frame per reference, appended in subject order (as DiasRPipeline.encode_references).
        refs = ref_latents[:, :, 0].transpose(0, 1)[None].to(dtype)  # (1, C, N, h, w)
        prompt_embeds, prompt_mask = pipe.encode_training_prompt(item["caption"], self.config.max_sequence_length, device)
        prompt_embeds = prompt_embeds.to(dtype)
        labels = item["token_labels"].reshape(1, -1).to(device)
        coverage = item["token_masks"].flatten(1)[None].to(device)  # (1, N, Lv)
        if labels.shape[1] != math.prod(pipe.video_token_grid(x0)):
            raise ValueError(f"token labels ({labels.shape[1]}) do not match the latent grid of {tuple(x0.shape)}")
        routing = self._routing_inputs(item["caption"], list(item["phrases"]), prompt_embeds, prompt_mask, x0, labels)
        return {"x0": x0, "refs": refs, "prompt_embeds": prompt_embeds, "prompt_mask": prompt_mask, "routing": routing,
                "labels": labels, "coverage": coverage, "caption": item["caption"], "phrases": list(item["phrases"])}  # fmt: skip

    def _routing_inputs(self, caption: str, phrases: list[str], prompt_embeds: torch.Tensor, prompt_mask: Any,
                        x0: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:  # fmt: skip
        """The routing state's inputs for one sample whose subjects are ``phrases`` (one reference frame each), as
        the pipeline's conditional branch builds them, then set for this stage."""
        pipe = self.pipe
        routing = pipe.prepare_routing(
            images_per_subject=[1] * len(phrases), phrases=phrases, prompts=[caption],
            prompt_embeds=prompt_embeds, latents=x0, num_frames=self.config.num_frames,
            max_sequence_length=self.config.max_sequence_length, routing="router", route_text=self.config.route_text,
        )  # fmt: skip
        # LTX: padded tokens are masked; HunyuanVideo-1.5: segments mapped into the transformer's text order.
        if prompt_mask is not None and routing["text_segments"] is not None:
            routing["text_segments"] = pipe.drop_padding_tokens(routing["text_segments"], prompt_mask)
        if self.config.stage == "align":  # attention routed by the ground truth; router scored alongside
            routing.update(mode="masks", mask_buckets=labels, router=self.router)
        elif self.config.stage == "dense":  # Phantom-style: every video token sees every reference
            routing.update(mode="dense", router=None)
        else:
            routing.update(router=self.router, router_gradient="straight_through")
        return routing

    # -- condition dropout ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def empty_prompt(self) -> tuple[torch.Tensor, Any]:
        """``(embeddings, mask or None)`` of the empty prompt, as the pipeline encodes its default negative prompt
        (computed once)."""
        if getattr(self, "_empty_prompt", None) is None:
            embeds, mask = self.pipe.encode_training_prompt("", self.config.max_sequence_length, self.accelerator.device)
            self._empty_prompt = (embeds.to(self.pipe.transformer.dtype), mask)
        return self._empty_prompt

    def _zero_negative_references(self) -> bool:
        """Whether the pipeline's negative branch keeps the reference frames as zeros (Phantom, SkyReels) rather
        than dropping them (``diasr`` style, and every family without reference styles)."""
        style = getattr(self.pipe, "reference_style", None)
        return bool(getattr(style, "zero_negative_references", False))

    def drop_conditions(
        self, enc: dict[str, Any], caption: bool = False, references: bool = False, subjects: tuple[int, ...] = ()
    ) -> dict[str, Any]:
        """A copy of the encoded sample ``enc`` (:meth:`_encode`) with conditions dropped as the pipeline's guidance
        branches feed them, so the transformer sees exactly that branch's inputs:

        - ``caption``: the empty prompt (:meth:`empty_prompt`); text is not routed and the router gets no phrase
          features (the three-way reference-only branch, with ``negative_prompt=""``).
        - ``references``: every reference dropped as the negative branch drops them: absent, with the routing state
          inactive (video-only attention; :meth:`_zero_negative_references` false), or zero frames routed as the
          sample's ground-truth layout (``mode="masks"``, no router; ``dense`` stays dense). With ``caption`` too
          this is the negative branch itself; without it, a call without subjects (or Phantom's zero frames with
          the prompt).
        - ``subjects``: indices of subjects whose reference is removed, as a call without them: their phrases are
          not routed, their video tokens become background (``-1``) in ``labels`` and their rows leave ``coverage``.
          Dropping every subject drops every reference.

        Routing losses are skipped on a sample whose router does not run (references dropped). ``enc`` itself
        (possibly cached by ``cache_latents``) is never modified.
        """
        n = enc["coverage"].shape[1] if "coverage" in enc else 0
        bad = [k for k in subjects if not (isinstance(k, int) and 0 <= k < n)]
        if bad:
            raise ValueError(f"`subjects` must be indices of the sample's {n} subjects, got {list(subjects)!r}")
        keep = [k for k in range(n) if k not in set(subjects)]
        references = references or (n > 0 and not keep)
        if not (caption or references or subjects):
            return enc
        out = dict(enc)
        if caption:
            out["prompt_embeds"], out["prompt_mask"] = self.empty_prompt()
        if "routing" not in enc:  # a family without DiasR routing (Ingredients): only the prompt changes
            return out
        if references:
            if not self._zero_negative_references():
                out["refs"] = enc["refs"][:, :, :0]
                out["routing"] = None
                return out
            out["refs"] = torch.zeros_like(enc["refs"])
            routing = dict(enc["routing"])
            if routing["mode"] != "dense":
                routing.update(mode="masks", mask_buckets=enc["labels"], router=None, router_gradient="none")
        elif subjects:
            # Labels of the kept subjects, renumbered in order; a dropped subject's tokens become background.
            remap = torch.full((n + 1,), -1, dtype=enc["labels"].dtype, device=enc["labels"].device)
            remap[torch.tensor(keep, device=remap.device)] = torch.arange(len(keep), dtype=remap.dtype, device=remap.device)
            out["labels"] = remap[enc["labels"]]  # index -1 reads the last entry: background stays -1
            out["coverage"] = enc["coverage"][:, keep]
            out["refs"] = enc["refs"][:, :, keep]
            out["phrases"] = [enc["phrases"][k] for k in keep]
            routing = self._routing_inputs(
                enc["caption"], out["phrases"], enc["prompt_embeds"], enc["prompt_mask"], enc["x0"], out["labels"]
            )
        else:
            routing = dict(enc["routing"])
        if caption:
            routing.update(text_segments=None, phrase_features=None, phrase_masks=None)
        out["routing"] = routing
        return out

    def _dropout(self, enc: dict[str, Any], step: int, index: int) -> dict[str, Any]:
        """:meth:`drop_conditions` drawn for sample ``index`` of ``step``: one draw for the caption, one for all
        references, one per subject, from a generator of ``(seed, step, index)`` (a resumed run draws the same)."""
        cfg = self.config
        n = len(enc.get("phrases", ()))
        draws = torch.rand(2 + n, generator=torch.Generator().manual_seed(_sample_seed(cfg.seed, step, index) + 2))
        dropped = tuple(k for k in range(n) if draws[2 + k] < cfg.subject_dropout)
        return self.drop_conditions(
            enc, bool(draws[0] < cfg.caption_dropout), bool(draws[1] < cfg.reference_dropout), dropped
        )

    def _forward(self, enc: dict[str, Any], sigma: torch.Tensor, noise: torch.Tensor, model: nn.Module):
        """``(prediction, target, router logits, anchors, buckets)`` of the transformer on ``enc`` noised to
        ``sigma``; the target is the family's (flow matching for Wan, v-prediction for CogVideoX)."""
        x0 = enc["x0"]
        noisy, t, target = self.config.family.noisy_input(self.pipe, x0, noise, sigma)
        state = self.pipe.routing_state
        dtype = self.pipe.transformer.dtype
        # The pipeline builds its model's inputs: Wan2.2 picks the expert of this timestep and gives TI2V per-token
        # timesteps; LTX packs the latents; CogVideoX takes (B, F, C, h, w) and a rotary table. Reference tokens are
        # clean (timestep 0) where the model takes per-token ones.
        low_noise = self.pipe.expert_for(t)[1]
        inputs = self.pipe.denoiser_inputs(noisy.to(dtype), enc["refs"], t, enc["prompt_embeds"], enc["prompt_mask"])
        if enc["routing"] is None:  # no references: the stock attention of the pipeline's negative branch
            state.clear_outputs()
            routed = contextlib.nullcontext()
        else:
            routed = state.activate(**enc["routing"], record=True)
        with routed, self.accelerator.autocast():
            pred, logits, anchors, buckets = model(low_noise, **inputs)
        pred = self.pipe.video_prediction(pred, x0.shape).float()
        return pred, target.float(), logits, anchors, buckets

    def _losses(self, enc, pred, target, logits, anchors) -> dict[str, torch.Tensor]:
        cfg = self.config
        losses = {"diffusion": F.mse_loss(pred, target)}
        labels, coverage = enc["labels"], enc["coverage"]
        n = coverage.shape[1]
        layer_logits = list(logits.values())
        if cfg.stage == "dense" or not layer_logits:  # dense, or references dropped: the router did not run
            losses["loss"] = cfg.lambda_diffusion * losses["diffusion"]
            return losses
        if cfg.stage == "route":
            # Background is taught to the null anchor (class N) unless `route_background` is off (Ingredients).
            target = torch.where(labels < 0, torch.full_like(labels, n if cfg.route_background else -100), labels)
            losses["route"] = torch.stack(
                [routing_cross_entropy(lg, target, ignore_index=-100, balanced=cfg.balanced_routing_loss) for lg in layer_logits]
            ).mean()
        else:
            maps = [lg.float().softmax(-1)[..., :n].transpose(1, 2) for lg in layer_logits]
            losses["mask"] = torch.stack([mask_loss(m, coverage) for m in maps]).mean()
            pairs = [(img, txt) for img, txt in anchors.values() if txt is not None]
            if pairs:
                losses["align"] = torch.stack([1 - F.cosine_similarity(img, txt, dim=-1).mean() for img, txt in pairs]).mean()
        with torch.no_grad():
            pred_cls = torch.stack([lg.argmax(-1) for lg in layer_logits]).mode(dim=0).values
            truth = torch.where(labels < 0, torch.full_like(labels, n), labels)
            losses["routing_accuracy"] = (pred_cls == truth).float().mean()
        weights = {"diffusion": cfg.lambda_diffusion, "route": cfg.lambda_route, "mask": cfg.lambda_mask, "align": cfg.lambda_align}
        losses["loss"] = sum(weights[k] * v for k, v in losses.items() if k in weights)
        return losses

    # -- loop -----------------------------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        if self._trained:
            raise RuntimeError("train() already ran on this trainer; build a new DiasRTrainer (resume=True to continue)")
        if not hasattr(self, "accelerator"):
            self.setup()
        cfg, acc = self.config, self.accelerator
        metrics_path = self.output_dir / "metrics.jsonl"
        if acc.is_main_process and not self.resume and metrics_path.exists():
            metrics_path.unlink()
        if acc.is_main_process and self.resume:  # drop lines past the checkpoint: they will be retaken
            kept = read_metrics(metrics_path, up_to_step=self.start_step)
            atomic_write_text(metrics_path, "".join(json.dumps(m) + "\n" for m in kept))
        self.model.train()
        bar = tqdm(range(self.start_step, cfg.max_steps), initial=self.start_step, total=cfg.max_steps, disable=not acc.is_main_process, desc=f"diasr train ({cfg.stage})")  # fmt: skip
        for step in bar:
            sums: dict[str, float] = {}
            counts: dict[str, int] = {}
            for micro in range(cfg.gradient_accumulation_steps):
                with acc.accumulate(self.model):
                    micro_step = step * cfg.gradient_accumulation_steps + micro
                    total = None
                    for global_i, enc in self._local_samples(micro_step):
                        if enc is None:
                            continue
                        enc = self._dropout(enc, micro_step, global_i)
                        gen = torch.Generator().manual_seed(_sample_seed(cfg.seed, micro_step, global_i) + 1)
                        sigma = compute_density_for_timestep_sampling(
                            cfg.weighting_scheme, 1, cfg.logit_mean, cfg.logit_std, cfg.mode_scale, generator=gen
                        )[0].clamp(1e-3, 1 - 1e-3).to(acc.device)  # fmt: skip
                        noise = torch.randn(enc["x0"].shape, generator=gen).to(acc.device)
                        pred, target, logits, anchors, _ = self._forward(enc, sigma, noise, self.model)
                        losses = self._losses(enc, pred, target, logits, anchors)
                        part = losses["loss"] / cfg.batch_size
                        total = part if total is None else total + part
                        for k, v in losses.items():  # a sample without routing losses (dropout) is not counted in them
                            sums[k] = sums.get(k, 0.0) + float(v.detach())
                            counts[k] = counts.get(k, 0) + 1
                    if total is not None:
                        acc.backward(total)
                    if acc.sync_gradients and cfg.max_grad_norm > 0:
                        acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
            self.lr_scheduler.step()
            done = step + 1
            if acc.num_processes > 1:  # the logged losses are the global batch's, as one process would log them
                from accelerate.utils import gather_object

                shares = gather_object([(sums, counts)])
                keys = dict.fromkeys(k for s, _ in shares for k in s)
                sums = {k: sum(s.get(k, 0.0) for s, _ in shares) for k in keys}
                counts = {k: sum(c.get(k, 0) for _, c in shares) for k in keys}
            record = {"step": done, **{k: v / counts[k] for k, v in sums.items()}, "lr": self.lr_scheduler.get_last_lr()[0]}
            if acc.is_main_process and done % cfg.log_every == 0:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k in ("loss", "diffusion", "route", "mask", "routing_accuracy")})
            if done % cfg.checkpointing_steps == 0 and (acc.is_main_process or self._sharded):
                self.save_checkpoint(done)
            acc.wait_for_everyone()
        self._trained = True
        result: dict[str, Any] = {}
        with self._whole_modules():
            if acc.is_main_process:
                self._save_final()
        if acc.is_main_process or self._sharded:  # sharded: every rank runs the forward passes together
            evaluated = self.evaluate()
        if acc.is_main_process:
            result = evaluated
            result.update(skipped_records=self.skipped_records, failed_samples=self.failed_samples)
            atomic_write_text(self.output_dir / "eval.json", json.dumps(result, indent=2))
        acc.wait_for_everyone()
        return result

    # -- evaluation -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, details: bool = False) -> dict[str, Any]:
        """Routing IoU per subject slot, null accuracy and diffusion loss on the held-out set, routed by the router
        (hard, as at inference) at each of ``eval_sigmas``.

        With ``details``, ``"subjects"`` also lists every (clip, subject, σ) scored: ``index`` (of the clip in
        ``self.eval_set``), ``clip_id``, ``subject``, ``sigma``,
        ``iou``, ``tokens`` (its ground-truth tokens) and ``predicted`` (tokens of it routed to each label, ``-1`` =
        null), for breakdowns such as ``benchmarks/routing_breakdown.py``. Under FSDP every process must call it
        (the forward passes gather each block's weights from all of them)."""
        from ..eval.routing import label_iou

        if not hasattr(self, "accelerator"):
            self.setup()
        if self.eval_set is None:
            return {"num_eval_clips": 0, "note": "no held-out clips (eval_fraction 0 and no eval_data)"}
        self.model.eval()
        model = self.accelerator.unwrap_model(self.model)
        ious: dict[int, list[float]] = {}
        by_sigma: dict[int, list[float]] = {}
        by_layer: dict[str, list[float]] = {}
        null_hits = null_total = 0
        diff = []
        subjects: list[dict[str, Any]] = []
        for idx in range(len(self.eval_set)):
            item = self.eval_set[idx]
            enc = self._encode(item)
            dense = self.config.stage == "dense"
            if dense:
                enc["routing"].update(mode="dense", router=None, mask_buckets=None, router_gradient="none")
            else:
                enc["routing"].update(mode="router", router=self.router, mask_buckets=None, router_gradient="none")
            for k, sigma in enumerate(self.config.eval_sigmas):
                gen = torch.Generator().manual_seed(_sample_seed(self.config.seed, -2, idx * 31 + k))
                noise = torch.randn(enc["x0"].shape, generator=gen).to(self.accelerator.device)
                pred, target, _, _, buckets = self._forward(enc, torch.tensor(float(sigma), device=noise.device), noise, model)
                diff.append(float(F.mse_loss(pred, target)))
                if dense:  # nothing is routed
                    continue
                n = enc["coverage"].shape[1]
                votes = F.one_hot(torch.stack(list(buckets.values())) + 1, n + 1).sum(0)
                predicted = votes.argmax(-1) - 1  # (1, Lv)
                for s, v in enumerate(label_iou(predicted[0], enc["labels"][0], n)["per_subject_iou"]):
                    if v is not None:
                        ious.setdefault(s, []).append(v)
                        by_sigma.setdefault(k, []).append(v)
                        if details:
                            routed = (predicted[0][enc["labels"][0] == s] + 1).bincount(minlength=n + 1)  # index 0 = null
                            subjects.append({
                                "index": idx, "clip_id": item["clip_id"], "subject": s, "sigma": sigma, "iou": v,
                                "tokens": int(routed.sum()), "predicted": {str(j - 1): int(c) for j, c in enumerate(routed.tolist()) if c},
                            })  # fmt: skip
                for layer, b in buckets.items():
                    by_layer.setdefault(str(layer), []).extend(
                        v for v in label_iou(b[0], enc["labels"][0], n)["per_subject_iou"] if v is not None
                    )
                bg = enc["labels"][0] < 0
                null_hits += int((predicted[0][bg] < 0).sum())
                null_total += int(bg.sum())
        self.model.train()
        per_slot = {str(s): sum(v) / len(v) for s, v in sorted(ious.items())}
        all_ious = [x for v in ious.values() for x in v]
        result = {
            "routing_iou_mean": sum(all_ious) / len(all_ious) if all_ious else float("nan"),
            "routing_iou_per_subject": per_slot,
            "routing_iou_per_layer": {k: sum(v) / len(v) for k, v in by_layer.items() if v},
            "routing_iou_per_sigma": {str(sig): sum(by_sigma[k]) / len(by_sigma[k]) for k, sig in enumerate(self.config.eval_sigmas) if k in by_sigma},
            "null_accuracy": null_hits / null_total if null_total else float("nan"),
            "diffusion_loss": sum(diff) / len(diff) if diff else float("nan"),
            "num_eval_clips": len(self.eval_set),
            "eval_sigmas": list(self.config.eval_sigmas),
            "stage": self.config.stage,
        }
        if details:
            result["subjects"] = subjects
        return result
