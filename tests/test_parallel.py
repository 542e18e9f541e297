"""Subject-sparse attention on Diffusers' parallelism, checked with 2 CPU processes (gloo) against one process.

One spawn of 2 ranks runs every scenario of ``tests/_parallel_worker.py`` (process start-up dominates the cost);
each rank compares its parallel result with the single-process result it computed first, and the tests below read
those comparisons. Context parallelism (Ulysses): every routing mode, an even and an uneven split, text routing,
routing maps whole on every rank, the pipeline; ring attention (ring 2; and on a second spawn of 4 ranks ring 2 x
Ulysses 2 and ring 4), forward and backward; tensor-parallel (sharded heads) routing.
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


def _spawn(out, world: int, scenarios: list[str]) -> dict:
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    mp.spawn(_parallel_worker.worker, args=(world, _free_port(), str(out), scenarios), nprocs=world, join=True)
    return {name: [json.loads((out / f"{name}-{r}.json").read_text()) for r in range(world)] for name in scenarios}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return _spawn(tmp_path_factory.mktemp("parallel"), WORLD, list(_parallel_worker.SCENARIOS))


@pytest.fixture(scope="module")
def results4(tmp_path_factory):
    """4 ranks: ring 2 x Ulysses 2 and ring 4."""
    return _spawn(tmp_path_factory.mktemp("parallel4"), 4, list(_parallel_worker.SCENARIOS_4))


def ranks(results, name):
    """Each rank's comparison for one scenario; a scenario that raised fails with its traceback."""
    for r, res in enumerate(results[name]):
        assert "exception" not in res, f"rank {r}, {name}:\n{res['exception']}"
    return results[name]


MODES = ["similarity", "router", "router_spatial", "masks", "dense"]  # similarity, router and masks route the text too


def _assert_matches_one_process(r: dict, mode: str) -> None:
    assert r["out_diff"] <= TOL * max(1.0, r["out_scale"]), r
    assert r["buckets_equal"], r  # the routing decisions, identical on every rank
    if mode == "dense":
        assert r["layers"] == []
    else:  # the spatial router routes layer 0 only; layer 1 reuses its buckets
        assert r["layers"] == ([0] if mode == "router_spatial" else [0, 1])
        assert len(r["bucket_values"]) > 1  # routing actually splits the tokens (not all null)
    if mode in ("similarity", "router", "router_spatial", "masks"):
        # recorded router logits (teacher-forced in masks mode) come back whole and equal
        assert r["logits_layers"] and r["logits_diff"] <= TOL, r


@pytest.mark.parametrize("mode", MODES)
def test_ulysses_matches_one_process_in_every_routing_mode(results, mode):
    for res in ranks(results, "context_parallel"):
        _assert_matches_one_process(res[mode], mode)


def test_ulysses_uneven_split_with_ulysses_anything(results):
    # 27 tokens over 2 ranks (14 + 13): the reference frame straddles nothing, the video does.
    for res in ranks(results, "context_parallel"):
        r = res["uneven_similarity"]
        assert r["out_diff"] <= TOL * max(1.0, r["out_scale"]) and r["buckets_equal"], r


def test_processors_installed_after_parallelism_are_refused(results):
    for res in ranks(results, "context_parallel"):
        assert "install the subject-sparse processors first" in res["late_install_error"]


@pytest.mark.parametrize("mode", MODES)
def test_ring_matches_one_process_in_every_routing_mode(results, mode):
    for res in ranks(results, "ring"):  # ContextParallelConfig(ring_degree=2)
        _assert_matches_one_process(res["ring"][mode], mode)


@pytest.mark.parametrize("layout", ["ring2_ulysses2", "ring4"])
@pytest.mark.parametrize("mode", MODES)
def test_ring_on_4_ranks_matches_one_process_in_every_routing_mode(results4, layout, mode):
    # ring 2 x Ulysses 2: Diffusers' all-to-all around its ring; ring 4: a subject's reference split over two chunks
    for res in ranks(results4, "ring_hybrid"):
        _assert_matches_one_process(res[layout][mode], mode)


