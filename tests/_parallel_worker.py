"""Worker for tests/test_parallel.py: one CPU process (gloo rank) of a 2 or 4 rank run.

Each scenario computes the single-process answer first (in this very process, before any parallelism), then the
same call under Diffusers' parallelism, and writes the comparison (max differences, whether routing matched) to
``{out_dir}/{scenario}-{rank}.json`` for the test to check. Run by ``torch.multiprocessing.spawn``.
"""

from __future__ import annotations

import copy
import json
import os
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

TOKENS_PER_FRAME = 16  # 8x8 latent pixels, patch 2x2


def _setup(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    # Diffusers places rank r on accelerator `r % torch.accelerator.device_count()`, which is 0 on a CPU-only machine;
    # with 1 it places every rank on "cpu" and its Ulysses all-to-all runs on gloo.
    torch.accelerator.device_count = lambda: 1
    dist.init_process_group("gloo", rank=rank, world_size=world)
    _pad_diffusers_uneven_gather()


def _pad_diffusers_uneven_gather() -> None:
    """Diffusers' `ulysses_anything` output gather calls `dist.all_gather` with a different shape per rank, which NCCL
    accepts and gloo refuses ("invalid tensor size"). On gloo, pad to the longest share and trim (same result)."""
    import diffusers.hooks.context_parallel as cp

    def gather(tensor, dim, group):
        sizes = cp.gather_size_by_comm(tensor.shape[dim], group)
        pad = [0, 0] * (tensor.ndim - 1 - dim) + [0, max(sizes) - tensor.shape[dim]]
        parts = [torch.empty_like(torch.nn.functional.pad(tensor, pad)) for _ in sizes]
        dist.all_gather(parts, torch.nn.functional.pad(tensor, pad).contiguous(), group=group)
        return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim=dim)

    cp._all_gather_anything = gather


def _inputs(frames: int, height: int = 8, width: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, frames, height, width, generator=g)
    text = torch.randn(1, 12, 32, generator=g)
    return latents, torch.tensor([500.0]), text


def _run(transformer, state, inputs, **routing):
    with torch.no_grad(), state.activate(**routing, record=True):
        out = transformer(*inputs, return_dict=False)[0]
        return out, {k: v.clone() for k, v in state.buckets.items()}, {k: v.clone() for k, v in state.logits.items()}


def _compare(single, parallel) -> dict:
    (out_a, buckets_a, logits_a), (out_b, buckets_b, logits_b) = single, parallel
    return {
        "out_diff": float((out_a - out_b).abs().max()),
        "out_scale": float(out_a.abs().max()),
        "layers": sorted(buckets_b),
        "buckets_equal": sorted(buckets_a) == sorted(buckets_b)
        and all(torch.equal(buckets_a[k], buckets_b[k]) for k in buckets_a),
        "bucket_values": sorted({int(x) for v in buckets_b.values() for x in v.flatten()}),
        "logits_diff": max([float((logits_a[k] - logits_b[k]).abs().max()) for k in logits_a] or [0.0]),
        "logits_layers": sorted(logits_b),
    }


