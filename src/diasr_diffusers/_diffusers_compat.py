"""The private names of Diffusers (and torch) diasr-diffusers relies on, in one place.

Code that runs inside a compiled forward resolves its name once at import (``_f = private("...")``): the lookup goes
through ``importlib``, which ``torch.compile`` does not trace.

Diffusers does not promise these across releases: a Diffusers upgrade that renames or moves one breaks here, in this
module, and nowhere else. Everything is imported lazily (inside the functions), so importing this module is free and
a missing name fails only the feature that needs it, with a message naming the Diffusers version.

Tested against Diffusers 0.36-0.42 (``tests/test_imports.py`` checks every name resolves).
"""

from __future__ import annotations

import importlib
from typing import Any

# (module, attribute) of each private name used, for the import test and for the message below.
PRIVATE_NAMES = {
    "get_qkv_projections": ("diffusers.models.transformers.transformer_wan", "_get_qkv_projections"),
    "SeqAllToAllDim": ("diffusers.models.attention_dispatch", "SeqAllToAllDim"),
    "all_to_all_single_any_qkv_async": ("diffusers.models.attention_dispatch", "all_to_all_single_any_qkv_async"),
    "all_to_all_single_any_o_async": ("diffusers.models.attention_dispatch", "all_to_all_single_any_o_async"),
    "gather_size_by_comm": ("diffusers.models._modeling_parallel", "gather_size_by_comm"),
    "templated_context_parallel_attention": (
        "diffusers.models.attention_dispatch",
        "_templated_context_parallel_attention",
    ),
    "add_variant": ("diffusers.utils.hub_utils", "_add_variant"),
    "get_model_file": ("diffusers.utils.hub_utils", "_get_model_file"),
    "functional_collectives": ("torch.distributed", "_functional_collectives"),
}


def private(name: str) -> Any:
    """The object behind one entry of :data:`PRIVATE_NAMES`; an ``ImportError`` naming the installed Diffusers
    version when it is gone."""
    module, attribute = PRIVATE_NAMES[name]
    try:
        if attribute.startswith("_") and module == "torch.distributed":
            return importlib.import_module(f"{module}.{attribute}")
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as err:
        import diffusers

        raise ImportError(
            f"diasr-diffusers needs {module}.{attribute}, which this Diffusers ({diffusers.__version__}) does not "
            f"have: install a Diffusers version diasr-diffusers supports (see pyproject.toml) ({err})"
        ) from None


# -- hub files -----------------------------------------------------------------------------------------------------


def add_variant(weights_name: str, variant: str | None) -> str:
    """``diffusion_pytorch_model.safetensors`` -> ``diffusion_pytorch_model.<variant>.safetensors``."""
    return private("add_variant")(weights_name, variant)


def get_model_file(*args: Any, **kwargs: Any) -> str:
    """Diffusers' resolution of one weights file in a local folder or Hub repo (``ModelMixin.from_pretrained``'s)."""
    return private("get_model_file")(*args, **kwargs)


# -- context parallelism (mesh internals) ----------------------------------------------------------------------------


def parallel_config_of(obj: Any) -> Any | None:
    """The ``ParallelConfig`` ``enable_parallelism`` recorded on a transformer or handed to a processor, or ``None``."""
    return getattr(obj, "_parallel_config", None)


def context_parallel_config(parallel_config: Any) -> Any | None:
    """The ``ContextParallelConfig`` inside a ``ParallelConfig`` (``None``: no context parallelism)."""
    return getattr(parallel_config, "context_parallel_config", None) if parallel_config is not None else None


def flattened_group(config: Any) -> Any:
    """The process group over all context-parallel ranks of a ``ContextParallelConfig``."""
    return config._flattened_mesh.get_group()


def ulysses_group(config: Any) -> Any:
    """The process group of a ``ContextParallelConfig``'s Ulysses all-to-all."""
    return config._ulysses_mesh.get_group()


def gather_size_by_comm(size: int, group: Any) -> list[int]:
    """Every rank's ``size`` (Diffusers' uneven "anything" split)."""
    return private("gather_size_by_comm")(size, group)


def seq_to_heads(x: Any, group: Any, anything: bool) -> Any:
    """Diffusers' Ulysses all-to-all ``(B, l, H, D)`` -> ``(B, L, H / P, D)``."""
    if anything:
        return private("all_to_all_single_any_qkv_async")(x, group)()
    return private("SeqAllToAllDim").apply(group, x, 2, 1)


def heads_to_seq(x: Any, group: Any, anything: bool, num_heads: int, local_length: int) -> Any:
    """The inverse of :func:`seq_to_heads`."""
    if anything:
        return private("all_to_all_single_any_o_async")(x, group, NUM_QO_HEAD=num_heads, Q_S_LOCAL=local_length)()
    return private("SeqAllToAllDim").apply(group, x, 1, 2)


def templated_ring_attention(query: Any, key: Any, value: Any, forward_op: Any, backward_op: Any, config: Any) -> Any:
    """Diffusers' templated context-parallel attention (``TemplatedRingAttention``; ring x Ulysses: its Ulysses
    all-to-all around it; ``ring_anything``: ``TemplatedRingAnythingAttention``) over ``(B, l, H, D)`` rows, with the
    per-chunk ``forward_op(ctx, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse, _save_ctx=,
    _parallel_config=) -> (out, lse)`` and ``backward_op(ctx, grad_out, query=, key=, value=, out=, lse=)`` of an
    attention backend. Those functions read nothing but ``.context_parallel_config`` of the ``ParallelConfig``."""
    from types import SimpleNamespace

    fn = private("templated_context_parallel_attention")
    parallel = SimpleNamespace(context_parallel_config=config)
    return fn(query, key, value, forward_op=forward_op, backward_op=backward_op, _parallel_config=parallel)


def ring_rank(config: Any) -> int:
    """This rank's index in the ring of a ``ContextParallelConfig`` (the order of its key/value chunks)."""
    return config._ring_local_rank


def functional_collectives() -> Any:
    """``torch.distributed._functional_collectives`` (traceable, differentiable collectives)."""
    return private("functional_collectives")


# -- guiders -------------------------------------------------------------------------------------------------------


def guider_identifier_key(guider: Any) -> str:
    """The batch field naming a guider's condition (``"pred_cond"`` / ``"pred_uncond"``)."""
    return guider._identifier_key
