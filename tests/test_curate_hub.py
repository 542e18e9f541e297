"""The Hub-model curation stages with tiny random versions of the exact `transformers` classes, saved to a folder
and loaded back with `from_pretrained` (the loading and pre/post-processing a GPU user runs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("scenedetect", reason="the curate extra (scenedetect-headless) is not installed")

from diasr_diffusers.data import validate_manifest  # noqa: E402
from diasr_diffusers.data.curate import CaptionsFile, CurateOptions, MetadataFilter, Stages, Thresholds, curate  # noqa: E402
from diasr_diffusers.data.curate.hub import (  # noqa: E402
    ClipAesthetic,
    GroundingDinoGrounder,
    ImageClassifierWatermark,
    laion_aesthetic_mlp,
)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> tuple[Path, Path]:
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

    root = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)  # fmt: skip
    CLIPVisionModelWithProjection(config).save_pretrained(root / "clip")
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "clip")
    head = laion_aesthetic_mlp(16)
    with torch.no_grad():
        head.layers[-1].bias.fill_(5.0)  # centre the random scores around 5, like real aesthetic scores
    save_file(head.state_dict(), root / "mlp.safetensors")
    return root / "clip", root / "mlp.safetensors"


def test_clip_aesthetic_matches_a_manual_forward(tiny_clip):
    from safetensors.torch import load_file
    from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

    clip, mlp = tiny_clip
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40, 50, 3), dtype=np.uint8), np.full((30, 30, 3), 200, np.uint8)]
    scores = ClipAesthetic(clip=str(clip), mlp=str(mlp)).score(images)
    model = CLIPVisionModelWithProjection.from_pretrained(clip).eval()
    pixels = CLIPImageProcessorPil.from_pretrained(clip)(images=images, return_tensors="pt")["pixel_values"]
    head = laion_aesthetic_mlp(16).eval()
    head.load_state_dict(load_file(mlp))
    with torch.no_grad():
        emb = model(pixel_values=pixels).image_embeds
        expected = head(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
    assert np.allclose(scores, expected.numpy(), atol=1e-5) and scores[0] != scores[1]
    with pytest.raises(ValueError, match="`mlp`"):
        ClipAesthetic(clip=str(clip)).score(images)


def test_watermark_classifier_reads_its_label(tmp_path):
    from transformers import CLIPImageProcessorPil, ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=32,
                       patch_size=8, id2label={0: "watermark", 1: "clear"}, label2id={"watermark": 0, "clear": 1})  # fmt: skip
    ViTForImageClassification(config).save_pretrained(tmp_path / "wm")
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path / "wm")
    probs = ImageClassifierWatermark(model=str(tmp_path / "wm")).score([np.zeros((32, 32, 3), np.uint8)] * 2)
    assert len(probs) == 2 and all(0 < p < 1 for p in probs)
    with pytest.raises(ValueError, match="no label 'logo'"):
        ImageClassifierWatermark(model=str(tmp_path / "wm"), label="logo").score([np.zeros((32, 32, 3), np.uint8)])


@pytest.fixture(scope="module")
def tiny_grounding_dino(tmp_path_factory) -> Path:
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessorPil,
        GroundingDinoProcessor,
        SwinConfig,
    )

    root = tmp_path_factory.mktemp("gdino")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "red", "box", "blue", "ball", "the"]
    (root / "vocab.txt").write_text("\n".join(words) + "\n")
    torch.manual_seed(0)
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
                                   image_size=64, out_features=["stage2", "stage3", "stage4"]),
        text_config=BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10, num_feature_levels=3, encoder_n_points=2,
        decoder_n_points=2, max_text_len=32, use_timm_backbone=False, use_pretrained_backbone=False,
    )  # fmt: skip
    GroundingDinoForObjectDetection(config).save_pretrained(root / "model")
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 96}),
        tokenizer=BertTokenizer(str(root / "vocab.txt")),
    )
    processor.save_pretrained(root / "model")
    return root / "model"


def test_grounding_dino_boxes_in_frame_pixels(tiny_grounding_dino):
    frame = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    grounder = GroundingDinoGrounder(model=str(tiny_grounding_dino), box_threshold=0.0, text_threshold=0.0)
    found = grounder.ground(frame, ["a red box", "the blue ball"])
    assert len(found) == 2 and any(f is not None for f in found)
    for f in found:
        if f is not None:
            (x1, y1, x2, y2), score = f
            assert -1 <= x1 < x2 <= 97 and -1 <= y1 < y2 <= 65 and 0 <= score <= 1
    strict = GroundingDinoGrounder(model=str(tiny_grounding_dino), box_threshold=1.01, text_threshold=1.01)
    assert strict.ground(frame, ["a red box"]) == [None]  # nothing clears an impossible threshold


def _moving_box_video(seed: int) -> np.ndarray:
    """16 frames of 64 x 96: a red box with yellow stripes sliding right over a still noise background."""
    rng = np.random.default_rng(seed)
    video = np.repeat(rng.integers(60, 120, (1, 64, 96, 3), dtype=np.uint8), 16, 0)
    for t in range(16):
        video[t, 16:48, 10 + 2 * t : 50 + 2 * t] = (220, 40, 40)
        video[t, 16:48:4, 10 + 2 * t : 50 + 2 * t] = (250, 250, 0)
    return video


def test_pipeline_end_to_end_with_tiny_hub_models(tmp_path, tiny_clip, tiny_grounding_dino):
    from diasr_diffusers.data._io import write_video

    (tmp_path / "src").mkdir()
    write_video(tmp_path / "src" / "clip.mp4", _moving_box_video(0), fps=8)
    (tmp_path / "captions.json").write_text(json.dumps(
        [{"video": "clip.mp4", "caption": "A red box slides past the blue ball.", "subjects": ["a red box"]}]))  # fmt: skip
    clip, mlp = tiny_clip
    stages = Stages(
        captioner=CaptionsFile(tmp_path / "captions.json"), ocr=None, faces=None,
        aesthetic=ClipAesthetic(clip=str(clip), mlp=str(mlp)),
        grounder=GroundingDinoGrounder(model=str(tiny_grounding_dino), box_threshold=0.0, text_threshold=0.0),
    )  # fmt: skip
    options = CurateOptions(metadata=MetadataFilter(min_short_side=32, min_seconds=1.0),
                            thresholds=Thresholds(min_aesthetic=0.0, min_subject_aesthetic=0.0, min_mask_fraction=0.0))  # fmt: skip
    report = curate([tmp_path / "src"], tmp_path / "ds", stages=stages, options=options, progress=False)
    assert report["kept"] == 1, report["clips_detail"]
    (record,) = [json.loads(line) for line in (tmp_path / "ds" / "manifest.jsonl").read_text().splitlines()]
    assert record["meta"]["stages"]["grounder"] == "grounding-dino" and np.isfinite(record["meta"]["aesthetic"])
    sub = record["subjects"][0]["meta"]
    assert sub["box_source"] == "grounding-dino" and np.isfinite(sub["aes_score"])
    assert validate_manifest(tmp_path / "ds").ok
    # Every score and the thresholds it met are in meta, so a stricter threshold can be re-applied without models.
    assert record["meta"]["thresholds"]["min_aesthetic"] == 0.0 and "aesthetic" in record["meta"]["timing_s"]


def _tiny_sam2_video_config():
    from transformers import Sam2HieraDetConfig, Sam2VideoConfig, Sam2VisionConfig

    # Smallest sizes that run: the memory encoder's 64 output channels and hidden sizes >= 128 are hard-coded
    # assumptions of the video model (DATA_PIPELINE.md §3.3).
    backbone = Sam2HieraDetConfig(hidden_size=8, image_size=[128, 128], blocks_per_stage=[1, 1, 2, 1],
                                  embed_dim_per_stage=[8, 16, 32, 64], num_attention_heads_per_stage=[1] * 4,
                                  window_size_per_stage=[4] * 4, global_attention_blocks=[3],
                                  window_positional_embedding_background_size=[4, 4])  # fmt: skip
    vision = Sam2VisionConfig(backbone_config=backbone, backbone_channel_list=[64, 32, 16, 8],
                              backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]], fpn_hidden_size=128)  # fmt: skip
    return Sam2VideoConfig(
        vision_config=vision,
        prompt_encoder_config={"hidden_size": 128, "image_size": 128, "patch_size": 16, "mask_input_channels": 16},
        mask_decoder_config={"hidden_size": 128, "mlp_dim": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                             "iou_head_hidden_dim": 32},
        image_size=128, num_maskmem=2, memory_attention_hidden_size=128, memory_attention_num_layers=1,
        memory_attention_num_attention_heads=1, memory_attention_feed_forward_hidden_size=64,
        memory_attention_rope_feat_sizes=[8, 8], memory_encoder_hidden_size=128, memory_encoder_output_channels=64,
        mask_downsampler_embed_dim=128, memory_fuser_embed_dim=128, memory_fuser_intermediate_dim=256,
    )  # fmt: skip


def test_sam2_video_segmenter_tracks_every_frame(tmp_path):
    from transformers import Sam2VideoModel

    from diasr_diffusers.data.curate.hub import Sam2VideoSegmenter

    torch.manual_seed(0)
    Sam2VideoModel(_tiny_sam2_video_config()).save_pretrained(tmp_path / "sam2")
    frames = np.random.default_rng(0).integers(0, 255, (2, 48, 80, 3), dtype=np.uint8)
    segmenter = Sam2VideoSegmenter(model=str(tmp_path / "sam2"))
    masks, scores = segmenter.segment(frames, [(4, 4, 30, 40), (40, 10, 78, 46)])
    assert masks.shape == (2, 2, 48, 80) and masks.dtype == bool and len(scores) == 2
    # The prompt reaches the model: another box gives another frame-0 mask.
    other, _ = segmenter.segment(frames, [(50, 20, 60, 30), (40, 10, 78, 46)])
    assert not np.array_equal(masks[0, 0], other[0, 0]) and np.array_equal(masks[1, 0], other[1, 0])


def test_cli_loads_hub_stages_from_folders(tmp_path, tiny_clip, tiny_grounding_dino, capsys):
    from diasr_diffusers.cli import main
    from diasr_diffusers.data._io import write_video

    write_video(tmp_path / "clip.mp4", _moving_box_video(1), fps=8)
    (tmp_path / "captions.json").write_text(json.dumps(
        [{"video": "clip.mp4", "caption": "A red box slides past the blue ball.", "subjects": ["a red box"]}]))  # fmt: skip
    clip, mlp = tiny_clip
    args = ["curate", str(tmp_path / "clip.mp4"), "--out", str(tmp_path / "ds"), "--captions",
            str(tmp_path / "captions.json"), "--no-ocr", "--no-faces", "--min-short-side", "32", "--min-seconds", "1",
            "--quiet", "--models", f"grounding={tiny_grounding_dino}", "--models", f"clip={clip}",
            "--models", f"aesthetic={mlp}"]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "ds" / "report.json").read_text())
    assert report["stages"]["grounder"] == "grounding-dino" and report["stages"]["aesthetic"] == "clip-laion-aesthetic"
    # The tiny model's random aesthetic (about 5) decides against the real threshold 4.75; either way it is recorded.
    (clip_result,) = [json.loads(p.read_text()) for p in (tmp_path / "ds" / ".curate" / "clips").glob("*.json")]
    assert np.isfinite(clip_result["meta"]["aesthetic"])
    assert main([*args[:-2], "--models", "captioner=x"]) == 2
    assert "--models" in capsys.readouterr().err


# Qwen2.5-VL's chat template (its Hub repo's chat_template.json), so the tiny checkpoint builds prompts as the real one.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_qwen_vl(tmp_path_factory) -> Path:
    """A random `Qwen2_5_VLForConditionalGeneration` folder laid out like the Hub repo: config + weights, tokenizer
    (without a template in its config), `preprocessor_config.json` naming `Qwen2VLImageProcessor`, and the chat
    template in `chat_template.json` beside them."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    from diasr_diffusers.utils.tiny import tiny_qwen_tokenizer

    root = tmp_path_factory.mktemp("qwen_vl") / "model"
    tokenizer = tiny_qwen_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                                                "<|video_pad|>"]})  # fmt: skip
    tokenizer.chat_template = None
    tokenizer.save_pretrained(root)
    (root / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_5_VL_CHAT_TEMPLATE}))
    Qwen2VLImageProcessorPil().save_pretrained(root)
    config = json.loads((root / "preprocessor_config.json").read_text())
    config.update(image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2_5_VLProcessor")
    (root / "preprocessor_config.json").write_text(json.dumps(config))
    ids = tokenizer.convert_tokens_to_ids
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 4096,
                     "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                     "bos_token_id": None, "eos_token_id": [ids("<|im_end|>"), ids("<|endoftext|>")],
                     "pad_token_id": ids("<|endoftext|>")},
        vision_config={"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 32,
                       "fullatt_block_indexes": [0], "window_size": 56},
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )  # fmt: skip
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(root)
    return root


