"""Subject-sparse attention on Diffusers' parallelism, checked with 2 CPU processes (gloo) against one process.

One spawn of 2 ranks runs every scenario of ``tests/_parallel_worker.py`` (process start-up dominates the cost);
each rank compares its parallel result with the single-process result it computed first, and the tests below read
those comparisons. Context parallelism (Ulysses): every routing mode, an even and an uneven split, text routing,
routing maps whole on every rank, the pipeline; ring attention refused; tensor-parallel (sharded heads) routing.
"""

from __future__ import annotations

import json
import socket

import _parallel_worker
import pytest
import torch
import torch.multiprocessing as mp

WORLD = 2
TOL = 1e-5  # fp32: the single-process and the parallel run differ by summation order only


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    out = tmp_path_factory.mktemp("parallel")
    scenarios = list(_parallel_worker.SCENARIOS)
    mp.spawn(_parallel_worker.worker, args=(WORLD, _free_port(), str(out), scenarios), nprocs=WORLD, join=True)

    return {name: [json.loads((out / f"{name}-{r}.json").read_text()) for r in range(WORLD)] for name in scenarios}


def ranks(results, name):
    """Each rank's comparison for one scenario; a scenario that raised fails with its traceback."""
    for r, res in enumerate(results[name]):
        assert "exception" not in res, f"rank {r}, {name}:\n{res['exception']}"
    return results[name]


@pytest.mark.parametrize("mode", ["similarity", "router", "router_spatial", "masks", "dense"])
def test_ulysses_matches_one_process_in_every_routing_mode(results, mode):
    for rank, res in enumerate(ranks(results, "context_parallel")):
        r = res[mode]
        assert r["out_diff"] <= TOL * max(1.0, r["out_scale"]), (rank, r)
        assert r["buckets_equal"], (rank, r)  # the routing decisions, identical on every rank
        if mode == "dense":
            assert r["layers"] == []
        else:  # the spatial router routes layer 0 only; layer 1 reuses its buckets
            assert r["layers"] == ([0] if mode == "router_spatial" else [0, 1])
            assert len(r["bucket_values"]) > 1  # routing actually splits the tokens (not all null)
        if mode in ("similarity", "router", "router_spatial", "masks"):
            # recorded router logits (teacher-forced in masks mode) come back whole and equal
            assert r["logits_layers"] and r["logits_diff"] <= TOL, (rank, r)


def test_ulysses_uneven_split_with_ulysses_anything(results):
    # 27 tokens over 2 ranks (14 + 13): the reference frame straddles nothing, the video does.
    for res in ranks(results, "context_parallel"):
        r = res["uneven_similarity"]
        assert r["out_diff"] <= TOL * max(1.0, r["out_scale"]) and r["buckets_equal"], r


def test_processors_installed_after_parallelism_are_refused(results):
    for res in ranks(results, "context_parallel"):
        assert "install the subject-sparse processors first" in res["late_install_error"]


def test_ring_attention_with_subjects_raises_why(results):
    for res in ranks(results, "ring"):
        assert "ring attention" in res["error"] and "log-sum-exp" in res["error"]


def test_pipeline_after_enable_parallelism(results):
    per_rank = ranks(results, "pipeline")
    for res in per_rank:
        assert res["latent_diff"] <= 1e-4, res
        assert res["maps_equal"] and res["maps_shape"] == [1, 3, 2, 2]
        assert "ulysses_anything=True" in res["odd_error"] and "[9, 15]" in res["odd_error"]
    assert per_rank[0]["maps"] == per_rank[1]["maps"]


def test_tensor_parallel_heads_route_like_one_process(results):
    for res in ranks(results, "tensor_parallel"):
        assert res["local_heads_route_differently"]  # without the all-reduce the ranks would disagree
        assert res["buckets_equal"] and res["out_diff"] <= TOL * max(1.0, res["out_scale"]), res


# -- in-process checks (no second process needed) -------------------------------------------------------------------


def test_sizes_diffusers_would_refuse_are_named_before_any_work():
    from diffusers import ContextParallelConfig, ParallelConfig

    from diasr_diffusers import set_subject_sparse_attn_processor
    from diasr_diffusers.processors.parallel import check_context_parallel_inputs
    from diasr_diffusers.utils.tiny import tiny_wan_components

    transformer = tiny_wan_components(num_layers=1)["transformer"]  # 2 heads
    check_context_parallel_inputs(transformer, [15])  # no parallelism: nothing to refuse
    # What `enable_parallelism` records on the model (set by hand: no process group is needed for the checks).
    transformer._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2))
    check_context_parallel_inputs(transformer, [16, 20])
    with pytest.raises(ValueError, match=r"sequences of \[15\] tokens .* ulysses_anything=True"):
        check_context_parallel_inputs(transformer, [16, 15])
    with pytest.raises(RuntimeError, match="install the subject-sparse processors first"):
        set_subject_sparse_attn_processor(transformer)
    transformer._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=4))
    with pytest.raises(ValueError, match=r"attention heads \(2\) to divide by `ulysses_degree` \(4\)"):
        check_context_parallel_inputs(transformer, [16])
    uneven = ContextParallelConfig(ulysses_degree=4, ulysses_anything=True)
    transformer._parallel_config = ParallelConfig(context_parallel_config=uneven)
    check_context_parallel_inputs(transformer, [15])  # Diffusers' uneven mode takes any length
