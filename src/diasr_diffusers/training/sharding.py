"""FSDP for ``diasr train``: torch's FSDP2 (``fully_shard``) applied by the trainer, for CPU (gloo) and GPU alike.

``accelerate launch --use_fsdp --fsdp_version 2`` asks for it. Accelerate 1.15 cannot shard on a machine without GPUs
(``AcceleratorState`` turns FSDP on only for GPU-like distributed types, ``accelerate/state.py`` ``_prepare_backend``
and ``__init__``; with ``cpu=True`` it becomes ``MULTI_CPU``, i.e. DDP over gloo), so the trainer shards the model
itself with the same torch engine accelerate's FSDP2 path uses: one FSDP unit per transformer block
(``_no_split_modules``, as accelerate's ``TRANSFORMER_BASED_WRAP``) and the rest (embeddings, router) in the root
unit. Accelerate still provides the process group, the device, autocast and gradient clipping.

Checkpoints stay world-size independent and in the unsharded layout: every rank takes part in gathering the full
weights and optimizer state onto the main process's CPU (``torch.distributed.checkpoint.state_dict``), which writes
them as an unsharded run would; a resume loads the weights before sharding and scatters the optimizer state back.

Example:
    ```bash
    accelerate launch --use_fsdp --fsdp_version 2 --num_processes 8 -m diasr_diffusers.cli train \
        --config cfg.yaml --output-dir runs/x
    ```
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)


def fsdp_requested() -> bool:
    """Whether the launcher asked for FSDP (``accelerate launch --use_fsdp`` or an accelerate config with FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def check_fsdp_launch(num_experts: int = 1) -> None:
    """Refuse, by name, the FSDP launches this trainer cannot run exactly (called before any model loads, and again
    with the number of experts once the pipeline is built)."""
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise NotImplementedError(
            f"`diasr train` shards with FSDP2 (torch `fully_shard`): launch with `--use_fsdp --fsdp_version 2` "
            f"(got fsdp_version {version}); see docs/distributed.md"
        )
    if os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true":
        raise NotImplementedError(  # accelerate would apply it to a model it did not shard
            "`fsdp_activation_checkpointing` is not supported by `diasr train` (it shards the model itself); "
            "launch without it"
        )
    if num_experts > 1:
        # Each sample runs the expert of its timestep, so two ranks would run different FSDP units and wait forever
        # in each other's all-gathers.
        raise NotImplementedError(
            "FSDP with two experts (Wan2.2 A14B) is not supported: ranks run different experts per sample, which "
            "FSDP's collectives cannot follow. Use DDP (`accelerate launch --multi_gpu ...`)"
        )


def shard(model: nn.Module, accelerator: Any, block_owners: list[nn.Module]) -> nn.Module:
    """Shard ``model`` in place with ``fully_shard`` over all processes: each block named by an owner's
    ``_no_split_modules`` is its own unit, the rest of ``model`` the root unit. Build the optimizer afterwards (the
    parameters become ``DTensor`` shards)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    plugin = FullyShardedDataParallelPlugin()  # the launcher's settings (FSDP_* environment variables)
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    kwargs: dict[str, Any] = {"mesh": mesh, "offload_policy": plugin.cpu_offload}  # FSDP_OFFLOAD_PARAMS
    if isinstance(plugin.reshard_after_forward, bool):  # FSDP_RESHARD_AFTER_FORWARD
        kwargs["reshard_after_forward"] = plugin.reshard_after_forward
    units = 0
    for owner in block_owners:
        names = set(getattr(owner, "_no_split_modules", None) or ())
        for module in owner.modules():
            if type(module).__name__ in names:
                fully_shard(module, **kwargs)
                units += 1
    fully_shard(model, **{k: v for k, v in kwargs.items() if k != "reshard_after_forward"})
    local = sum(p.to_local().numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    logger.info(
        f"FSDP2: {units} blocks + root over {accelerator.num_processes} processes; this one holds {local} of {total} weights"
    )
    return model


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict on the main process's CPU; ``{}`` on the others. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The whole optimizer state on the main process's CPU (``{}`` elsewhere), in ``optimizer.state_dict()``'s layout
    (parameters numbered in ``param_groups`` order), so that it reads the same as an unsharded run's. Every rank
    must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    sd = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not sd:
        return {}
    ids: dict[str, int] = {}
    groups = []
    for group in sd["param_groups"]:
        numbered = [ids.setdefault(fqn, len(ids)) for fqn in group["params"]]
        groups.append({**group, "params": numbered})
    return {"state": {ids[fqn]: st for fqn, st in sd["state"].items()}, "param_groups": groups}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a state of :func:`full_optimizer_state`'s (or an unsharded run's) layout into the sharded optimizer;
    every rank passes the whole state and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {p: fqn for fqn, p in model.named_parameters()}
    fqns = [names[p] for group in optimizer.param_groups for p in group["params"]]
    if len(fqns) != sum(len(g["params"]) for g in state["param_groups"]):
        raise ValueError(
            f"the checkpoint's optimizer holds {sum(len(g['params']) for g in state['param_groups'])} parameters, "
            f"this run trains {len(fqns)}"
        )
    fqn_state = {fqns[int(i)]: st for i, st in state["state"].items()}
    groups = [{**g, "params": [fqns[int(i)] for i in g["params"]]} for g in state["param_groups"]]
    set_optimizer_state_dict(
        model, optimizer, {"state": fqn_state, "param_groups": groups}, options=StateDictOptions(full_state_dict=True)
    )


def unsharded_copy(module: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """A plain copy of a sharded Diffusers model (built from its config, with its LoRA adapters) holding
    ``state_dict``'s tensors without copying them, for ``save_pretrained`` and the LoRA savers."""
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on the meta device: `assign=True` below takes the gathered tensors
        copy = type(module).from_config(module.config)
        for name, config in (getattr(module, "peft_config", None) or {}).items():
            copy.add_adapter(config, adapter_name=name)
    copy.load_state_dict(state_dict, strict=True, assign=True)
    return copy.eval().requires_grad_(False)
