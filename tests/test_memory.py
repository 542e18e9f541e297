"""Diffusers' memory and speed features with subjects active and routing on: offloading (model, sequential, group),
FP8 layerwise casting, a GGUF-quantized transformer, attention backends and ``torch.compile``.

Everything Diffusers allows on a CPU runs here on the tiny in-process Wan; the accelerator-only variants are marked
``gpu``. Offloading must not change a single value; lossy storage (FP8, GGUF) must cost the routed run no more than
it costs stock Wan on the same weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import GGUFQuantizationConfig, WanTransformer3DModel
from diffusers.hooks.group_offloading import _is_group_offload_enabled
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

import diasr_diffusers.processors.wan as wan_processors
from diasr_diffusers import DiasRPipeline, IDRouter, SubjectSparseAttnProcessor, set_subject_sparse_attn_processor
from diasr_diffusers.processors import TextSegments
from diasr_diffusers.utils.tiny import tiny_wan_components

PROMPT = "a man and a woman walk in the park"
PHRASES = ["a man", "a woman"]
# Head dim 16 (width 32): every Linear's rows are a multiple of GGUF's 32-value block, so Q8_0 applies to them.
HEAD_DIM = 16
SIZE, FRAMES = 32, 9


def subject_images():
    rs = np.random.RandomState(0)
    return [rs.rand(40, 20, 3).astype(np.float32), rs.rand(20, 30, 3).astype(np.float32)]


def side_masks():
    m = torch.zeros(2, SIZE, SIZE)
    m[0, :, : SIZE // 2] = 1
    m[1, :, SIZE // 2 :] = 1
    return m


def make_pipe(transformer: WanTransformer3DModel | None = None) -> DiasRPipeline:
    comps = tiny_wan_components(attention_head_dim=HEAD_DIM)
    if transformer is not None:
        comps["transformer"] = transformer
    torch.manual_seed(0)
    router = IDRouter.from_transformer(comps["transformer"], router_dim=16, num_identity_queries=4, num_heads=2)
    return DiasRPipeline(**comps, id_router=router)


def run(pipe: DiasRPipeline, routing: str = "router", subjects: bool = True):
    """One step of three-way guidance: the routed conditional branch (text routed too), the routed reference
    branch (text not routed) and the stock negative branch all run."""
    args = dict(prompt=PROMPT, height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=1, output_type="latent")
    if subjects:
        args.update(subject_images=subject_images(), subject_phrases=PHRASES, routing=routing, guidance_scale_ref=3.0)
        args.update(return_routing_maps=True, subject_masks=side_masks() if routing == "masks" else None)
    return pipe(**args, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def plain():
    """Reference outputs without any memory feature, keyed by routing mode (``None``: no subjects)."""
    cache = {}

    def get(routing):
        if routing not in cache:
            cache[routing] = run(make_pipe(), routing or "router", subjects=routing is not None)
        return cache[routing]

    return get


def assert_same_run(out, ref):
    assert torch.equal(out.frames, ref.frames)
    assert torch.equal(out.routing_maps, ref.routing_maps)


def max_err(a, b) -> float:
    return (a.frames - b.frames).abs().max().item()


# --------------------------------------------------------------------------------------------------------------------
# Offloading: not a single value may change, and the router stays on the execution device


@pytest.mark.parametrize(
    ("offload_type", "routing"), [("leaf_level", "router"), ("block_level", "router"), ("block_level", "masks")]
)
def test_group_offload_keeps_router_on_execution_device(plain, offload_type, routing):
    pipe = make_pipe()
    pipe.enable_group_offload(onload_device=torch.device("cpu"), offload_type=offload_type, num_blocks_per_group=1)
    assert _is_group_offload_enabled(pipe.transformer)
    # The router's anchors are computed outside its forward, where group-offload hooks never fire: it must not be
    # offloaded (on a GPU its weights would sit on the CPU).
    assert not _is_group_offload_enabled(pipe.id_router)
    assert_same_run(run(pipe, routing), plain(routing))


def test_model_cpu_offload(plain):
    pipe = make_pipe()
    # On a CPU-only torch, Diffusers only allows it with an explicit device: the hooks still move and call each model.
    pipe.enable_model_cpu_offload(device="cpu")
    assert hasattr(pipe.transformer, "_hf_hook") and not hasattr(pipe.id_router, "_hf_hook")
    assert_same_run(run(pipe), plain("router"))


def test_sequential_cpu_offload_onloads_weights_for_routed_layers(plain):
    from accelerate import cpu_offload

    pipe = make_pipe()
    # `enable_sequential_cpu_offload(device="cpu")` runs on "cpu:0", where accelerate (1.15) fails to put weights
    # back on "meta" (TypeError in set_module_tensor_to_device) for any model. Apply exactly what it applies, on
    # "cpu"; the gpu test below calls the pipeline method itself.
    for name in ("text_encoder", "transformer", "vae"):
        model = getattr(pipe, name)
        cpu_offload(model, torch.device("cpu"), offload_buffers=len(model._parameters) > 0)
    # Weights live on "meta" until a hook moves them: a routed layer or the reference encoding reading a weight
    # outside a hook, or sending inputs to the weights' device, would fail. The router is never offloaded.
    assert pipe.transformer.blocks[0].attn1.to_q.weight.device.type == "meta"
    assert next(pipe.vae.parameters()).device.type == "meta"
    assert all(p.device.type == "cpu" for p in pipe.id_router.parameters())
    assert_same_run(run(pipe), plain("router"))


# --------------------------------------------------------------------------------------------------------------------
# Lossy weight storage: FP8 layerwise casting and GGUF


def test_layerwise_casting_fp8(plain):
    stock, routed = make_pipe(), make_pipe()
    for pipe in (stock, routed):
        pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert routed.transformer.blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    assert routed.transformer.dtype == torch.float32  # what the pipeline casts latents and embeddings to
    stock_err = max_err(run(stock, subjects=False), plain(None))
    out = run(routed)
    assert torch.isfinite(out.frames).all()
    assert 0 < max_err(out, plain("router")) <= 2 * stock_err


_TO_ORIGINAL_WAN = (
    # Diffusers name -> original Wan name; the inverse of diffusers' `convert_wan_transformer_to_diffusers` (T2V).
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1", "self_attn"),
    ("attn2", "cross_attn"),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    (".norm2.", ".norm3."),  # the affine cross-attention norm is norm3 in Wan, norm2 in Diffusers
    (".scale_shift_table", ".modulation"),
    ("proj_out", "head.head"),
)


def to_original_wan_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        if key == "scale_shift_table":
            key = "head.modulation"
        for new, old in _TO_ORIGINAL_WAN:
            key = key.replace(new, old)
        out[key] = value
    return out


def write_tiny_wan_gguf(path, transformer: WanTransformer3DModel) -> int:
    """Write ``transformer`` as a Wan GGUF file like the public ones: original Wan key names, 2D weights in Q8_0,
    the 5D patch embedding in F16, biases, norms and modulations in F32. Returns how many tensors are Q8_0."""
    import gguf

    original = to_original_wan_keys(transformer.state_dict())
    # The file must be in the format Diffusers converts from: converting it back gives the model's own names.
    assert convert_wan_transformer_to_diffusers(dict(original)).keys() == transformer.state_dict().keys()
    writer = gguf.GGUFWriter(str(path), "wan")
    quantized = 0
    for name, tensor in original.items():
        array = tensor.float().numpy()
        if array.ndim == 2 and array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
            q8 = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            quantized += 1
        else:
            writer.add_tensor(name, array.astype(np.float16 if array.ndim > 2 else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return quantized


def load_gguf_transformer(tmp_path, compute_dtype=torch.float32) -> WanTransformer3DModel:
    from diffusers.quantizers.gguf.utils import GGUFParameter

    source = make_pipe().transformer
    assert write_tiny_wan_gguf(tmp_path / "wan-tiny-Q8_0.gguf", source) > 0
    source.save_config(tmp_path / "config")  # a local config: from_single_file fetches nothing
    transformer = WanTransformer3DModel.from_single_file(
        str(tmp_path / "wan-tiny-Q8_0.gguf"),
        quantization_config=GGUFQuantizationConfig(compute_dtype=compute_dtype),
        config=str(tmp_path / "config"),
    )
    assert isinstance(transformer.blocks[0].attn1.to_q.weight, GGUFParameter)
    return transformer


def test_gguf_transformer(plain, tmp_path):
    transformer = load_gguf_transformer(tmp_path)
    stock_err = max_err(run(make_pipe(transformer), subjects=False), plain(None))
    out = run(make_pipe(transformer))
    assert torch.isfinite(out.frames).all()
    assert 0 < max_err(out, plain("router")) <= 2 * stock_err


# --------------------------------------------------------------------------------------------------------------------
# Attention backends and torch.compile


def test_attention_backend_runs_the_stock_paths_and_routing_stays_ours(plain, monkeypatch):
    pipe = make_pipe()
    backends, routed_calls = [], []
    dispatch = wan_processors.WanAttnProcessor.__call__.__globals__["dispatch_attention_fn"]
    routed = wan_processors.routed_self_attention

    def spy_dispatch(*args, **kwargs):
        backends.append(kwargs.get("backend"))
        return dispatch(*args, **kwargs)

    def spy_routed(*args, **kwargs):
        routed_calls.append(1)
        return routed(*args, **kwargs)

    monkeypatch.setitem(wan_processors.WanAttnProcessor.__call__.__globals__, "dispatch_attention_fn", spy_dispatch)
    monkeypatch.setattr(wan_processors, "routed_self_attention", spy_routed)
    # set_attention_backend also sets Diffusers' process-wide default: restore it for the other tests.
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend)
    pipe.transformer.set_attention_backend("_native_math")
    assert all(isinstance(p, SubjectSparseAttnProcessor) for p in pipe.transformer.attn_processors.values())
    out = run(pipe)
    layers = len(pipe.transformer.blocks)
    # Routed self-attention in the conditional and reference branches; the negative branch (self and
    # cross) and the reference branch's unrouted cross-attention go through Diffusers with the chosen backend.
    assert len(routed_calls) == 2 * layers
    assert len(backends) == 3 * layers and set(backends) == {AttentionBackendName._NATIVE_MATH}
    torch.testing.assert_close(out.frames, plain("router").frames, atol=1e-5, rtol=1e-5)


def test_installing_processors_keeps_the_attention_backend(monkeypatch):
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend)
    transformer = tiny_wan_components(attention_head_dim=HEAD_DIM)["transformer"]
    transformer.set_attention_backend("_native_math")  # e.g. on a WanPipeline before DiasRPipeline.from_wan
    set_subject_sparse_attn_processor(transformer)
    procs = transformer.attn_processors.values()
    assert all(p._attention_backend == AttentionBackendName._NATIVE_MATH for p in procs)


@pytest.mark.parametrize("mode", ["similarity", "router"])
def test_routed_block_compiles_without_graph_breaks(mode):
    """``fullgraph=True`` raises on any graph break; the eager backend makes that check cheap."""
    pipe = make_pipe()
    transformer, state = pipe.transformer, pipe.routing_state
    block = transformer.blocks[0]
    captured = {}
    block.register_forward_pre_hook(lambda m, args: captured.setdefault("args", args))
    x = torch.randn(1, 16, 5, 4, 4, generator=torch.Generator().manual_seed(0))  # 3 video + 2 reference frames
    text = torch.randn(1, 512, transformer.config.text_dim, generator=torch.Generator().manual_seed(1))
    segments = [TextSegments(order=torch.arange(512).flip(0), lengths=[2, 3])]
    # The op's portable "torch" backend reads group sizes on the host (a graph break, see docs/memory.md); the
    # dense reference backend is traceable, so this checks the processors and the routing state alone.
    inputs = dict(ref_lengths=[4, 4], video_grid=(3, 2, 2), backend="dense", text_segments=segments, mode=mode)
    inputs.update(router=pipe.id_router if mode == "router" else None, record=True)
    with torch.no_grad(), state.activate(**inputs):
        transformer(x, torch.tensor([500.0]), text, return_dict=False)
        expected = block(*captured["args"])
        compiled = torch.compile(block, fullgraph=True, backend="eager")
        # Not bit-equal: traced, the dense reference is one masked SDPA instead of per-bucket gathers.
        torch.testing.assert_close(compiled(*captured["args"]), expected, atol=1e-6, rtol=1e-5)
        assert state.buckets and state.current_buckets is not None


# --------------------------------------------------------------------------------------------------------------------
# The same on an accelerator (run when a GPU is lent)

GPU_OPTIONS = ["model_cpu_offload", "sequential_cpu_offload", "group_leaf_stream", "group_block", "fp8", "gguf"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("option", GPU_OPTIONS)
def test_memory_options_on_gpu(option, tmp_path):
    ref_pipe = make_pipe().to("cuda")
    ref = run(ref_pipe)
    pipe = make_pipe(load_gguf_transformer(tmp_path) if option == "gguf" else None)
    if option == "model_cpu_offload":
        pipe.enable_model_cpu_offload()
    elif option == "sequential_cpu_offload":
        pipe.enable_sequential_cpu_offload()
    elif option == "group_leaf_stream":
        pipe.enable_group_offload(torch.device("cuda"), offload_type="leaf_level", use_stream=True)
    elif option == "group_block":
        pipe.enable_group_offload(torch.device("cuda"), offload_type="block_level", num_blocks_per_group=1)
    else:
        if option == "fp8":
            pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
        pipe.to("cuda")
    out = run(pipe)
    assert pipe._execution_device.type == "cuda"
    assert all(p.device.type == "cuda" for p in pipe.id_router.parameters())
    assert out.frames.device.type == "cuda" and torch.isfinite(out.frames).all()
    if option in ("fp8", "gguf"):
        stock = max_err(run(pipe, subjects=False), run(ref_pipe, subjects=False))
        assert max_err(out, ref) <= 2 * stock + 1e-6
    else:  # GPU kernels may pick other reductions under offloading: close, not bit-equal
        torch.testing.assert_close(out.frames, ref.frames, atol=1e-4, rtol=1e-4)


def test_reference_encoding_follows_the_vae_compute_dtype_and_device():
    from diasr_diffusers.utils.latents import encode_latents

    vae = tiny_wan_components(attention_head_dim=HEAD_DIM)["vae"]
    pixels = torch.rand(2, 3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    expected = encode_latents(vae, pixels)
    # FP8 storage: the weights' own dtype is float8, the VAE computes in float32.
    vae.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert next(vae.parameters()).dtype == torch.float8_e4m3fn
    out = encode_latents(vae, pixels)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert 0 < (out - expected).abs().max() < 0.5 * expected.abs().max()


# --------------------------------------------------------------------------------------------------------------------
# Dtypes: a bf16 transformer with a float32 router, and the router itself in FP8 storage


def test_float32_router_with_bf16_transformer(plain):
    # The usual GPU setup: `from_wan(..., dtype=torch.bfloat16)` loads the router separately, in float32.
    pipe = make_pipe()
    pipe.transformer.to(torch.bfloat16)
    assert pipe.id_router.dtype == torch.float32
    out = run(pipe)
    assert torch.isfinite(out.frames).all()
    assert out.routing_maps.shape == plain("router").routing_maps.shape


def test_router_layerwise_casting_fp8():
    transformer = tiny_wan_components(attention_head_dim=HEAD_DIM)["transformer"]
    torch.manual_seed(0)
    router = IDRouter.from_transformer(transformer, router_dim=32, num_identity_queries=4, num_heads=2)
    g = torch.Generator().manual_seed(0)
    video = torch.randn(1, 12, 32, generator=g)
    refs = [torch.randn(1, 4, 32, generator=g), torch.randn(1, 4, 32, generator=g)]
    phrases = [torch.randn(1, 2, 32, generator=g), torch.randn(1, 3, 32, generator=g)]

    def logits():
        with torch.no_grad():
            return router(video, router.encode_anchors(refs, phrases), layer_idx=1)

    expected = logits()
    router.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert router.to_token[0][0].weight.dtype == torch.float8_e4m3fn
    assert router.image_pooler.attn.out_proj.weight.dtype == torch.float32  # read outside its forward: not cast
    out = logits()
    assert 0 < (out - expected).abs().max() <= 0.25 * expected.abs().max()