def _routing_cases(transformer, num_video_tokens: int, ref_lengths: list[int]):
    from diasr_diffusers import IDRouter
    from diasr_diffusers.processors import TextSegments

    torch.manual_seed(1)
    router = IDRouter.from_transformer(transformer, router_dim=16, num_identity_queries=4, num_heads=2)
    torch.manual_seed(2)
    spatial = IDRouter.from_transformer(
        transformer, router_dim=16, num_identity_queries=4, num_heads=2, routed_layers=[0], context_kernel=3
    )
    g = torch.Generator().manual_seed(3)
    masks = torch.randint(-1, len(ref_lengths), (1, num_video_tokens), generator=g)
    segments = [TextSegments(order=torch.randperm(12, generator=g), lengths=[2, 3][: len(ref_lengths)])]
    grid = (num_video_tokens // TOKENS_PER_FRAME, 4, 4)
    base = {"ref_lengths": ref_lengths, "video_grid": grid}
    return {
        "similarity": {**base, "mode": "similarity", "similarity_threshold": 0.05, "text_segments": segments},
        "router": {**base, "mode": "router", "router": router, "text_segments": segments},
        "router_spatial": {**base, "mode": "router", "router": spatial},
        "masks": {**base, "mode": "masks", "mask_buckets": masks, "router": router, "text_segments": segments},
        "dense": {**base, "mode": "dense"},
    }


def scenario_context_parallel(rank: int, world: int) -> dict:
    """Every routing mode under Ulysses: an even split (video 3 frames + 2 one-frame subjects = 80 tokens), and an
    uneven one (ulysses_anything: 2 video frames + 1 reference frame of 3x3 tokens = 27 tokens)."""
    from diffusers import ContextParallelConfig

    from diasr_diffusers import set_subject_sparse_attn_processor
    from diasr_diffusers.utils.tiny import tiny_wan_components

    results = {}
    transformer = tiny_wan_components(num_layers=2)["transformer"]
    uneven = copy.deepcopy(transformer)
    state = set_subject_sparse_attn_processor(transformer)
    inputs = _inputs(frames=5)  # 3 video frames + 2 reference frames
    cases = _routing_cases(transformer, 3 * TOKENS_PER_FRAME, [TOKENS_PER_FRAME, TOKENS_PER_FRAME])
    single = {name: _run(transformer, state, inputs, **routing) for name, routing in cases.items()}
    transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    for name, routing in cases.items():
        results[name] = _compare(single[name], _run(transformer, state, inputs, **routing))

    # Uneven split: 6x6 latent pixels -> 3x3 tokens per frame, 27 tokens over 2 ranks (14 + 13).
    state = set_subject_sparse_attn_processor(uneven)
    inputs = _inputs(frames=3, height=6, width=6)
    routing = {"ref_lengths": [9], "mode": "similarity", "similarity_threshold": 0.0}
    single = _run(uneven, state, inputs, **routing)
    uneven.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world, ulysses_anything=True))
    results["uneven_similarity"] = _compare(single, _run(uneven, state, inputs, **routing))

    # Installing processors after parallelism would leave them without Diffusers' config: refused.
    try:
        set_subject_sparse_attn_processor(uneven)
        results["late_install_error"] = None
    except RuntimeError as err:
        results["late_install_error"] = str(err)
    return results


def _train_step(transformer, state, inputs, **routing) -> dict[str, torch.Tensor]:
    """Parameter gradients of one loss on the output (router's included: straight-through routing), summed over the
    ranks under context parallelism (each rank's backward carries its own rows' share, as DDP would sum them)."""
    transformer.zero_grad(set_to_none=True)
    router = routing.get("router")
    if router is not None:
        router.zero_grad(set_to_none=True)
    with state.activate(**routing):
        out = transformer(*inputs, return_dict=False)[0]
    weight = torch.linspace(-1.0, 1.0, out.numel()).view_as(out)  # the same on every rank
    (out * weight).sum().backward()
    params = list(transformer.named_parameters()) + (list(router.named_parameters("router.")) if router else [])
    grads = {n: p.grad.clone() for n, p in params if p.grad is not None}
    if dist.is_initialized() and getattr(transformer, "_parallel_config", None) is not None:
        for g in grads.values():
            dist.all_reduce(g)
    return grads


def _compare_grads(single: dict, parallel: dict) -> dict:
    router = [n for n in single if n.startswith("router.")]
    return {
        "router_grad_diff": max(float((single[n] - parallel[n]).abs().max()) for n in router),
        "router_grad_scale": max(float(single[n].abs().max()) for n in router),
        "names_equal": sorted(single) == sorted(parallel),
        "num_grads": len(single),
        "router_grads": sum(n.startswith("router.") for n in single),
        "grad_diff": max(float((single[n] - parallel[n]).abs().max()) for n in single),
        "grad_scale": max(float(single[n].abs().max()) for n in single),
    }