def test_parse_caption_answer_reads_json_as_vlms_write_it():
    from diasr_diffusers.data.curate.caption import CaptionError, parse_caption_answer

    fenced = 'Sure!\n```json\n{"caption": "A man  walks a dog.", "subjects": ["a man", {"phrase": " a dog "}, 3]}\n```'
    assert parse_caption_answer(fenced) == ("A man walks a dog.", ["a man", "a dog"])
    # Prose with braces before the object; a second object after it is ignored.
    prose = 'Frames {1-16} show: {"caption": "A cat sits.", "subjects": ["\'a cat\'"]} and {"caption": "x"}'
    assert parse_caption_answer(prose) == ("A cat sits.", ["a cat"])
    for answer, match in [("", "empty answer"), ("A man walks a dog.", "no JSON object"),
                          ('{"caption": "", "subjects": []}', '"caption" must be'),
                          ('{"caption": "A man.", "subjects": "a man"}', '"subjects" must be a list'),
                          ('{"caption": "A man.", "subjects": ["a man"]', "no JSON object")]:  # fmt: skip
        with pytest.raises(CaptionError, match=match):
            parse_caption_answer(answer)


def test_qwen_vl_captioner_runs_the_real_model(tiny_qwen_vl):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    from diasr_diffusers.data.curate import ClipContext
    from diasr_diffusers.data.curate.caption import CaptionError
    from diasr_diffusers.data.curate.hub import QwenVLCaptioner

    frames = np.random.default_rng(0).integers(0, 255, (20, 48, 64, 3), dtype=np.uint8)
    captioner = QwenVLCaptioner(model=str(tiny_qwen_vl), max_new_tokens=8)
    answer, picks = captioner.answer(frames)
    assert picks == np.linspace(0, 19, 16).round().astype(int).tolist() and isinstance(answer, str) and answer
    # The same answer by hand: the Hub template, 16 images through the PIL image processor, greedy generate.
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen_vl)
    images = Qwen2VLImageProcessorPil.from_pretrained(tiny_qwen_vl)(
        [frames[i] for i in picks], size={"shortest_edge": 16 * 28 * 28, "longest_edge": 256 * 28 * 28},
        return_tensors="pt")  # fmt: skip
    per_image = (images["image_grid_thw"].prod(-1) // 4).tolist()
    prompt = captioner.prompt.format(frames=16)
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            + "".join(f"<|vision_start|>{'<|image_pad|>' * n}<|vision_end|>" for n in per_image)
            + f"{prompt}<|im_end|>\n<|im_start|>assistant\n")  # fmt: skip
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_qwen_vl).eval()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=images["pixel_values"],
                         image_grid_thw=images["image_grid_thw"], max_new_tokens=8, do_sample=False,
                         repetition_penalty=1.05)  # fmt: skip
    assert answer == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    for bad, match in [({"frames": 0}, "`frames`"), ({"max_pixels": 10}, "`max_pixels`"), ({"dtype": "int8"}, "`dtype`"),
                       ({"prompt": "Describe."}, "`prompt`")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            QwenVLCaptioner(model=str(tiny_qwen_vl), **bad)
    # A random model's answer is no JSON: a clear reason, and the raw answer kept for the record.
    ctx = ClipContext("clip.mp4", 0, 0, frames, 8.0)
    with pytest.raises(CaptionError, match="no JSON object") as err:
        captioner.caption(ctx)
    assert err.value.meta["answer"] == answer and err.value.meta["frames"] == picks


def test_pipeline_with_the_qwen_vl_captioner(tmp_path, tiny_qwen_vl, tiny_grounding_dino, monkeypatch):
    """The whole pipeline with the VLM stage: only the decoded text is replaced, by answers a VLM might give."""
    from transformers import Qwen2_5_VLProcessor

    from diasr_diffusers.data._io import write_video
    from diasr_diffusers.data.curate.hub import QwenVLCaptioner

    for name in ("a", "b", "c"):
        write_video(tmp_path / "src" / f"{name}.mp4", _moving_box_video(ord(name)), fps=8)
    answers = iter([
        '```json\n{"caption": "A red box slides past the blue ball.", "subjects": ["a red box", "the green cup", "A Red"]}\n```',
        "The video shows a red box sliding to the right.",
        '{"caption": "A red box slides.", "subjects": ["box slides past"]}',
    ])  # fmt: skip
    monkeypatch.setattr(Qwen2_5_VLProcessor, "post_process_image_text_to_text", lambda self, ids, **kw: [next(answers)])
    stages = Stages(captioner=QwenVLCaptioner(model=str(tiny_qwen_vl), max_new_tokens=4), ocr=None, faces=None,
                    grounder=GroundingDinoGrounder(model=str(tiny_grounding_dino), box_threshold=0.0, text_threshold=0.0))  # fmt: skip
    options = CurateOptions(metadata=MetadataFilter(min_short_side=32, min_seconds=1.0),
                            thresholds=Thresholds(min_mask_fraction=0.0))  # fmt: skip
    report = curate([tmp_path / "src"], tmp_path / "ds", stages=stages, options=options, progress=False)
    assert report["kept"] == 1 and report["stages"]["captioner"] == "qwen2.5-vl", report["clips_detail"]
    (record,) = [json.loads(line) for line in (tmp_path / "ds" / "manifest.jsonl").read_text().splitlines()]
    assert record["caption"] == "A red box slides past the blue ball."
    assert [s["phrase"] for s in record["subjects"]] == ["a red box"]
    dropped = {d["phrase"]: d for d in record["meta"]["dropped_subjects"]}
    assert set(dropped) == {"the green cup", "A Red"} and all(d["stage"] == "phrases" for d in dropped.values())
    assert "does not occur in the caption" in dropped["the green cup"]["reason"]
    assert "overlaps subject 0" in dropped["A Red"]["reason"]
    assert record["meta"]["captioner"]["answer"].startswith("```json") and len(record["meta"]["captioner"]["frames"]) == 16
    assert validate_manifest(tmp_path / "ds").ok
    results = {json.loads(p.read_text())["meta"]["source"]["video"][-5:]: json.loads(p.read_text())
               for p in (tmp_path / "ds" / ".curate" / "clips").glob("*.json")}  # fmt: skip
    assert results["b.mp4"]["stage"] == "caption" and "no JSON object" in results["b.mp4"]["reason"]
    assert results["b.mp4"]["meta"]["captioner"]["answer"] == "The video shows a red box sliding to the right."
    assert results["c.mp4"]["stage"] == "phrases" and "'box slides past'" in results["c.mp4"]["reason"]


def test_cli_caption_model(tmp_path, tiny_qwen_vl, capsys):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from diasr_diffusers.cli import main
    from diasr_diffusers.data._io import write_video

    # A copy whose answer ends at once (final norm zeroed: every logit 0, token 0 = <|endoftext|> wins, an end
    # token as in the Hub generation config), so the CLI's 512-token default costs one step.
    model_dir = tmp_path / "qwen"
    shutil.copytree(tiny_qwen_vl, model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.language_model.norm.weight.zero_()
    model.save_pretrained(model_dir)
    write_video(tmp_path / "clip.mp4", _moving_box_video(1), fps=8)
    (tmp_path / "captions.json").write_text("[]")
    args = ["curate", str(tmp_path / "clip.mp4"), "--out", str(tmp_path / "ds"), "--no-ocr", "--no-faces",
            "--min-short-side", "32", "--min-seconds", "1", "--quiet", "--models", f"caption={model_dir}"]  # fmt: skip
    assert main([*args, "--captions", str(tmp_path / "captions.json")]) == 2
    assert "not both" in capsys.readouterr().err and not (tmp_path / "ds").exists()
    assert main(args) == 0
    report = json.loads((tmp_path / "ds" / "report.json").read_text())
    # The model answers nothing: the clip is dropped at the caption stage, with the model named.
    assert report["stages"]["captioner"] == "qwen2.5-vl" and report["dropped"] == 1
    (clip,) = [json.loads(p.read_text()) for p in (tmp_path / "ds" / ".curate" / "clips").glob("*.json")]
    assert clip["stage"] == "caption" and "empty answer" in clip["reason"]
    assert clip["meta"]["captioner"] == {"model": str(model_dir), "answer": "", "frames": list(range(16))}