def _assert_same_gradients(r: dict) -> None:
    assert r["names_equal"] and r["num_grads"] > 0 and r["router_grads"] > 0, r
    assert r["grad_diff"] <= TOL * max(1.0, r["grad_scale"]), r
    # the router learns only through the straight-through segment bias, which Diffusers' ring does not return
    assert r["router_grad_scale"] > 0 and r["router_grad_diff"] <= TOL * max(1.0, r["router_grad_scale"]), r


@pytest.mark.parametrize("backend", ["dense", "torch"])
def test_ring_backward_matches_one_process(results, backend):
    for res in ranks(results, "ring"):
        _assert_same_gradients(res["ring"][f"backward_{backend}"])


def test_ring_on_4_ranks_backward_matches_one_process(results4):
    for res in ranks(results4, "ring_hybrid"):
        _assert_same_gradients(res["ring2_ulysses2"]["backward_dense"])
        # Diffusers' ring backward rotates key/value gradients the wrong way beyond 2 ring ranks: refused, not wrong
        assert "ring_degree=4" in res["ring4"]["backward_dense"]["error"], res["ring4"]["backward_dense"]


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


@pytest.mark.parametrize("family", ["wan", "ltx", "cogvideox"])
def test_every_family_refuses_late_install_and_only_wan_routes_under_context_parallelism(family):
    from diffusers import ContextParallelConfig, ParallelConfig

    from diasr_diffusers import processors
    from diasr_diffusers.utils import tiny

    build, install = {
        "wan": (tiny.tiny_wan_components, processors.set_subject_sparse_attn_processor),
        "ltx": (tiny.tiny_ltx_components, processors.set_ltx_subject_sparse_attn_processor),
        "cogvideox": (tiny.tiny_cogvideox_components, processors.set_cogvideox_subject_sparse_attn_processor),
    }[family]
    transformer = build(num_layers=1)["transformer"]
    state = install(transformer)
    processor = next(iter(transformer.attn_processors.values()))
    # What `enable_parallelism` hands the processors and records on the model (set by hand: no process group).
    cp = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2))
    processor._parallel_config = cp
    assert processor.routes() is None  # no subjects: the stock code path, which Diffusers parallelises
    with state.activate(ref_lengths=[4], mode="similarity"):
        if family == "wan":  # Ulysses routed attention (processors/parallel.py)
            assert processor.routes() is state
        else:
            with pytest.raises(NotImplementedError, match="does not support context parallelism"):
                processor.routes()
    transformer._parallel_config = cp
    with pytest.raises(RuntimeError, match="install the subject-sparse processors first"):
        install(transformer)


class _Ctx:
    """Stands in for the autograd ctx Diffusers' ring hands the ops."""

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def _ring_by_hand(chunks, q, k, v, buckets, bias, lengths, ref_attends_video, backend, grad_out):
    """Diffusers' ring loop, in one process: each ring rank's queries against every chunk of keys in ring order,
    merged by log-sum-exp; then its backward, the step gradients summed where Diffusers' ring sums them."""
    from diasr_diffusers.ops import merge_attention_partials
    from diasr_diffusers.processors.parallel import RoutedRingChunks

    lv = q.shape[1] - sum(lengths or [])
    outs, grads = [], [torch.zeros_like(t) for t in (q, k, v)]
    bias_grad = torch.zeros_like(bias)
    for rank, (q0, q1) in enumerate(chunks):
        ops = RoutedRingChunks(lengths, ref_attends_video, buckets, bias, chunks, rank, lv, backend)
        out = lse = None
        for step in range(len(chunks)):
            k0, k1 = chunks[(rank + step) % len(chunks)]
            o, o_lse = ops.forward_op(_Ctx(), q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], _save_ctx=step == 0)
            out, lse = (o, o_lse) if out is None else merge_attention_partials(out, lse, o, o_lse)
        outs.append(out)
        for step in range(len(chunks)):
            k0, k1 = chunks[(rank + step) % len(chunks)]
            dq, dk, dv = ops.backward_op(_Ctx(), grad_out[:, q0:q1], query=q[:, q0:q1], key=k[:, k0:k1],
                                         value=v[:, k0:k1], out=out, lse=lse)  # fmt: skip
            grads[0][:, q0:q1] += dq
            grads[1][:, k0:k1] += dk
            grads[2][:, k0:k1] += dv
        if ops.bias_grad is not None:
            bias_grad += ops.bias_grad
    return torch.cat(outs, dim=1), grads, bias_grad