def _ring_scenario(world: int, configs: dict, backends: tuple[str, ...]) -> dict:
    """Every routing mode under each `ContextParallelConfig` of `configs` (the layout of `scenario_context_parallel`:
    3 video frames + 2 one-frame subjects = 80 tokens), and one training step (forward + backward, straight-through
    router gradients) with each op backend of `backends` against one process."""
    from diffusers import ContextParallelConfig

    from diasr_diffusers import set_subject_sparse_attn_processor
    from diasr_diffusers.utils.tiny import tiny_wan_components

    base = tiny_wan_components(num_layers=2)["transformer"]
    copies = {name: copy.deepcopy(base) for name in configs}
    state = set_subject_sparse_attn_processor(base)
    inputs = _inputs(frames=5)
    cases = _routing_cases(base, 3 * TOKENS_PER_FRAME, [TOKENS_PER_FRAME, TOKENS_PER_FRAME])
    single = {name: _run(base, state, inputs, **routing) for name, routing in cases.items()}
    train = {**cases["router"], "router_gradient": "straight_through"}
    single_grads = {b: _train_step(base, state, inputs, **train, backend=b) for b in backends}
    results = {}
    for config_name, kwargs in configs.items():
        transformer = copies[config_name]
        state = set_subject_sparse_attn_processor(transformer)
        transformer.enable_parallelism(config=ContextParallelConfig(**kwargs))
        results[config_name] = {name: _compare(single[name], _run(transformer, state, inputs, **routing))
                                for name, routing in cases.items()}  # fmt: skip
        for backend, grads in single_grads.items():
            try:
                step = _train_step(transformer, state, inputs, **train, backend=backend)
                results[config_name][f"backward_{backend}"] = _compare_grads(grads, step)
            except NotImplementedError as err:  # ring_degree > 2: Diffusers' ring backward is refused
                results[config_name][f"backward_{backend}"] = {"error": str(err)}
    return results


def scenario_ring(rank: int, world: int) -> dict:
    """Ring attention with subjects (`ring_degree=world`): every routing mode, and the backward."""
    return _ring_scenario(world, {"ring": {"ring_degree": world}}, backends=("dense", "torch"))


def scenario_ring_hybrid(rank: int, world: int) -> dict:
    """4 ranks: ring 2 x Ulysses 2, and ring 4 (a subject's reference split over two ring chunks)."""
    configs = {"ring2_ulysses2": {"ring_degree": 2, "ulysses_degree": 2}, "ring4": {"ring_degree": 4}}
    return _ring_scenario(world, configs, backends=("dense",))


def scenario_pipeline(rank: int, world: int) -> dict:
    """DiasRPipeline after `pipe.transformer.enable_parallelism(...)`: same latents and routing maps as one process."""
    import numpy as np
    from diffusers import ContextParallelConfig

    from diasr_diffusers import DiasRPipeline
    from diasr_diffusers.utils.tiny import tiny_wan_components

    pipe = DiasRPipeline(**tiny_wan_components())
    rs = np.random.RandomState(0)
    call = dict(
        prompt="a man and a woman walk in the park", subject_images=[rs.rand(40, 20, 3), rs.rand(20, 30, 3)],
        subject_phrases=["a man", "a woman"], height=32, width=32, num_frames=9, num_inference_steps=2,
        guidance_scale=5.0, routing="similarity", return_routing_maps=True, output_type="latent",
    )  # fmt: skip
    single = pipe(**call, generator=torch.Generator().manual_seed(0))
    pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    parallel = pipe(**call, generator=torch.Generator().manual_seed(0))
    result = {
        "latent_diff": float((single.frames - parallel.frames).abs().max()),
        "maps_equal": torch.equal(single.routing_maps, parallel.routing_maps),
        "maps_shape": list(parallel.routing_maps.shape),
        "maps": parallel.routing_maps.flatten().tolist(),
    }
    try:  # 48 x 16 pixels: 3 x 1 tokens per frame, 9 video + 6 reference tokens = 15, odd
        pipe(**{**call, "height": 48, "width": 16}, generator=torch.Generator().manual_seed(0))
        result["odd_error"] = None
    except ValueError as err:
        result["odd_error"] = str(err)
    return result