@pytest.mark.parametrize("ref_attends_video", [False, True])
@pytest.mark.parametrize("backend", ["torch", "dense"])
@pytest.mark.parametrize(
    "chunks",
    [
        [(0, 17), (17, 30)],  # uneven; the video (20 tokens) and subject 0 straddle the border
        [(0, 8), (8, 16), (16, 24), (24, 30)],  # ring 4: a chunk of video only, one of two subjects' parts
        [(0, 20), (20, 23), (23, 30)],  # a chunk holding references only, split inside subject 1
    ],
)
def test_ring_steps_merge_to_routed_attention_forward_and_backward(chunks, backend, ref_attends_video):
    """The per-step ops Diffusers' ring calls (`RoutedRingChunks`), run over every chunk in ring order and merged,
    equal routed self-attention over the whole sequence, in output and in q/k/v/segment-bias gradients."""
    from diasr_diffusers.processors.core import SubjectRoutingState, routed_self_attention

    torch.manual_seed(0)
    lengths, lv = [3, 5, 2], 20  # 30 tokens: [video 20 | 3 | 5 | 2]
    q, k, v = (torch.randn(2, 30, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    buckets = torch.randint(-1, 3, (2, lv))
    bias = torch.randn(2, lv, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, 30, 2, 8, dtype=torch.float64)
    state = SubjectRoutingState(ref_lengths=lengths, ref_attends_video=ref_attends_video, backend="dense")
    expected = routed_self_attention(q, k, v, state, buckets, bias)
    expected_grads = torch.autograd.grad(expected, [q, k, v, bias], grad_out)

    with torch.no_grad():
        out, grads, bias_grad = _ring_by_hand(chunks, q.detach(), k.detach(), v.detach(), buckets, bias, lengths,
                                              ref_attends_video, backend, grad_out)  # fmt: skip
    torch.testing.assert_close(out, expected.detach(), rtol=1e-10, atol=1e-10)
    for got, want in zip([*grads, bias_grad], expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert bias_grad.abs().max() > 0  # the router's straight-through gradient is carried


@pytest.mark.parametrize("backend", ["torch", "dense"])
def test_ring_steps_without_subjects_are_plain_attention(backend):
    """`context_parallel_attention`'s steps (unrouted self-attention under ring): merged, plain softmax attention."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 12, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(1, 12, 2, 8, dtype=torch.float64)
    expected = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    expected_grads = torch.autograd.grad(expected, [q, k, v], grad_out)
    chunks = [(0, 5), (5, 12)]
    with torch.no_grad():
        # `ref_lengths=None`: the plain layout; a zero bias stands in for "no router" in the by-hand ring
        out, grads, _ = _ring_by_hand(chunks, q.detach(), k.detach(), v.detach(), None, torch.zeros(1, 0), None,
                                      False, backend, grad_out)  # fmt: skip
    torch.testing.assert_close(out, expected.detach(), rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_ring_refuses_backends_without_log_sum_exp_before_any_work():
    from diffusers import ContextParallelConfig

    from diasr_diffusers.processors.core import SubjectRoutingState
    from diasr_diffusers.processors.parallel import _check_config, needs_own_ring

    config = ContextParallelConfig(ring_degree=2)
    state = SubjectRoutingState(ref_lengths=[4], backend="xformers")
    with pytest.raises(NotImplementedError, match=r"return_lse=True.*got backend 'xformers'"):
        _check_config(config, 2, state, torch.randn(1, 8, 2, 4))
    _check_config(config, 2, SubjectRoutingState(ref_lengths=[4]), torch.randn(1, 8, 2, 4))  # auto: torch on CPU
    # Diffusers' default backend (SDPA) cannot ring; its ring-capable ones are left to Diffusers.
    assert needs_own_ring(None, config) and needs_own_ring("native", config)
    assert not needs_own_ring("flash", config) and not needs_own_ring(None, ContextParallelConfig(ulysses_degree=2))