class _AcrossHeadsRMSNorm(torch.nn.Module):
    """Wan's RMSNorm over all heads, for a rank holding some of them: the squared sum is all-reduced. (Wan has no
    Diffusers `_tp_plan`; its norm across heads is the piece a tensor-parallel Wan needs besides the Linears.)"""

    def __init__(self, norm: torch.nn.RMSNorm, group):
        super().__init__()
        self.norm, self.group = norm, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        square = x.float().pow(2).sum(-1, keepdim=True)
        dist.all_reduce(square, group=self.group)
        rms = torch.rsqrt(square / (x.shape[-1] * world) + self.norm.eps)
        weight = self.norm.weight.chunk(world)[rank]
        return (x.float() * rms).type_as(x) * weight


def scenario_tensor_parallel(rank: int, world: int) -> dict:
    """Self-attention heads sharded over the ranks with torch's tensor parallelism (DTensor, colwise q/k/v, rowwise
    out); similarity routing must match one process on every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from diasr_diffusers import set_subject_sparse_attn_processor
    from diasr_diffusers.processors.core import similarity_logits
    from diasr_diffusers.routing import buckets_from_logits
    from diasr_diffusers.utils.tiny import tiny_wan_components

    transformer = tiny_wan_components(num_layers=2, num_attention_heads=4, attention_head_dim=8)["transformer"]
    state = set_subject_sparse_attn_processor(transformer)
    inputs = _inputs(frames=4)
    routing = {"ref_lengths": [TOKENS_PER_FRAME, TOKENS_PER_FRAME], "mode": "similarity", "similarity_threshold": 0.0}
    single = _run(transformer, state, inputs, **routing)

    # What each rank would route from its own heads alone (no all-reduce): must differ, or this test proves nothing.
    attn = transformer.blocks[0].attn1
    captured = {}

    def capture(module, args, kwargs):
        captured.setdefault("h", args[0] if args else kwargs["hidden_states"])

    hook = attn.register_forward_pre_hook(capture, with_kwargs=True)
    _run(transformer, state, inputs, **routing)
    hook.remove()
    hidden = captured["h"]
    with torch.no_grad():
        q = attn.norm_q(attn.to_q(hidden)).unflatten(2, (4, -1))
        k = attn.norm_k(attn.to_k(hidden)).unflatten(2, (4, -1))
    lv = hidden.shape[1] - 2 * TOKENS_PER_FRAME
    heads = slice(rank * 4 // world, (rank + 1) * 4 // world)
    local_only = buckets_from_logits(
        similarity_logits(q[:, :lv, heads], k[:, lv:, heads], routing["ref_lengths"], 0.0)
    )

    mesh = init_device_mesh("cpu", (world,))
    plan = {"to_q": ColwiseParallel(), "to_k": ColwiseParallel(), "to_v": ColwiseParallel(), "to_out.0": RowwiseParallel()}  # fmt: skip
    for block in transformer.blocks:
        parallelize_module(block.attn1, mesh, plan)
        block.attn1.norm_q = _AcrossHeadsRMSNorm(block.attn1.norm_q, mesh.get_group())
        block.attn1.norm_k = _AcrossHeadsRMSNorm(block.attn1.norm_k, mesh.get_group())
    result = _compare(single, _run(transformer, state, inputs, **routing))
    result["local_heads_route_differently"] = not torch.equal(local_only, single[1][0])
    return result


SCENARIOS = {
    "context_parallel": scenario_context_parallel,
    "ring": scenario_ring,
    "pipeline": scenario_pipeline,
    "tensor_parallel": scenario_tensor_parallel,
}
# Run by a separate spawn of 4 ranks.
SCENARIOS_4 = {"ring_hybrid": scenario_ring_hybrid}


def worker(rank: int, world: int, port: int, out_dir: str, scenarios: list[str]) -> None:
    _setup(rank, world, port)
    try:
        for name in scenarios:
            start = time.perf_counter()
            try:
                result = {**SCENARIOS, **SCENARIOS_4}[name](rank, world)
            except Exception:  # reported to the test instead of a bare non-zero exit
                result = {"exception": traceback.format_exc()}
            result["seconds"] = time.perf_counter() - start  # each scenario's share of the spawn (not asserted)
            Path(out_dir, f"{name}-{rank}.json").write_text(json.dumps(result))
            dist.barrier()
    finally:
        dist.destroy_process_group()
